"""Local learning with auxiliary networks: gradient-isolated blocks, each with its own local loss.

Rule ``local`` ("Greedy Layerwise Learning Can Scale to ImageNet", Belilovsky et al., ICML 2019,
arXiv 1812.11446): every block of a `Blocks` model runs on the previous block's output
*detached*; its output goes through the block's own auxiliary network to a local loss (the task
criterion against ``y``), backpropagated at once into the block and its auxiliary network only;
the model head is trained with the true loss on the detached last features. The loop is
`run_blockwise`; auxiliary networks are chosen by name with ``aux`` (see `nnarena.rules.aux_nets`)
and live in ``rule.owned``, so they are optimised and checkpointed. Deviation: every block is
updated at every step (as in the same authors' Decoupled Greedy Learning and the later papers),
not one block after another, each trained to convergence. In all four, the last block (which the
papers train through the model head) has an auxiliary network too, since the head learns on
detached features.

``auglocal``, ``man`` and ``infopro`` are ``local`` with that paper's auxiliary networks and
defaults, registered under their own names and paper titles.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from typing_extensions import override

from nnarena.models import Blocks
from nnarena.registry import register
from nnarena.rules.aux_nets import Probe, create_aux_builder
from nnarena.rules.base import LearningRule, RuleCapabilities
from nnarena.rules.blockwise import run_blockwise

__all__ = ["MAN", "AugLocal", "InfoPro", "Local"]


@register("rule", "local", paper="Greedy Layerwise Learning Can Scale to ImageNet",
          summary="Gradient-isolated blocks, each trained through its own auxiliary network.")
class Local(LearningRule):
    """Local learning: one auxiliary network and local loss per block, no cross-block gradient.

    Args:
        aux: auxiliary network family: ``linear`` (greedy, the default), ``infopro``,
            ``auglocal`` or ``man``.
        aux_kwargs: options of that family (e.g. ``{"depth": 3}`` for ``auglocal``).

    Raises:
        ConfigError: an unknown ``aux`` or a bad option, naming the valid ones.
    """

    capabilities = RuleCapabilities(needs_blocks=True)

    def __init__(self, aux: str = "linear", aux_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.builder = create_aux_builder(aux, **(aux_kwargs or {}))

    @override
    def prepare(self, model: nn.Module, example_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        blocks = cast(Blocks, model)  # `check` ran first
        probe = Probe.of(blocks, example_batch[0])
        self.owned["aux"] = nn.ModuleList(self.builder.build(blocks, probe))

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        if "aux" not in self.owned:
            raise RuntimeError(f"rule '{self.name}': call prepare(model, batch) before step")
        aux = self.owned["aux"]
        _, losses = run_blockwise(model, x, lambda i, h: aux[i].loss(h, x, y, self.criterion),
                                  head=lambda out: self.criterion(out, y))
        for net in aux:
            net.after_step(model)
        local = losses[:-1]
        return {"loss": losses[-1], "local_loss": sum(local) / max(len(local), 1)}


@register("rule", "auglocal",
          paper="Scaling Supervised Local Learning with Augmented Auxiliary Networks",
          summary="Local learning whose auxiliary networks are fresh copies of sampled later "
                  "blocks.")
class AugLocal(Local):
    """AugLocal: ``local`` with ``aux="auglocal"``.

    Args:
        depth: later blocks copied into the first block's auxiliary network.
        shrink: fraction of ``depth - 1`` shed linearly by the last but one block.
    """

    def __init__(self, depth: int = 3, shrink: float = 0.5) -> None:
        super().__init__("auglocal", {"depth": depth, "shrink": shrink})


@register("rule", "man", paper="Momentum Auxiliary Network for Supervised Local Learning",
          summary="Local learning whose auxiliary network is an EMA copy of the next block plus "
                  "learnable biases.")
class MAN(Local):
    """MAN: ``local`` with ``aux="man"``.

    Args:
        momentum: EMA momentum of the auxiliary copies of the next blocks.
    """

    def __init__(self, momentum: float = 0.995) -> None:
        super().__init__("man", {"momentum": momentum})


@register("rule", "infopro",
          paper="Revisiting Locally Supervised Learning: an Alternative to End-to-end Training",
          summary="Local learning with a classifier plus an input-reconstruction loss per block.")
class InfoPro(Local):
    """InfoPro: ``local`` with ``aux="infopro"``.

    Args:
        recon: reconstruction weight at the first and the last block.
        ce: classification weight at the first and the last block.
        hidden: hidden width of each block's classifier.
    """

    def __init__(self, recon: tuple[float, float] = (5.0, 0.0),
                 ce: tuple[float, float] = (0.5, 1.0), hidden: int = 128) -> None:
        super().__init__("infopro", {"recon": recon, "ce": ce, "hidden": hidden})
