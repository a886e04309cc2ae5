"""MLP-KAN: a mixture of MLP experts and KAN experts behind a learned top-k router.

Paper: "MLP-KAN: Unifying Deep Representation and Function Learning" (arXiv 2410.03027).

Implemented: ``n_mlp`` MLP experts (``Linear -> act -> Linear`` with ``hidden`` units, for
representation learning) and ``n_kan`` KAN experts (two KAN layers ``in -> hidden // 2 -> out`` of
any registered KAN basis, for function learning; the paper uses FasterKAN, whose basis is closest to
``kan-rbf``, the default). A linear router scores the experts for every example (or token: all
leading dims are flattened); each one goes to its ``top_k`` best experts, weighted by the softmax
of their scores (which sum to 1), and only those experts run on it.

Deviations: the reference's top-2 gating also has expert capacity limits, a random second-expert
policy and a load-balancing loss; here routing is plain deterministic top-k with no capacity limit
and no auxiliary loss (the trainer has no hook for one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nnarena.errors import ConfigError
from nnarena.layers._act import create_act
from nnarena.layers._factory import create_layer
from nnarena.registry import register

__all__ = ["MLPKAN"]


@register("layer", "mlp-kan", paper="MLP-KAN: Unifying Deep Representation and Function Learning",
          summary="Mixture of MLP and KAN experts behind a learned top-k router.",
          capabilities={"nonlinear": True, "conv": False})
class MLPKAN(nn.Module):
    """Mixture-of-experts layer with MLP and KAN experts and soft top-k routing.

    Args:
        in_features: input features.
        out_features: output features.
        n_mlp: MLP experts.
        n_kan: KAN experts.
        top_k: experts each example is sent to.
        hidden: hidden width of the MLP experts (KAN experts use half); ``None``:
            ``max(in_features, out_features)``.
        act: activation inside the MLP experts.
        kan: registry name of the KAN experts' layer.
        kan_kwargs: keyword arguments for the KAN experts' layers.
    """

    nonlinear = True  # the experts carry their own nonlinearity

    def __init__(self, in_features: int, out_features: int, n_mlp: int = 2, n_kan: int = 2,
                 top_k: int = 2, hidden: int | None = None, act: str = "gelu",
                 kan: str = "kan-rbf", kan_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        n_experts = n_mlp + n_kan
        if n_mlp < 0 or n_kan < 0 or n_experts == 0:
            raise ConfigError(f"mlp-kan needs at least one expert, got n_mlp={n_mlp}, "
                              f"n_kan={n_kan}")
        if not 1 <= top_k <= n_experts:
            raise ConfigError(f"mlp-kan top_k={top_k} must be in 1..{n_experts} (the experts)")
        self.in_features, self.out_features, self.top_k = in_features, out_features, top_k
        hidden = max(in_features, out_features) if hidden is None else hidden
        kw = kan_kwargs or {}
        mlps = [nn.Sequential(nn.Linear(in_features, hidden), create_act(act),
                              nn.Linear(hidden, out_features)) for _ in range(n_mlp)]
        kan_hidden = max(hidden // 2, 1)
        kans = [nn.Sequential(create_layer(kan, in_features, kan_hidden, **kw),
                              create_layer(kan, kan_hidden, out_features, **kw))
                for _ in range(n_kan)]
        self.experts = nn.ModuleList(mlps + kans)
        self.router = nn.Linear(in_features, n_experts, bias=False)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights ``(N, in) -> (N, n_experts)``: ``top_k`` non-zeros per row, sum 1."""
        scores = self.router(x)
        top, index = scores.topk(self.top_k, dim=-1)
        return torch.zeros_like(scores).scatter(-1, index, torch.softmax(top, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        gates = self.route(x)
        out = x.new_zeros(len(x), self.out_features)
        for e, expert in enumerate(self.experts):
            rows = gates[:, e].nonzero().squeeze(1)
            if len(rows):
                out = out.index_add(0, rows, expert(x[rows]) * gates[rows, e, None])
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"top_k={self.top_k}"
