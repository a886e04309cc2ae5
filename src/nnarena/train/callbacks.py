"""Trainer callbacks: no-op hooks called in list order by the Trainer's one dispatcher.

Every hook takes ``(trainer, model, ...)``. Order is the order of the ``callbacks`` list; nothing
is reordered behind the user's back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
from torch import nn

if TYPE_CHECKING:
    from nnarena.train.trainer import FitResult, Trainer

__all__ = ["Callback", "JsonlLogger", "ProgressBar", "default_progress"]


class Callback:
    """Base callback: each hook does nothing by default."""

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        """Before the first step, after the rule is prepared and the optimizer built."""

    def on_step_start(self, trainer: Trainer, model: nn.Module) -> None:
        """Before ``zero_grad`` and ``rule.step``."""

    def on_after_backward(self, trainer: Trainer, model: nn.Module) -> None:
        """After ``rule.step`` filled ``.grad``, before clipping."""

    def on_before_optimizer_step(self, trainer: Trainer, model: nn.Module,
                                 optimizer: torch.optim.Optimizer) -> None:
        """After clipping, right before ``optimizer.step()``."""

    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        """After ``optimizer.step()`` and the scheduler; ``logs`` is what ``rule.step`` returned."""

    def on_epoch_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, Any]) -> None:
        """After each epoch's validation; ``logs`` holds epoch, train loss, val metrics."""

    def on_fit_end(self, trainer: Trainer, model: nn.Module, result: FitResult) -> None:
        """Once, with the final result (whatever its status)."""


class JsonlLogger(Callback):
    """Appends each epoch's logs as one JSON line to ``path`` (flushed, so nothing is lost)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def on_epoch_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(logs) + "\n")


class ProgressBar(Callback):
    """A rich progress bar over the training budget (steps), with the last loss and val metric."""

    def __init__(self, description: str = "train") -> None:
        self.description = description
        self._progress: Any = None

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeRemainingColumn(),
                                  TextColumn("{task.fields[status]}"), transient=True,
                                  console=Console(stderr=True))
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=trainer.total_steps,
                                             status="")

    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        self._progress.update(self._task, advance=1, status=f"loss {logs['loss']:.4f}")

    def on_fit_end(self, trainer: Trainer, model: nn.Module, result: FitResult) -> None:
        self._progress.stop()


class PlainProgress(Callback):
    """One line per epoch, for logs and pipes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def on_epoch_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, Any]) -> None:
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in logs.items())
        print(shown, file=self.stream, flush=True)


def default_progress(stream: TextIO | None = None) -> Callback:
    """A progress bar on a terminal, plain epoch lines otherwise."""
    stream = stream or sys.stderr
    return ProgressBar() if stream.isatty() else PlainProgress(stream)
