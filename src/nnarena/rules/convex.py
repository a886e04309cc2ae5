"""Convex training of a two-layer ReLU network over sampled activation patterns.

Paper: "Efficient Global Optimization of Two-layer ReLU Networks: Quadratic-time Algorithms and
Adversarial Training" (Bai, Gautam, Sojoudi). With ``X`` the inputs (a ones column appended for
the hidden bias) and ``P`` sampled patterns ``D_i = diag(1[X g_i >= 0])``, ``g_i ~ N(0, I)``
(duplicates removed), training ``f(x) = sum_j a_j relu(x . u_j)`` with the loss
``1/(2n) ||f(X) - y||^2 + beta/2 (||U||^2 + ||a||^2)`` is replaced by the convex group-lasso
program

    min  1/(2n) ||sum_i D_i X (v_i - w_i) - y||^2 + beta sum_i (||v_i|| + ||w_i||)
    s.t. (2 D_i - I) X v_i >= 0,  (2 D_i - I) X w_i >= 0,

solved by ADMM (splitting ``u = z`` for the group-lasso prox and ``G u = s >= 0`` for the cone
constraints). Its linear system is the same at every iteration; it is solved through the
Woodbury identity with one ``n x n`` Cholesky factor, since ``(2 D_i - I)^2 = I`` makes
``G^T G`` block-diagonal with blocks ``X^T X``. Each nonzero ``v_i`` (``w_i``) gives one ReLU unit
``u = v_i / sqrt(||v_i||)`` with output weight ``+sqrt(||v_i||)`` (``-sqrt(||w_i||)``), whose
regularised objective equals the convex one where the constraints hold.

Multi-class: one-vs-all on one-hot targets (squared loss), all classes solved at once (the
system does not depend on ``y``) with shared patterns; each hidden unit feeds one class. The
solution's nonzero groups become the mlp's hidden units, the largest first; by default
``P = width // (2 * outputs)`` so that all fit; with more patterns, groups beyond the width are
dropped (``dropped_units`` is logged; the recovery is then approximate).

Deviations: ADMM runs a fixed number of iterations (150 by default: on digits, 300 converge
further but test worse), so the cone constraints hold to ADMM's tolerance (``max_violation`` is
logged) rather than exactly. The l_inf-robust variant ("Practical Convex Formulation of Robust
One-hidden-layer Neural Network Training") is rule `convex-relu-robust` (`convex_robust`); this
paper's own adversarial-training algorithm is not implemented.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import Blocks
from nnarena.registry import register
from nnarena.rules.base import LearningRule, RuleCapabilities

if TYPE_CHECKING:
    from nnarena.data import DataBundle
    from nnarena.train.trainer import Trainer

__all__ = ["ConvexProgram", "ConvexReLU", "relu_objective", "sample_patterns"]


def relu_objective(model: nn.Module, x: torch.Tensor, target: torch.Tensor, beta: float
                   ) -> torch.Tensor:
    """``1/(2n) ||model(x) - target||^2 + beta/2 (||W1||^2 + ||b1||^2 + ||W2||^2)``.

    The non-convex objective of an mlp with one hidden layer whose head bias is zero.
    """
    assert isinstance(model, Blocks)
    hidden = next(m for m in model.blocks[0] if isinstance(m, nn.Linear))
    fit = 0.5 * (model(x) - target).pow(2).sum() / len(x)
    norms = hidden.weight.pow(2).sum() + hidden.bias.pow(2).sum() + model.head.weight.pow(2).sum()
    return fit + 0.5 * beta * norms


def sample_patterns(x: torch.Tensor, n_patterns: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with a ones column ``(n, d + 1)`` and the distinct sampled patterns ``(n, P)``.

    Pattern ``i`` is the diagonal of ``D_i = diag(1[X g_i >= 0])``, ``g_i ~ N(0, I)``; float64.
    """
    xa = torch.cat([x.flatten(1).double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    gates = torch.randn(xa.shape[1], n_patterns, generator=generator, dtype=torch.float64)
    return xa, torch.unique((xa @ gates >= 0).double(), dim=1)


class ConvexProgram:
    """The sampled convex program for inputs ``x`` (n, d) and targets (n, K), solved by ADMM.

    Variables ``u`` have shape ``(2, P, d + 1, K)``: ``u[0]`` the ``v_i``, ``u[1]`` the ``w_i``,
    one column per output.
    """

    def __init__(self, x: torch.Tensor, target: torch.Tensor, n_patterns: int, beta: float,
                 rho: float, generator: torch.Generator) -> None:
        n = len(x)
        self.dtype = torch.float64
        xa, self.masks = sample_patterns(x, n_patterns, generator)
        self.signs = 2 * self.masks - 1
        self.x = xa / n ** 0.5  # the 1/(2n) loss as 1/2 ||.||^2; cones are scale-free
        self.y = target.to(self.dtype) / n ** 0.5
        self.beta, self.rho = beta, rho
        d = xa.shape[1]
        self.block_inv = torch.linalg.inv(torch.eye(d, dtype=self.dtype) + self.x.T @ self.x)
        kernel = self.x @ self.block_inv @ self.x.T
        schur = rho * torch.eye(n, dtype=self.dtype) + 2 * kernel * (self.masks @ self.masks.T)
        self.schur = torch.linalg.cholesky(schur)

    def predict(self, u: torch.Tensor) -> torch.Tensor:
        """``sum_i D_i X (v_i - w_i)`` (on the 1/sqrt(n)-scaled data)."""
        xu = torch.einsum("nd,pdk->pnk", self.x, u[0] - u[1])
        return torch.einsum("np,pnk->nk", self.masks, xu)

    def objective(self, u: torch.Tensor) -> float:
        fit = 0.5 * (self.predict(u) - self.y).pow(2).sum()
        return (fit + self.beta * u.norm(dim=2).sum()).item()

    def max_violation(self, u: torch.Tensor) -> float:
        """Largest cone-constraint violation ``max(0, -(2D_i - I) X u_i)`` (unscaled data)."""
        return (-self._g(u)).clamp_min(0).max().item() * len(self.x) ** 0.5

    def _g(self, u: torch.Tensor) -> torch.Tensor:
        return self.signs.T[None, :, :, None] * torch.einsum("nd,spdk->spnk", self.x, u)

    def _gt(self, s: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nd,spnk->spdk", self.x, self.signs.T[None, :, :, None] * s)

    def _ft(self, r: torch.Tensor) -> torch.Tensor:
        half = torch.einsum("nd,np,nk->pdk", self.x, self.masks, r)
        return torch.stack([half, -half])

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(F^T F + rho (I + G^T G))^{-1} rhs`` by Woodbury."""
        b_rhs = torch.einsum("de,spek->spdk", self.block_inv, rhs)
        inner = torch.cholesky_solve(self.predict(b_rhs), self.schur)
        correction = torch.einsum("de,spek->spdk", self.block_inv, self._ft(inner))
        return (b_rhs - correction) / self.rho

    def solve(self, iterations: int) -> torch.Tensor:
        """Run ADMM from zero; return the group-sparse iterate ``z``."""
        shape = (2, self.masks.shape[1], self.x.shape[1], self.y.shape[1])
        z = torch.zeros(shape, dtype=self.dtype)
        lam = torch.zeros_like(z)
        s = torch.zeros(2, shape[1], len(self.x), shape[3], dtype=self.dtype)
        nu = torch.zeros_like(s)
        fty = self._ft(self.y)
        for _ in range(iterations):
            u = self._solve(fty + self.rho * (z - lam) + self.rho * self._gt(s - nu))
            shifted = u + lam
            norm = shifted.norm(dim=2, keepdim=True)
            z = shifted * (1 - self.beta / self.rho / norm.clamp_min(1e-30)).clamp_min(0)
            gu = self._g(u)
            s = (gu + nu).clamp_min(0)
            lam += u - z
            nu += gu - s
        return z


@register("rule", "convex-relu",
          paper="Efficient Global Optimization of Two-layer ReLU Networks: Quadratic-time "
                "Algorithms and Adversarial Training",
          summary="Two-layer ReLU net from a convex group-lasso program over sampled patterns.")
class ConvexReLU(LearningRule):
    """Convex (ADMM) training of an mlp with one ReLU hidden layer.

    Args:
        beta: weight-decay strength ``beta`` of the objective (per-example loss scale).
        rho: ADMM penalty.
        iterations: ADMM iterations.
        n_patterns: sampled patterns ``P``; ``None``: ``width // (2 * outputs)``, so that every
            group of the solution has a hidden unit.
    """

    capabilities = RuleCapabilities(supports_conv=False, closed_form=True)
    label: ClassVar[str] = "convex-relu"

    def __init__(self, beta: float = 1e-3, rho: float = 0.1, iterations: int = 150,
                 n_patterns: int | None = None) -> None:
        super().__init__()
        for key, value in (("beta", beta), ("rho", rho), ("iterations", iterations),
                           ("n_patterns", n_patterns or 1)):
            if not value > 0:
                raise ConfigError(f"{self.label} {key} must be > 0, got {value}")
        self.beta, self.rho, self.iterations = beta, rho, iterations
        self.n_patterns = n_patterns

    @override
    def check(self, model: nn.Module) -> None:
        super().check(model)
        self._layers(model)

    def _layers(self, model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        hint = (f"{self.label} trains an mlp with one ReLU hidden layer (model 'mlp', depth=1, "
                "layer='linear', act='relu', no norm, no dropout)")
        if not isinstance(model, Blocks) or len(model.blocks) != 1:
            raise IncompatibleError(f"{hint}; got {type(model).__name__}")
        parts = [m for m in model.blocks[0] if not isinstance(m, (nn.Flatten, nn.Identity))]
        if ([type(m) for m in parts] != [nn.Linear, nn.ReLU]
                or type(model.head) is not nn.Linear):
            raise IncompatibleError(f"{hint}; got block {model.blocks[0]}")
        hidden, head = parts[0], model.head
        assert isinstance(hidden, nn.Linear) and isinstance(head, nn.Linear)
        return hidden, head

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        raise IncompatibleError(f"rule '{self.name}' is closed-form: it trains through fit() "
                                "(the Trainer calls it), not step()")

    def pattern_count(self, model: nn.Module) -> int:
        """``n_patterns``, or by default as many as ``model``'s width holds."""
        hidden, head = self._layers(model)
        return self.n_patterns or max(1, hidden.out_features // (2 * head.out_features))

    def program(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, seed: int
                ) -> ConvexProgram:
        """The convex program for ``model``'s width on ``(x, target)``."""
        return ConvexProgram(x.cpu(), target.cpu(), self.pattern_count(model), self.beta,
                             self.rho, torch.Generator().manual_seed(seed))

    def targets(self, y: torch.Tensor, outputs: int) -> torch.Tensor:
        """Regression targets as given; class labels as one-hot columns."""
        return F.one_hot(y, outputs).float() if self.task == "classification" else y

    @staticmethod
    def load_solution(model: nn.Module, z: torch.Tensor) -> int:
        """Write the ReLU net recovered from the convex solution ``z`` into ``model``.

        The ``width`` groups of largest norm become the hidden units (the others unused); returns
        how many nonzero groups did not fit (0 when the recovery is exact).
        """
        assert isinstance(model, Blocks)
        hidden = next(m for m in model.blocks[0] if isinstance(m, nn.Linear))
        head = model.head
        width, k = hidden.out_features, z.shape[3]
        groups = z.permute(0, 1, 3, 2).reshape(-1, z.shape[2])  # (2 * P * K, d + 1)
        norm = groups.norm(dim=1)
        keep = norm.argsort(descending=True)[:width]
        keep = keep[norm[keep] > 0]
        scale = norm[keep].sqrt()
        units = torch.zeros(width, z.shape[2], dtype=z.dtype)
        units[:len(keep)] = groups[keep] / scale[:, None]
        out = torch.zeros(k, width, dtype=z.dtype)
        sign = 1.0 - 2.0 * (keep // (z.shape[1] * k)).to(z.dtype)  # v groups first, then w
        out[keep % k, torch.arange(len(keep))] = sign * scale
        dev, dt = hidden.weight.device, hidden.weight.dtype
        with torch.no_grad():
            hidden.weight.copy_(units[:, :-1].to(dev, dt))
            hidden.bias.copy_(units[:, -1].to(dev, dt))
            head.weight.copy_(out.to(dev, dt))
            head.bias.zero_()
        return int((norm > 0).sum()) - len(keep)

    @override
    def fit(self, trainer: Trainer, model: nn.Module, data: DataBundle) -> dict[str, Any]:
        _, head = self._layers(model)
        y = data.train.y
        program = self.program(model, data.train.x, self.targets(y, head.out_features),
                               trainer.seed)
        z = program.solve(self.iterations)
        dropped = self.load_solution(model, z)
        trainer.epoch = 1
        return {"train_loss": self.criterion(model(data.train.x.to(head.weight.device)),
                                             y.to(head.weight.device)).item(),
                "convex_objective": program.objective(z),
                "max_violation": program.max_violation(z), "dropped_units": dropped}
