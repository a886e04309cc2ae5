"""Training: the `Trainer`, callbacks, optimizers/schedules and run metrics."""

from __future__ import annotations

from nnarena.train.callbacks import Callback as Callback
from nnarena.train.callbacks import JsonlLogger as JsonlLogger
from nnarena.train.callbacks import default_progress as default_progress
from nnarena.train.trainer import FitResult as FitResult
from nnarena.train.trainer import Trainer as Trainer

__all__ = ["Callback", "FitResult", "JsonlLogger", "Trainer", "default_progress"]
