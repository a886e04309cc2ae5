"""Weights as safetensors, everything else as JSON. Nothing is pickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nnarena.errors import DataError
from nnarena.rules import LearningRule
from nnarena.sparsity.masks import add_masks_for_state

__all__ = ["load_weights", "save_weights", "write_json"]


def save_weights(path: str | Path, model: nn.Module, rule: LearningRule | None = None) -> None:
    """Write the model's state (``model.*``) and the rule's own state (``rule.*``)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if rule is not None:
        tensors.update({f"rule.{k}": v for k, v in rule.state_dict().items()})
    # safetensors refuses shared storage; clones make each entry independent.
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(path))


def load_weights(path: str | Path, model: nn.Module, rule: LearningRule | None = None) -> None:
    """Load what `save_weights` wrote into ``model`` (and ``rule``), strictly."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such weights file (expected a .safetensors file)")
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a safetensors file ({err})") from err
    state = _strip(tensors, "model.")
    add_masks_for_state(model, state)
    model.load_state_dict(state)
    if rule is not None:
        rule.load_state_dict(_strip(tensors, "rule."))


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)
