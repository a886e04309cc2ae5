"""Exceptions raised by nnarena.

Each also subclasses the fitting builtin, so callers that catch ``ValueError`` or ``OSError`` keep
working. Messages are one line: the bad value, the valid choices, the fix.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "IncompatibleError",
    "NNArenaError",
    "UnknownNameError",
]


class NNArenaError(Exception):
    """Base class of every error nnarena raises on purpose."""


class ConfigError(NNArenaError, ValueError):
    """A configuration value is invalid (bad parameter, bad type, bad range)."""


class UnknownNameError(ConfigError):
    """A registry name does not exist."""


class IncompatibleError(ConfigError):
    """Components that exist each on their own cannot be combined (e.g. a rule and a model)."""


class DataError(NNArenaError, ValueError):
    """A dataset cannot be loaded: missing, truncated or wrongly formatted file."""
