"""SparseProp: a linear layer trained with a fixed sparse weight, forward and backward sparse.

"SparseProp: Efficient Sparse Backpropagation for Faster Training of Neural Networks"
(arXiv:2302.04852). The weight ``W`` (out, in) keeps a fixed pattern; only its stored values are
parameters, so masked entries are exactly zero by construction and an optimizer moves the rest.
For ``Y = X W^T + b`` with ``X`` (batch, in):

- forward: ``Y`` from the CSR of ``W`` and ``X^T`` (`kernels.spmm`);
- ``dX = dY W``: the same kernel on the CSR of ``W^T``, precomputed once with a permutation into
  ``W``'s values, so values are never copied;
- ``dW`` only at the stored entries: ``dW[i, j] = sum_b dY[b, i] X[b, j]`` (`kernels.sddmm`), the
  gradient of the values; ``db = sum_b dY[b, :]``.

Our kernels and layouts are our own (``X`` and ``dY`` are transposed once per step so every stored
entry is a contiguous AXPY or dot over the batch); convolutions are not covered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from nnarena.errors import ConfigError
from nnarena.sparsity.kernels import (
    Backend,
    check_backend,
    check_weight,
    sddmm,
    spmm,
    transpose,
)

__all__ = ["SparsePropLinear"]


class _Pattern(nn.Module):
    """Index buffers of a fixed (out, in) pattern: CSR of ``W`` and of ``W^T`` (with ``perm``)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        out_features, in_features = mask.shape
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: the order of the values
        perm = torch.argsort(cols, stable=True)  # column-major order, rows ascending per column
        self.register_buffer("crow", _starts(rows, out_features))
        self.register_buffer("col", cols.contiguous())
        self.register_buffer("t_crow", _starts(cols, in_features))
        self.register_buffer("t_col", rows[perm].contiguous())
        self.register_buffer("t_perm", perm.contiguous())


def _starts(index: torch.Tensor, n: int) -> torch.Tensor:
    """CSR row starts for sorted row ``index`` over ``n`` rows."""
    return torch.cat([index.new_zeros(1), torch.bincount(index, minlength=n).cumsum(0)])


class _SparsePropFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor | None, pattern: _Pattern, backend: Backend) -> torch.Tensor:
        xt = transpose(x, backend=backend)
        ctx.save_for_backward(xt, values)
        ctx.pattern, ctx.backend = pattern, backend
        return spmm(pattern.crow, pattern.col, values, xt, bias, backend=backend)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xt, values = ctx.saved_tensors
        p, backend = ctx.pattern, ctx.backend
        gyt = transpose(gy, backend=backend)
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            gx = spmm(p.t_crow, p.t_col, values, gyt, perm=p.t_perm, backend=backend)
        if ctx.needs_input_grad[1]:
            gv = sddmm(p.crow, p.col, gyt, xt, backend=backend)
        if ctx.needs_input_grad[2]:
            gb = gy.sum(0)
        return gx, gv, gb, None, None


class SparsePropLinear(nn.Module):
    """Linear layer with a fixed sparse weight: only the stored values are trained (SparseProp).

    Args:
        weight: (out, in) initial weight.
        bias: (out,) initial bias, or ``None``.
        mask: (out, in) pattern to keep (bool or 0/1); by default the nonzeros of ``weight``.
            Entries of ``weight`` outside it are dropped.
        backend: ``"auto"`` (C++ kernels where they run, else torch), ``"cpp"`` or ``"torch"``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, *, backend: Backend = "auto") -> None:
        super().__init__()
        check_weight(weight)
        check_backend(backend)
        w = weight.detach()
        if mask is not None and mask.shape != w.shape:
            raise ConfigError(f"mask shape {tuple(mask.shape)} differs from the weight's "
                              f"{tuple(w.shape)}")
        keep = (w != 0) if mask is None else mask.to(device=w.device, dtype=torch.bool)
        self.out_features, self.in_features = w.shape
        self.backend = backend
        self.pattern = _Pattern(keep)
        self.values = nn.Parameter(w[keep].clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None, *,
                   backend: Backend = "auto") -> SparsePropLinear:
        """From ``linear``'s effective weight (a parametrized mask is applied) and bias."""
        return cls(linear.weight, linear.bias, mask, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features or x.dtype != self.values.dtype:
            raise ValueError(f"expected input (..., {self.in_features}) of {self.values.dtype}, "
                             f"got {tuple(x.shape)} of {x.dtype}")
        y = _SparsePropFunction.apply(x.reshape(-1, self.in_features), self.values, self.bias,
                                      self.pattern, self.backend)
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def mask(self) -> torch.Tensor:
        """The (out, in) bool pattern of stored entries."""
        return self.to_dense(torch.ones_like(self.values, dtype=torch.bool))

    def to_dense(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (out, in) weight, differentiable in the values (or ``values`` scattered)."""
        values = self.values if values is None else values
        rows = torch.repeat_interleave(self.pattern.crow.diff())
        dense = values.new_zeros(self.out_features, self.in_features)
        return dense.index_put((rows, self.pattern.col), values)

    @property
    def weight(self) -> torch.Tensor:
        """The dense masked weight (built on each access)."""
        return self.to_dense()

    def extra_repr(self) -> str:
        density = self.values.numel() / (self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, stored={density:.3f}, backend={self.backend}")
