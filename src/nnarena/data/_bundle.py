"""`DataBundle`, the one shape every dataset takes, and the split helpers loaders share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["DataBundle", "Split", "make_bundle"]

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (float32, ``(N, *input_shape)``) and targets ``y``.

    Classification targets are int64 class indices ``(N,)``; regression targets are float32
    ``(N, n_outputs)``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DataBundle:
    """Train/val/test splits of one dataset plus what a model builder needs to know about it."""

    name: str
    train: Split
    val: Split
    test: Split
    task: Task
    input_shape: tuple[int, ...]
    n_outputs: int
    n_classes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        kind = f"{self.n_classes} classes" if self.n_classes else f"{self.n_outputs} outputs"
        return (f"{self.name}: {self.task}, input {self.input_shape}, {kind}, "
                f"{len(self.train)}/{len(self.val)}/{len(self.test)} train/val/test")


def make_bundle(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: Task,
    seed: int,
    input_shape: tuple[int, ...] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    standardize: Literal["feature", "global", "none"] = "feature",
    test: tuple[np.ndarray, np.ndarray] | None = None,
    meta: dict[str, Any] | None = None,
    standardize_targets: bool = False,
) -> DataBundle:
    """Shuffle with ``seed``, split (stratified for classification) and standardise on train stats.

    Args:
        x: inputs, ``(N, ...)``.
        y: class indices or regression targets.
        task: ``classification`` or ``regression``.
        seed: the split and shuffle seed; the same seed gives the same bundle.
        input_shape: shape of one example (default ``x.shape[1:]``); ``x`` is reshaped to it.
        val_fraction: share of the (non-test) data held out for validation.
        test_fraction: share held out for testing, unless ``test`` is given.
        standardize: per-feature or global zero-mean/unit-variance from the train split, or none.
        test: a fixed test split shipped with the dataset (then only val is carved out of ``x``).
        meta: anything loaders want to record (source, generator arguments).
        standardize_targets: regression only: shift and scale targets by the train split's
            per-output mean and std (recorded as ``target_mean``/``target_std`` in ``meta``), so
            an RMSE is in units of the target's standard deviation.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if task == "classification":
        y = y.astype(np.int64)
        stratify = y
    else:
        y = y.astype(np.float32).reshape(len(y), -1)
        stratify = None
    if test is None:
        rest, test_idx = _split_indices(len(y), test_fraction, rng, stratify)
    else:
        rest, test_idx = np.arange(len(y)), None
    train_idx, val_idx = _split_indices(
        len(rest), val_fraction / (1 - (test_fraction if test is None else 0)), rng,
        None if stratify is None else stratify[rest],
    )
    train_idx, val_idx = rest[train_idx], rest[val_idx]
    x_test, y_test = (x[test_idx], y[test_idx]) if test is None else (
        np.asarray(test[0], np.float32), np.asarray(test[1], y.dtype).reshape(-1, *y.shape[1:]))

    x_train = x[train_idx]
    if standardize == "feature":
        mean, std = x_train.mean(0, keepdims=True), x_train.std(0, keepdims=True)
        std = np.where(std < 1e-8, 1.0, std)
    elif standardize == "global":
        mean, std = x_train.mean(), max(float(x_train.std()), 1e-8)
    else:
        mean, std = 0.0, 1.0

    meta = dict(meta or {})
    y_mean, y_std = 0.0, 1.0
    if standardize_targets and task == "regression":
        y_mean, y_std = y[train_idx].mean(0), y[train_idx].std(0)
        y_std = np.where(y_std < 1e-8, 1.0, y_std)
        meta.update(target_mean=y_mean.tolist(), target_std=y_std.tolist())

    shape = tuple(input_shape) if input_shape is not None else tuple(x.shape[1:])

    def split(xs: np.ndarray, ys: np.ndarray) -> Split:
        xs = ((xs - mean) / std).astype(np.float32).reshape(len(xs), *shape)
        if task == "regression":
            ys = ((ys - y_mean) / y_std).astype(np.float32)
        return Split(torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(ys.copy()))

    if task == "classification":
        n_classes = int(max(y.max(), y_test.max())) + 1
        n_outputs = n_classes
    else:
        n_classes, n_outputs = None, int(y.shape[1])
    return DataBundle(
        name=name,
        train=split(x_train, y[train_idx]),
        val=split(x[val_idx], y[val_idx]),
        test=split(x_test, y_test),
        task=task,
        input_shape=shape,
        n_outputs=n_outputs,
        n_classes=n_classes,
        meta=dict(meta, seed=seed),
    )


def _split_indices(
    n: int, fraction: float, rng: np.random.Generator, stratify: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (keep, held_out) index arrays; per class when ``stratify`` is given."""
    order = rng.permutation(n)
    if stratify is None:
        k = round(n * fraction)
        return np.sort(order[k:]), np.sort(order[:k])
    keep, held = [], []
    for cls in np.unique(stratify):
        idx = order[stratify[order] == cls]
        k = round(len(idx) * fraction)
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))
