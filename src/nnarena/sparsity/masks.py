"""Binary weight masks applied through ``torch.nn.utils.parametrize``.

A masked tensor is ``module.<name> = original * mask``: the optimizer updates ``original``, every
forward sees the masked product, and the mask is a buffer, so it travels with ``state_dict()``
(``<module>.parametrizations.<name>.original`` and ``....0.mask``). `add_masks_for_state` re-creates
the parametrizations a saved state needs before ``load_state_dict``; `finalize` removes them,
leaving plain tensors with exact zeros.

Which tensors can be masked: ``weight`` of Linear, Conv and Embedding layers, and whatever a layer
lists in its ``sparse_params`` class attribute (every KAN layer: ``coef`` and ``base_weight``).
Empty tensors are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "Mask",
    "Target",
    "add_masks_for_state",
    "apply_masks",
    "count_nonzero",
    "finalize",
    "get_mask",
    "masked_targets",
    "prunable_targets",
    "set_mask",
]

_DENSE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
_MASK_KEY = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.\d+\.mask$")


class Mask(nn.Module):
    """The parametrization ``w -> w * mask`` with ``mask`` a (float 0/1) buffer."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


@dataclass(frozen=True)
class Target:
    """One maskable tensor: ``module.<param>``, named ``<module path>.<param>``."""

    name: str
    module: nn.Module
    param: str

    @property
    def original(self) -> torch.Tensor:
        """The trained tensor (the un-masked values when a mask is on)."""
        if parametrize.is_parametrized(self.module, self.param):
            return self.module.parametrizations[self.param].original
        return getattr(self.module, self.param)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (masked) tensor."""
        return getattr(self.module, self.param)

    @property
    def mask(self) -> torch.Tensor | None:
        return get_mask(self.module, self.param)

    def numel(self) -> int:
        return self.original.numel()


def _sparse_params(module: nn.Module) -> tuple[str, ...]:
    names = getattr(module, "sparse_params", None)
    if names is not None:
        return tuple(names)
    return ("weight",) if isinstance(module, _DENSE_LAYERS) else ()


def prunable_targets(model: nn.Module) -> list[Target]:
    """Every maskable, non-empty tensor of ``model``, in module order."""
    targets = []
    for path, module in model.named_modules():
        for param in _sparse_params(module):
            if parametrize.is_parametrized(module, param):
                tensor = module.parametrizations[param].original
            else:
                tensor = getattr(module, param, None)
            if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                targets.append(Target(f"{path}.{param}" if path else param, module, param))
    return targets


def masked_targets(model: nn.Module) -> list[Target]:
    """The targets of ``model`` that carry a mask now."""
    return [t for t in prunable_targets(model) if t.mask is not None]


def get_mask(module: nn.Module, param: str) -> torch.Tensor | None:
    """The mask on ``module.<param>``, or ``None``."""
    if not parametrize.is_parametrized(module, param):
        return None
    for p in module.parametrizations[param]:
        if isinstance(p, Mask):
            return p.mask
    return None


def set_mask(target: Target, mask: torch.Tensor) -> None:
    """Put ``mask`` (bool or 0/1, the tensor's shape) on ``target``, adding the parametrization
    on first use; masked-out values of the original are zeroed too, so a weight regrown later
    starts at zero."""
    original = target.original
    if mask.shape != original.shape:
        raise ValueError(f"mask for {target.name} has shape {tuple(mask.shape)}, "
                         f"the tensor {tuple(original.shape)}")
    mask = mask.to(device=original.device, dtype=original.dtype)
    current = target.mask
    with torch.no_grad():
        if current is None:
            parametrize.register_parametrization(target.module, target.param, Mask(mask))
        else:
            original.mul_(current)  # values masked until now restart from zero if regrown
            current.copy_(mask)
        target.original.mul_(mask)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set the masks named by target name (`set_mask` for each); unknown names raise."""
    targets = {t.name: t for t in prunable_targets(model)}
    for name, mask in masks.items():
        if name not in targets:
            raise KeyError(f"no maskable tensor {name!r}; maskable: {', '.join(targets)}")
        set_mask(targets[name], mask)


def count_nonzero(model: nn.Module) -> tuple[int, int]:
    """``(nonzero, total)`` over the effective values of every maskable tensor."""
    nonzero = total = 0
    with torch.no_grad():
        for t in prunable_targets(model):
            nonzero += int(torch.count_nonzero(t.weight))
            total += t.numel()
    return nonzero, total


def finalize(model: nn.Module) -> nn.Module:
    """Remove every mask parametrization, leaving plain tensors with the zeros baked in."""
    for t in masked_targets(model):
        parametrize.remove_parametrizations(t.module, t.param, leave_parametrized=True)
    return model


def add_masks_for_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Add the (all-ones) masks a saved ``state`` has, so ``load_state_dict`` fits it."""
    for key in state:
        match = _MASK_KEY.match(key)
        if match is None:
            continue
        module, param = model.get_submodule(match[1] or ""), match[2]
        if get_mask(module, param) is None:
            original = getattr(module, param)
            parametrize.register_parametrization(module, param, Mask(torch.ones_like(original)))

