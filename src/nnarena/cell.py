"""A cell: dataset x model x rule x trainer settings x seed, as plain data; `run_cell` runs one.

`nnarena train` and the arena call the same `run_cell`; only where the result goes differs.
"""

from __future__ import annotations

import inspect
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

import nnarena
from nnarena import data as data_lib
from nnarena.checkpoint import save_weights, write_json
from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import build
from nnarena.registry import REGISTRY, closest
from nnarena.rules import LearningRule, create_rule
from nnarena.train import Callback, FitResult, JsonlLogger, Trainer

__all__ = ["Cell", "run_cell"]

# Trainer keywords a cell may set; the rest (rule, callbacks, seed) come from the cell itself.
TRAINER_KEYS = tuple(p for p in inspect.signature(Trainer).parameters
                     if p not in ("rule", "callbacks", "seed"))


class Cell(BaseModel):
    """Everything one training run needs, by registry names and keyword arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = "mnist1d"
    dataset_kwargs: dict[str, Any] = {}
    model: str = "mlp"
    model_kwargs: dict[str, Any] = {}
    rule: str = "backprop"
    rule_kwargs: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    seed: int = 0

    def check(self) -> tuple[LearningRule, Trainer]:
        """Validate every name and keyword before any work; return the rule and trainer.

        Raises:
            ConfigError: an unknown name, a bad keyword, or an incompatible combination.
        """
        base = self.dataset.partition(":")[0]
        data_entry = REGISTRY.get("dataset", base)
        data_entry.check_kwargs(self.dataset_kwargs,
                                given=["seed", data_entry.extra.get("arg", "")])
        model_entry = REGISTRY.get("model", self.model)
        model_entry.check_kwargs(self.model_kwargs, given=["input_shape", "n_outputs"])
        layer = self.model_kwargs.get("layer", getattr(model_entry.param("layer"), "default", None))
        if isinstance(layer, str):
            REGISTRY.get("layer", layer).check_kwargs(self.model_kwargs.get("layer_kwargs") or {},
                                                      given=["in_features", "out_features"])
        for key in self.trainer:
            if key not in TRAINER_KEYS:
                near = closest(key, TRAINER_KEYS)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"trainer has no setting '{key}'{hint}; "
                                  f"accepted: {', '.join(TRAINER_KEYS)}")
        rule = create_rule(self.rule, **self.rule_kwargs)
        if model_entry.capabilities.get("conv") and not rule.capabilities.supports_conv:
            raise IncompatibleError(f"rule '{self.rule}' does not support conv layers, and model "
                                    f"'{self.model}' has them; use an mlp model")
        trainer = Trainer(rule, seed=self.seed, **self.trainer)
        return rule, trainer


def run_cell(
    cell: Cell,
    *,
    out_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Run one cell; write ``config.json``, ``metrics.jsonl``, ``result.json`` and
    ``weights.safetensors`` under ``out_dir`` if given.

    Set-up errors (bad names, missing files) raise before training; an exception during training
    is returned as status ``failed`` with a one-line reason, and divergence as ``diverged``.
    """
    rule, trainer = cell.check()
    bundle = data_lib.load(cell.dataset, seed=cell.seed, **cell.dataset_kwargs)
    torch.manual_seed(cell.seed)
    model = build(cell.model, bundle, **cell.model_kwargs)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"cell": cell.model_dump(), "data": bundle.summary(),
                                         "versions": _versions()})
        callbacks = [*callbacks, JsonlLogger(out / "metrics.jsonl")]
    trainer.callbacks = list(callbacks)
    try:
        result = trainer.fit(model, bundle)
    except Exception as err:  # a failing run is a result, not the end of a sweep
        result = FitResult("failed", _one_line(err))
    if out is not None:
        write_json(out / "result.json", result.to_json())
        if result.status != "failed":
            save_weights(out / "weights.safetensors", model, rule)
    return result


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
    return text[:limit]


def _versions() -> dict[str, str]:
    return {"nnarena": nnarena.__version__, "torch": torch.__version__,
            "python": platform.python_version()}
