"""NoProp denoising chain: T blocks that each take the input ``x`` and a noisy label embedding.

The model of "NoProp: Training Neural Networks without Back-propagation or Forward-propagation"
(Li, Teh and Pascanu, arXiv:2503.24322), discrete-time variant, with MLP blocks. Block ``t``
maps ``(x, z_{t-1})`` to class probabilities and returns their weighted sum of the class
embeddings, a prediction ``u_hat`` of the clean embedding ``u_y``; the head classifies ``z_T``.
It starts as the readout ``z -> embed z`` (a deviation: the paper does not say how it starts,
and from a random start it learns too slowly on small data sets: 79% on digits, seed 1).
The noise schedule ``alpha_bar_0 .. alpha_bar_T`` (``q(z_t | y) = N(sqrt(alpha_bar_t) u_y,
(1 - alpha_bar_t) I)``, rising from pure noise to nearly clean) lives here as a buffer, so a
model carries what its inference needs. It is a `Blocks` (``forward_intermediates`` gives
``z_1 .. z_T``), but its blocks take ``(x, z)`` and do not chain, so it declares the rules that
can train it: ``noprop`` only (registry capability ``rules``, attribute ``trained_by``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError
from nnarena.layers import create_act
from nnarena.models._blocks import Blocks
from nnarena.registry import register

__all__ = ["NoPropBlock", "NoPropNet", "noise_schedule", "noprop_mlp"]

SCHEDULES = ("cosine", "linear")


def noise_schedule(name: str, steps: int, max_signal: float = 0.9999) -> torch.Tensor:
    """``alpha_bar_t`` for ``t = 0 .. steps``: 0 at ``t = 0`` (pure noise), rising to
    ``max_signal`` at ``t = steps``; ``cosine`` is the paper's (Nichol & Dhariwal's, reversed).

    Raises:
        ConfigError: an unknown schedule, naming the valid ones.
    """
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    if name == "cosine":
        offset = 0.008
        alpha_bar = torch.cos(((1 - t) + offset) / (1 + offset) * math.pi / 2) ** 2
    elif name == "linear":
        alpha_bar = t
    else:
        raise ConfigError(f"unknown noise schedule '{name}'; valid: {', '.join(SCHEDULES)}")
    return (alpha_bar.clamp(0.0, max_signal) * (t > 0)).float()


class NoPropBlock(nn.Module):
    """``(x, z) -> softmax(logits) @ embed``: an x branch and a z branch, fused by an MLP."""

    def __init__(self, d_in: int, d_embed: int, n_classes: int, width: int, act: str) -> None:
        super().__init__()
        self.x_branch = nn.Sequential(nn.Flatten(), nn.Linear(d_in, width), create_act(act))
        self.z_branch = nn.Sequential(nn.Linear(d_embed, width), create_act(act))
        self.fuse = nn.Sequential(nn.Linear(2 * width, width), create_act(act),
                                  nn.Linear(width, n_classes))

    def forward(self, x: torch.Tensor, z: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        logits = self.fuse(torch.cat([self.x_branch(x), self.z_branch(z)], dim=1))
        return logits.softmax(dim=1) @ embed


class NoPropNet(Blocks):
    """T denoising blocks, class embeddings ``embed`` (``n_classes x d_embed``), a schedule
    ``alpha_bar`` and a head classifying ``z_T``; ``forward`` runs noise-free inference. Its
    blocks take ``(x, z, embed)``, so only the rules in ``trained_by`` can train it."""

    trained_by: ClassVar[tuple[str, ...]] = ("noprop",)

    def __init__(self, blocks: list[NoPropBlock], head: nn.Module, embed: torch.Tensor,
                 alpha_bar: torch.Tensor, learn_embedding: bool) -> None:
        super().__init__(blocks, head)
        if learn_embedding:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.register_buffer("alpha_bar", alpha_bar)

    def noisy_embedding(self, y: torch.Tensor, t: int, noise: float = 1.0) -> torch.Tensor:
        """A sample of ``q(z_t | y) = N(sqrt(alpha_bar_t) u_y, (1 - alpha_bar_t) I)``."""
        u = self.embed[y]
        a = self.alpha_bar[t]
        return a.sqrt() * u + noise * (1 - a).sqrt() * torch.randn_like(u)

    def infer(self, x: torch.Tensor, sampler: str = "posterior", noise: float = 0.0
              ) -> torch.Tensor:
        """Logits: ``z_0 ~ N(0, noise^2 I)``, then ``z_t`` from block ``t``'s prediction by
        ``sampler`` (``posterior``: the paper's ``a_t u_hat + b_t z_{t-1} + sqrt(c_t) eps``, the
        Gaussian ``q(z_t | z_{t-1}, u_y)`` with ``u_y = u_hat``; ``marginal``: a fresh sample of
        ``q(z_t | u_hat)``), ``eps`` scaled by ``noise``; then the head on ``z_T``."""
        return self.head(self._chain(x, sampler, noise)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.infer(x)

    @override
    def forward_intermediates(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``z_1 .. z_T`` of noise-free inference and the head's output."""
        zs = self._chain(x, "posterior", 0.0)
        return zs[1:], self.head(zs[-1])

    def _chain(self, x: torch.Tensor, sampler: str, noise: float) -> list[torch.Tensor]:
        zs = [noise * torch.randn(x.shape[0], self.embed.shape[1], device=x.device)]
        for t, block in enumerate(self.blocks, start=1):
            u_hat = block(x, zs[-1], self.embed)
            ab_t, ab_prev = self.alpha_bar[t], self.alpha_bar[t - 1]
            eps = noise * torch.randn_like(u_hat)
            if sampler == "marginal":
                zs.append(ab_t.sqrt() * u_hat + (1 - ab_t).sqrt() * eps)
                continue
            alpha = ab_prev / ab_t
            a = ab_t.sqrt() * (1 - alpha) / (1 - ab_prev)
            b = alpha.sqrt() * (1 - ab_t) / (1 - ab_prev)
            c = (1 - ab_t) * (1 - alpha) / (1 - ab_prev)
            zs.append(a * u_hat + b * zs[-1] + c.sqrt() * eps)
        return zs


