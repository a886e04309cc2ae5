"""Sparsity: masks, allocations, schedules and the methods, by registry name.

``create_sparsifier("global-magnitude", sparsity=0.9)`` gives a trainer callback; a cell's
``sparsity`` axis does the same by name. `SparseLinear` / `to_sparse_inference` run pruned
Linear layers through sparse kernels; `SparsePropLinear` trains with a backward that skips zeros.
"""

from __future__ import annotations

from nnarena.sparsity import autosparse as autosparse
from nnarena.sparsity import bip as bip
from nnarena.sparsity import dsnot as dsnot
from nnarena.sparsity import dynamic as dynamic
from nnarena.sparsity import ftwt as ftwt
from nnarena.sparsity import lottery as lottery
from nnarena.sparsity import magnitude as magnitude
from nnarena.sparsity import nm as nm
from nnarena.sparsity import polarization as polarization
from nnarena.sparsity import random_pruning as random_pruning
from nnarena.sparsity import wanda as wanda
from nnarena.sparsity.base import Sparsifier as Sparsifier
from nnarena.sparsity.base import create_sparsifier as create_sparsifier
from nnarena.sparsity.kernels import SparseLinear as SparseLinear
from nnarena.sparsity.kernels import to_sparse_inference as to_sparse_inference
from nnarena.sparsity.masks import finalize as finalize
from nnarena.sparsity.schedules import PruningSchedule as PruningSchedule
from nnarena.sparsity.sparseprop import SparsePropLinear as SparsePropLinear

__all__ = [
    "PruningSchedule",
    "SparseLinear",
    "SparsePropLinear",
    "Sparsifier",
    "create_sparsifier",
    "finalize",
    "to_sparse_inference",
]
