"""Numbers for people: bytes in KiB/MiB, 3 significant digits, ratios as ``1.23x``, deltas."""

from __future__ import annotations

import math

__all__ = ["DASH", "count", "delta", "metric", "nbytes", "percent", "ratio", "scale", "seconds"]

DASH = "—"
_BYTES = ((2.0**30, " GiB"), (2.0**20, " MiB"), (2.0**10, " KiB"), (1.0, " B"))
_SECONDS = ((1.0, " s"), (1e-3, " ms"), (1e-6, " µs"))
_COUNT = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))
_KINDS = {"bytes": _BYTES, "seconds": _SECONDS}


def nbytes(mean: float | None, std: float | None = None) -> str:
    """``1.23 ± 0.05 MiB``."""
    return _scaled(mean, std, _BYTES)


def seconds(mean: float | None, std: float | None = None) -> str:
    """``1.23 ± 0.05 s`` (``ms`` / ``µs`` below a second)."""
    return _scaled(mean, std, _SECONDS)


def count(mean: float | None, std: float | None = None) -> str:
    """``12.3k``, ``4.56M``."""
    return _scaled(mean, std, _COUNT)


def metric(mean: float | None, std: float | None = None) -> str:
    """A task metric to 4 significant digits: ``0.9123 ± 0.0041``."""
    return _scaled(mean, std, ((1.0, ""),), digits=4)


def ratio(value: float | None) -> str:
    """``1.23x``."""
    if value is None or not math.isfinite(value):
        return _bad(value)
    return f"{value:,.0f}x" if abs(value) >= 100 else f"{value:.2f}x"


def percent(value: float | None) -> str:
    """A fraction as ``90.0%``."""
    if value is None or not math.isfinite(value):
        return _bad(value)
    return f"{100 * value:.1f}%"


def delta(value: float | None) -> str:
    """A difference with its sign: ``+0.0123``, ``-1.5``."""
    if value is None or not math.isfinite(value):
        return _bad(value)
    return ("-" if value < 0 else "+") + _num(abs(value), 3)


def scale(value: float, kind: str) -> tuple[float, str]:
    """The divisor and unit (``"MiB"``, ``"ms"``) for showing ``value`` of kind bytes/seconds."""
    factor, suffix = _unit(value, _KINDS[kind])
    return factor, suffix.strip()


def _unit(value: float, units: tuple[tuple[float, str], ...]) -> tuple[float, str]:
    if value == 0:
        return next(u for u in units if u[0] == 1.0)
    return next((u for u in units if abs(value) >= u[0]), units[-1])


def _scaled(mean: float | None, std: float | None, units: tuple[tuple[float, str], ...],
            digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return _bad(mean)
    factor, suffix = _unit(mean, units)
    text = _num(mean / factor, digits)
    if std is not None:
        text += " ± " + (_num(std / factor, 2) if math.isfinite(std) else _bad(std))
    return text + suffix


def _num(value: float, digits: int) -> str:
    """``digits`` significant digits, trailing zeros kept: ``2.00``, ``0.50``, ``800``, ``0``."""
    if value == 0:
        return "0"
    text = f"{value:#.{digits}g}"
    return f"{value:,.0f}" if "e+" in text else text.rstrip(".")


def _bad(value: float | None) -> str:
    return DASH if value is None else str(value)
