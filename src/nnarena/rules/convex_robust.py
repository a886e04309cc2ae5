"""Adversarially robust convex training of a two-layer ReLU network (``l_inf`` perturbations).

Paper: "Practical Convex Formulation of Robust One-hidden-layer Neural Network Training" (Bai,
Gautam, Gai, Sojoudi). With the sampled patterns ``D_i`` of `convex-relu` (``X`` with a ones
column, ``~`` dropping the bias coordinate), adversarial training of
``f(x) = sum_j a_j relu(x . u_j)`` against ``||delta||_inf <= eps`` is replaced by the convex
program

    min  1/n sum_k l(y_k, a_k, eps ||m_k||_1) + beta sum_i (||v_i|| + ||w_i||)
    s.t. (2 D_i - I) X v_i >= eps ||~v_i||_1,  (2 D_i - I) X w_i >= eps ||~w_i||_1,

where ``a_k = sum_i d_ik x_k . (v_i - w_i)`` and ``m_k = sum_i d_ik ~(v_i - w_i)``. The robust cone
constraints keep every hidden unit's pattern fixed over each training point's ``eps``-ball, so
there ``f(x_k + delta) = a_k + delta . m_k`` and the worst case is exact:
``l = (1 - y a + eps ||m||_1)_+`` (hinge, labels ``+-1``) or ``1/2 (|a - y| + eps ||m||_1)^2``
(squared). The objective is therefore the recovered net's exact adversarial loss plus its weight
decay; with ``eps = 0`` it is the program of `convex-relu` (squared loss).

Solved by ADMM on ``(u_i, t_i)`` with ``t_i >= |~u_i|`` (so that ``eps 1.t_i`` makes the cones
linear), splitting ``u = z`` (group-lasso prox), the cone and ``t`` rows ``= s >= 0``, and
``(a, m)`` (whose loss prox is a piecewise-linear monotone scalar equation, solved exactly),
over-relaxed. The linear system is fixed: one dense Cholesky factor of size ``2 P (2 d + 1)``,
shared by all outputs.

Deviations: classification is one-vs-all on ``+-1`` targets as in `convex-relu` (robustness is
exact per output, not for the argmax of several); ADMM runs a fixed number of iterations, so the
constraints hold to its tolerance (``max_violation`` is logged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal, get_args

import torch
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.registry import register
from nnarena.rules.base import Task
from nnarena.rules.convex import ConvexReLU, sample_patterns

__all__ = ["RobustConvexProgram", "RobustConvexReLU"]

Loss = Literal["hinge", "squared"]
_RELAX = 1.6  # ADMM over-relaxation
_MAX_SYSTEM = 12_000  # rows of the dense ADMM system (a ~1.1 GiB Cholesky factor)


def _soft(v: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return v.sign() * (v.abs() - threshold).clamp_min(0)


def _root(f: Callable[[torch.Tensor], torch.Tensor], knots: torch.Tensor, hi: torch.Tensor
          ) -> torch.Tensor:
    """The root in ``[0, hi]`` of a non-increasing ``f`` linear between ``knots`` (or an end).

    ``knots`` ``(q, ...)`` and ``hi`` ``(...)``; ``f`` maps ``(q', ...)`` points to values.
    """
    points = torch.cat([torch.zeros_like(hi)[None], knots.clamp(max=hi), hi[None]]).sort(0)[0]
    values = f(points)
    last = (values > 0).sum(0, keepdim=True).clamp(1, len(points) - 1) - 1  # segment start
    x0, x1 = points.gather(0, last), points.gather(0, last + 1)
    v0, v1 = values.gather(0, last), values.gather(0, last + 1)
    step = torch.where(v0 > v1, v0.clamp_min(0) / (v0 - v1).clamp_min(1e-300), 1.0)
    return (x0 + step.clamp(max=1) * (x1 - x0))[0]


class RobustConvexProgram:
    """The robust convex program for inputs ``x`` (n, d) and targets (n, K), solved by ADMM.

    Iterates have shape ``(G, 2 d + 1, K)``, ``G = 2 P`` groups (the ``v_i``, then the ``w_i``),
    coordinates ``[~u, bias, t]``; solutions are returned as ``u`` of shape ``(2, P, d + 1, K)``
    (the layout of `ConvexProgram`). Data are scaled by ``1/sqrt(n)`` as there.
    """

    def __init__(self, x: torch.Tensor, target: torch.Tensor, n_patterns: int, beta: float,
                 eps: float, loss: Loss, rho: float, generator: torch.Generator) -> None:
        xa, masks = sample_patterns(x, n_patterns, generator)
        n, d = len(xa), xa.shape[1] - 1
        self.root_n = n ** 0.5
        self.x, self.y = xa / self.root_n, target.double() / self.root_n
        self.effect = torch.cat([masks, -masks], 1)  # (n, G): d_ik times the output sign
        self.beta, self.eps, self.loss, self.rho, self.d = beta, eps, loss, rho, d
        signs = (2 * masks - 1).T.repeat(2, 1)  # (G, n)
        # Cone rows (scaled by 1/sqrt(n)): sign_gk x_k . u_g - eps 1.t_g >= 0.
        t_part = torch.full((*signs.shape, d), -eps / self.root_n, dtype=torch.float64)
        self.cone = torch.cat([signs[:, :, None] * self.x, t_part], 2)  # (G, n, 2 d + 1)
        self.factor = torch.linalg.cholesky(self._system())

    def _system(self) -> torch.Tensor:
        """``I + C^T C + T^T T + A^T A + M^T M`` as a dense ``(G (2d+1))^2`` matrix."""
        g, n, j = self.cone.shape
        d = self.d
        eye = torch.eye(j, dtype=torch.float64)
        blocks = torch.einsum("gni,gnl->gil", self.cone, self.cone)
        blocks += 2 * torch.diag(torch.cat([torch.ones(d), torch.zeros(1), torch.ones(d)])
                                 ).double()
        system = torch.einsum("gh,gil->gihl", torch.eye(g, dtype=torch.float64), blocks + eye)
        fit = self.effect[:, :, None] * self.x[:, None, :]  # (n, G, d + 1): rows of A
        system[:, :d + 1, :, :d + 1] += torch.einsum("ngi,nhl->gihl", fit, fit)
        system[:, :d, :, :d] += torch.einsum("gh,il->gihl", self.effect.T @ self.effect / n,
                                             eye[:d, :d])
        return system.reshape(g * j, g * j)

    def _cone(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("gni,gik->gnk", self.cone, x)

    def _bounds(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ``t - ~u`` and ``t + ~u``."""
        w, t = x[:, :self.d], x[:, self.d + 1:]
        return torch.stack([t - w, t + w])

    def _fit(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, m)`` of the (scaled) data: ``(n, K)`` and ``(n, d, K)``."""
        a = torch.einsum("ng,ni,gik->nk", self.effect, self.x, u[:, :self.d + 1])
        m = torch.einsum("ng,gik->nik", self.effect, u[:, :self.d]) / self.root_n
        return a, m

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The split maps of ``x``: itself, cone rows, ``t`` rows, ``a``, ``m``."""
        return [x, self._cone(x), self._bounds(x), *self._fit(x)]

    def _adjoint(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The adjoint of `_split`."""
        x, s, r, a, m = parts
        out = x + torch.einsum("gni,gnk->gik", self.cone, s)
        d = self.d
        out[:, :d] += r[1] - r[0]
        out[:, d + 1:] += r[0] + r[1]
        out[:, :d + 1] += torch.einsum("ng,ni,nk->gik", self.effect, self.x, a)
        out[:, :d] += torch.einsum("ng,nik->gik", self.effect, m) / self.root_n
        return out

    def _prox(self, parts: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
        """The split copies' updates: group-lasso prox, projections, loss prox."""
        z, s, r, a, m = parts
        norm = z[:, :self.d + 1].norm(dim=1, keepdim=True)
        z = z.clone()
        z[:, :self.d + 1] *= (1 - self.beta / rho / norm.clamp_min(1e-30)).clamp_min(0)
        return [z, s.clamp_min(0), r.clamp_min(0), *self._loss_prox(a, m, rho)]

    def _loss_prox(self, a0: torch.Tensor, m0: torch.Tensor, rho: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``argmin loss(a, m) + rho/2 ||(a, m) - (a0, m0)||^2``, pointwise.

        Both losses are ``h(c - s a + eps ||m||_1)`` in disguise: the optimum moves ``a`` and
        soft-thresholds ``m`` by one scalar ``theta`` that solves a monotone equation.
        """
        eps, abs_m = self.eps, m0.abs()
        m_knots = (rho / eps * abs_m if eps > 0 else abs_m[:, :0]).movedim(1, 0)

        def l1(theta: torch.Tensor) -> torch.Tensor:  # ||soft(m0, eps theta / rho)||_1
            return (abs_m - eps * theta[:, :, None] / rho).clamp_min(0).sum(2)

        if self.loss == "hinge":  # (1/sqrt n) (1/sqrt n - y a + eps ||m||_1)_+, y = +-1
            y = self.y * self.root_n
            margin = 1 / self.root_n - y * a0
            theta = _root(lambda th: margin - th / rho + eps * l1(th), m_knots,
                          torch.full_like(a0, 1 / self.root_n))
            return a0 + theta * y / rho, _soft(m0, eps * theta[:, None] / rho)
        r0 = a0 - self.y  # 1/2 (|a - y| + eps ||m||_1)^2
        theta = _root(lambda th: (r0.abs() - th / rho).clamp_min(0) + eps * l1(th) - th,
                      torch.cat([rho * r0.abs()[None], m_knots]),
                      r0.abs() + eps * abs_m.sum(1))
        return self.y + _soft(r0, theta / rho), _soft(m0, eps * theta[:, None] / rho)

    def _u(self, x: torch.Tensor) -> torch.Tensor:
        g, _, k = x.shape
        return x[:, :self.d + 1].reshape(2, g // 2, self.d + 1, k)

    def solve(self, iterations: int) -> torch.Tensor:
        """Run ADMM from zero; return the group-sparse ``u`` (layout of `ConvexProgram`)."""
        g, _, j = self.cone.shape
        k = self.y.shape[1]
        copies = self._split(torch.zeros(g, j, k, dtype=torch.float64))
        duals = [torch.zeros_like(c) for c in copies]
        for _ in range(iterations):
            rhs = self._adjoint([c - u for c, u in zip(copies, duals, strict=True)])
            x = torch.cholesky_solve(rhs.reshape(g * j, k), self.factor).reshape(g, j, k)
            maps = self._split(x)
            mixed = [_RELAX * b + (1 - _RELAX) * c for b, c in zip(maps, copies, strict=True)]
            new = self._prox([v + u for v, u in zip(mixed, duals, strict=True)], self.rho)
            duals = [u + v - c for u, v, c in zip(duals, mixed, new, strict=True)]
            copies = new
        z = copies[0]
        return self._u(z)

    def _flat(self, u: torch.Tensor) -> torch.Tensor:
        return u.reshape(-1, self.d + 1, u.shape[3])

    def predict(self, u: torch.Tensor) -> torch.Tensor:
        """Clean outputs ``a`` on the unscaled data, ``(n, K)``."""
        return self._fit(self._flat(u))[0] * self.root_n

    def worst_case(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean outputs and ``eps ||m_k||_1``: the outputs' range over each ``eps``-ball."""
        a, m = self._fit(self._flat(u))
        return a * self.root_n, self.eps * m.abs().sum(1) * self.root_n

    def objective(self, u: torch.Tensor) -> float:
        """Worst-case loss (per example) plus ``beta`` times the group norms."""
        a, spread = self.worst_case(u)
        y = self.y * self.root_n
        if self.loss == "hinge":
            fit = (1 - y * a + spread).clamp_min(0).sum() / len(a)
        else:
            fit = 0.5 * ((a - y).abs() + spread).pow(2).sum() / len(a)
        return (fit + self.beta * u.norm(dim=2).sum()).item()

    def max_violation(self, u: torch.Tensor) -> float:
        """Largest robust-cone violation ``max(0, eps ||~u_i||_1 - (2D_i - I) X u_i)``."""
        flat = self._flat(u)
        lhs = torch.einsum("gni,gik->gnk", self.cone[:, :, :self.d + 1], flat) * self.root_n
        rhs = self.eps * flat[:, :self.d].abs().sum(1)[:, None]
        return (rhs - lhs).clamp_min(0).max().item()


@register("rule", "convex-relu-robust",
          paper="Practical Convex Formulation of Robust One-hidden-layer Neural Network Training",
          summary="l_inf-robust two-layer ReLU net from a convex program over sampled patterns.")
class RobustConvexReLU(ConvexReLU):
    """Convex (ADMM) adversarial training of an mlp with one ReLU hidden layer.

    Args:
        eps: ``l_inf`` radius of the perturbations (0: the non-robust program).
        loss: ``hinge`` (classification, one-vs-all on ``+-1``) or ``squared``.
        beta: weight-decay strength ``beta`` of the objective (per-example loss scale).
        rho: ADMM penalty.
        iterations: ADMM iterations.
        n_patterns: sampled patterns ``P``; ``None``: ``width // (2 * outputs)``.
    """

    label: ClassVar[str] = "convex-relu-robust"

    def __init__(self, eps: float = 0.1, loss: Loss = "hinge", beta: float = 1e-3,
                 rho: float = 0.1, iterations: int = 300, n_patterns: int | None = None) -> None:
        if not eps >= 0:
            raise ConfigError(f"{self.label} eps must be >= 0 (the l_inf radius), got {eps}")
        if loss not in get_args(Loss):
            raise ConfigError(f"{self.label} loss must be one of "
                              f"{', '.join(get_args(Loss))}; got {loss!r}")
        super().__init__(beta, rho, iterations, n_patterns)
        self.eps, self.loss = eps, loss

    @override
    def check(self, model: torch.nn.Module) -> None:
        super().check(model)
        hidden, _ = self._layers(model)
        rows = 2 * self.pattern_count(model) * (2 * hidden.in_features + 1)
        if rows > _MAX_SYSTEM:
            raise IncompatibleError(
                f"{self.label}'s dense ADMM system would have {rows} rows (2 * patterns * "
                f"(2 * {hidden.in_features} inputs + 1)), over {_MAX_SYSTEM}; use fewer inputs "
                "(e.g. digits) or a smaller n_patterns")

    @override
    def configure(self, task: Task) -> None:
        if task == "regression" and self.loss == "hinge":
            raise IncompatibleError(f"{self.label} loss 'hinge' is for classification; use "
                                    "loss='squared' for regression")
        super().configure(task)

    @override
    def program(self, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, seed: int
                ) -> RobustConvexProgram:  # type: ignore[override]
        return RobustConvexProgram(x.cpu(), target.cpu(), self.pattern_count(model), self.beta,
                                   self.eps, self.loss, self.rho,
                                   torch.Generator().manual_seed(seed))

    @override
    def targets(self, y: torch.Tensor, outputs: int) -> torch.Tensor:
        """As `ConvexReLU.targets`; one-hot as ``+-1`` for the hinge loss."""
        target = super().targets(y, outputs)
        return 2 * target - 1 if self.loss == "hinge" else target