@register("model", "noprop-mlp", capabilities={"conv": False, "rules": ["noprop"]},
          summary="NoProp-DT denoising chain of MLP blocks, each taking x and a noisy label "
                  "embedding (rule noprop only).")
def noprop_mlp(
    input_shape: tuple[int, ...],
    n_outputs: int,
    steps: int = 10,
    width: int = 256,
    embed_dim: int | None = None,
    learn_embedding: bool = False,
    schedule: str = "cosine",
    act: str = "relu",
) -> NoPropNet:
    """``steps`` NoProp blocks (the paper's T) and a linear head on ``z_T``.

    Args:
        input_shape: shape of one example (flattened).
        n_outputs: number of classes.
        steps: number of blocks T (the paper uses 10).
        width: hidden width of every block's branches and fusion layer.
        embed_dim: dimension of the class embeddings; default ``n_outputs``, one-hot.
        learn_embedding: learn the embeddings jointly (the paper's learned variant) instead
            of keeping them fixed.
        schedule: noise schedule, ``cosine`` (the paper's) or ``linear``.
        act: activation inside the blocks.

    Raises:
        ConfigError: fewer than one step, an embedding narrower than the classes, or an
            unknown schedule.
    """
    if steps < 1:
        raise ConfigError(f"noprop-mlp needs steps >= 1, got {steps}")
    dim = embed_dim or n_outputs
    if dim < n_outputs:
        raise ConfigError(f"noprop-mlp embed_dim {dim} must be >= the {n_outputs} classes")
    embed = torch.eye(n_outputs, dim)
    if dim > n_outputs:  # wider than one-hot: random orthonormal rows
        embed = torch.linalg.qr(torch.randn(dim, n_outputs)).Q.T.contiguous()
    d_in = math.prod(input_shape)
    blocks = [NoPropBlock(d_in, dim, n_outputs, width, act) for _ in range(steps)]
    head = nn.Linear(dim, n_outputs)
    with torch.no_grad():  # starts as the embeddings' readout: z_T ~ u_y is classified already
        head.weight.copy_(embed)
        head.bias.zero_()
    return NoPropNet(blocks, head, embed, noise_schedule(schedule, steps), learn_embedding)
