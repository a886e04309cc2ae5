"""nnarena: neural-network methods from recent papers behind one API, compared in an arena."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
