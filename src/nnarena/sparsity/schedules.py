"""When to prune and to what sparsity: one-shot, gradual (cubic) and iterative schedules.

Times are fractions of the run's training steps (``Trainer.total_steps``), so one schedule fits
every budget. A schedule answers `PruningSchedule.plan`: the steps at which masks are updated and
the sparsity each update reaches.

- ``one-shot``: once, at ``start`` (0: at initialisation, before the first step; 1: after the last
  step, i.e. post-training pruning without retraining).
- ``gradual``: Zhu & Gupta's cubic ramp ``s_t = s (1 - (1 - p)^3)``, ``p`` going from 0 at
  ``start`` to 1 at ``end``, updated every ``every`` steps.
- ``iterative``: ``rounds`` prunings evenly spaced so that ``rounds + 1`` equal training segments
  remain, each keeping ``(1 - s)^(1/rounds)`` of the survivors (iterative magnitude pruning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from nnarena.errors import ConfigError

__all__ = ["PruningSchedule", "ScheduleKind"]

ScheduleKind = Literal["one-shot", "gradual", "iterative"]


@dataclass(frozen=True)
class PruningSchedule:
    """A pruning schedule; see the module docstring for the kinds."""

    kind: ScheduleKind = "one-shot"
    start: float = 0.0
    end: float = 0.75
    every: int = 50
    rounds: int = 3

    def __post_init__(self) -> None:
        if self.kind not in get_args(ScheduleKind):
            raise ConfigError(f"unknown schedule {self.kind!r}; valid: "
                              f"{', '.join(get_args(ScheduleKind))}")
        if not 0.0 <= self.start <= 1.0 or (self.kind == "gradual"
                                                and not self.start <= self.end <= 1.0):
            raise ConfigError(f"schedule needs 0 <= start <= end <= 1, got start={self.start}, "
                              f"end={self.end}")
        if self.every < 1 or self.rounds < 1:
            raise ConfigError(f"schedule every and rounds must be >= 1, got every={self.every}, "
                              f"rounds={self.rounds}")

    def plan(self, total_steps: int, sparsity: float) -> dict[int, float]:
        """``{step: sparsity}``: after ``step`` optimizer steps (0: before the first one)."""
        first = round(self.start * total_steps)
        if self.kind == "one-shot":
            return {first: sparsity}
        if self.kind == "iterative":
            keep = (1.0 - sparsity) ** (1.0 / self.rounds)
            return {round(r * total_steps / (self.rounds + 1)): 1.0 - keep ** r
                    for r in range(1, self.rounds + 1)}
        last = max(round(self.end * total_steps), first + 1)
        steps = [*range(first + self.every, last, self.every), last]
        return {t: sparsity * (1.0 - (1.0 - (t - first) / (last - first)) ** 3) for t in steps}
