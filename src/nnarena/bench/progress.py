"""Live arena progress: a rich bar on a terminal, a plain line per change otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress_printer"]


@contextmanager
def progress_printer(name: str) -> Iterator[Callable[[dict[str, float], int], None]]:
    """Yield a callback ``(counts, total) -> None`` that displays cells done/failed/running, ETA."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        bar = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), console=Console(stderr=True))
        task = bar.add_task(name, total=None, info="")
        with bar:
            yield lambda counts, total: bar.update(task, total=total, completed=counts["done"],
                                                   info=_info(counts, total))
        return
    last: list[str] = []

    def plain(counts: dict[str, float], total: int) -> None:
        line = f"{name}: {int(counts['done'])}/{total} cells {_info(counts, total)}"
        if not last or line.split(" eta")[0] != last[-1].split(" eta")[0]:
            print(line, file=sys.stderr, flush=True)
            last.append(line)

    yield plain


def _info(counts: dict[str, float], total: int) -> str:
    done, running = int(counts["done"]), int(counts["running"])
    text = f"failed {int(counts['failed'])} · running {running} · waiting {int(counts['waiting'])}"
    if done and running:
        per_cell = counts["seconds"] / done
        left = (total - done) * per_cell / max(running, 1)
        text += f" · eta {time.strftime('%M:%S', time.gmtime(left))}"
    return text
