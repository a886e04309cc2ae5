"""B-spline KAN layer from "KAN: Kolmogorov-Arnold Networks" (arXiv 2404.19756), with the basis in
the matrix form of "MatrixKAN: Parallelized Kolmogorov-Arnold Network" (arXiv 2502.07176).

Every edge is ``phi(x) = w_b silu(x) + sum_j c_j B_j(x)``, ``B_j`` the order-``k`` B-splines on a
per-feature grid of ``G`` intervals extended by ``k`` knots on each side (``G + k`` per edge).

Matrix form: on knot interval ``m`` only ``B_{m-k} .. B_m`` are nonzero, and there they are
polynomials in the local coordinate ``u = (x - t_m) / (t_{m+1} - t_m)``: the basis is the power
vector ``[1, u, ..., u^k]`` times the interval's ``(k+1) x (k+1)`` matrix, its ``k + 1`` values
placed at columns ``m-k .. m``. Here each matrix is stored already placed (zeros elsewhere), so
after the interval lookup one `torch.nn.functional.embedding_bag` (a fused gather and weighted sum,
the powers as weights) multiplies and places at once, writing the basis in a single pass. The
derivative in ``x`` is the same bag weighted by the derivative of the power vector, over the
interval width, in a hand-written backward that saves only the interval index and ``u``.

Deviations from MatrixKAN: it uses one basis matrix for every interval, which is exact only on a
uniform grid and wrong once grid updates make the knots uneven. Here the matrices are per feature
and per interval, built once in float64 from the actual knots (the Cox-de Boor recursion run on
polynomial coefficients) and rebuilt whenever the grid changes. On a grid that is uniform (to the
rounding of its dtype) all features share their matrices, so the lookup is a floor instead of a
knot search and one feature's small table serves all. Basis functions that would need knots beyond
the grid are dropped, and inputs outside the extended grid get an all-zero basis (the base branch
carries them), as in the KAN paper.

Grid tools (the KAN paper's grid update and grid extension): `KANLinear.update_grid` moves the
knots to the data (quantiles blended with a uniform grid) and `KANLinear.extend_grid` refines
them; both refit the coefficients by least squares so the layer keeps its function. The refit is
exact when the new knots nest the old ones (extension by a multiple), else as close as the new
knots allow: on a cubic G = 5 grid smooth edges (``0.5 sin(a x + b)``, ``a <= 1.5``) move by
< 1e-3 and random initial coefficients by up to ~0.1 (order 7: ~1e-5 and ~1e-4).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnarena.layers.kan._base import KANLayer
from nnarena.layers.kan._register import register_kan
from nnarena.testing.kan_reference import cox_de_boor

__all__ = ["KANLinear", "bspline_basis", "interval_matrices", "is_uniform"]

_KAN_PAPER = "KAN: Kolmogorov-Arnold Networks"
_MATRIXKAN_PAPER = "MatrixKAN: Parallelized Kolmogorov-Arnold Network"


def interval_matrices(grid: torch.Tensor, spline_order: int) -> torch.Tensor:
    """Per-feature, per-interval polynomial coefficients of the B-splines, in float64.

    Args:
        grid: increasing knots ``(in, M)`` (``M = G + 2k + 1``).
        spline_order: spline order ``k``.

    Returns:
        ``(in, M + 1, k + 1, G + k)``. Slot ``s`` in ``1 .. M - 1`` is interval ``m = s - 1``,
        ``[t_m, t_{m+1})``: its entry ``[p, j]`` is the coefficient of ``u^p`` in ``B_j``. Only
        columns ``m - k .. m`` can be nonzero: the interval's ``(k + 1) x (k + 1)`` matrix, placed
        at the basis functions it gives (those that would need knots beyond the grid dropped).
        Slots ``0`` and ``M`` (outside the knots) and zero-width intervals are zero.
    """
    k = spline_order
    t = grid.double()
    n_in, n_knots = t.shape
    n_intervals = n_knots - 1
    m = torch.arange(n_intervals, device=t.device)
    j = m[:, None] - k + torch.arange(k + 1, device=t.device)  # basis index of each column
    # Repeat the end knots so B_j's knots t_j .. t_{j+k+1} can be indexed for every column; the
    # columns this touches are dropped below, and the valid ones never read the padding.
    padded = torch.cat([t[:, :1].expand(n_in, k), t, t[:, -1:].expand(n_in, k + 1)], 1)

    def knot(offset: int) -> torch.Tensor:  # t_{j + offset}: (in, intervals, k + 1)
        return padded[:, j + offset + k]

    left = t[:, :-1, None]
    width = (t[:, 1:] - t[:, :-1])[..., None]
    # coef[..., r, p]: coefficient of u^p in the degree-d B-spline of column r; degree 0 is the
    # indicator of the interval itself (column k).
    coef = t.new_zeros(n_in, n_intervals, k + 1, k + 1)
    coef[..., k, 0] = 1.0
    for d in range(1, k + 1):
        # B_{j,d} = (x - t_j) / (t_{j+d} - t_j) B_{j,d-1} + (t_{j+d+1} - x) / (t_{j+d+1} - t_{j+1})
        # B_{j+1,d-1}, with x = t_m + width u; 0 / 0 = 0 for repeated knots.
        rise, fall = knot(d) - knot(0), knot(d + 1) - knot(1)
        a1, b1 = _safe_div(left - knot(0), rise), _safe_div(width, rise)
        a2, b2 = _safe_div(knot(d + 1) - left, fall), _safe_div(-width, fall)
        nxt = torch.cat([coef[..., 1:, :], torch.zeros_like(coef[..., :1, :])], -2)
        coef = (a1[..., None] * coef + b1[..., None] * _times_u(coef)
                + a2[..., None] * nxt + b2[..., None] * _times_u(nxt))
    coef = coef * (width > 0)[..., None]
    # Column r of interval m is B_{m-k+r}: lay each interval's matrix along a diagonal of a grid
    # padded by k columns on the left, then cut the padding (and the missing B_j) away.
    wide = t.new_zeros(n_in, n_intervals, k + 1, n_intervals + k)
    for r in range(k + 1):
        wide.diagonal(r, 1, 3).copy_(coef[..., r, :].transpose(1, 2))
    placed = wide[..., k:n_knots - 1]
    return F.pad(placed, (0, 0, 0, 0, 1, 1))


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den != 0, num / den, 0.0)


def _times_u(coef: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(coef[..., :1]), coef[..., :-1]], -1)


def is_uniform(grid: torch.Tensor) -> bool:
    """Whether every feature's knots are equally spaced, up to a few roundings of their dtype."""
    n_knots = grid.shape[1]
    t = grid.double()
    ideal = t[:, :1] + (t[:, -1:] - t[:, :1]) * torch.linspace(0, 1, n_knots, dtype=t.dtype,
                                                                device=t.device)
    tol = 4 * torch.finfo(grid.dtype).eps * t.abs().amax()
    return bool(((t - ideal).abs() <= tol).all())


def bspline_basis(x: torch.Tensor, grid: torch.Tensor, spline_order: int, *,
                  matrices: torch.Tensor | None = None, uniform: bool | None = None
                  ) -> torch.Tensor:
    """Order-``k`` B-spline basis in matrix form; equals the Cox-de Boor basis.

    Args:
        x: inputs ``(..., in)``.
        grid: increasing knots ``(in, G + 2k + 1)`` (the extended grid).
        spline_order: spline order ``k`` (>= 1).
        matrices: `interval_matrices` of ``grid`` (computed here when ``None``).
        uniform: `is_uniform` of ``grid`` (computed here when ``None``).

    Returns:
        ``(..., in, G + k)``; all zero outside ``[grid[:, 0], grid[:, -1])``.
    """
    if matrices is None:
        matrices = interval_matrices(grid, spline_order)
    if uniform is None:
        uniform = is_uniform(grid)
    lead = x.shape[:-1]
    out = _MatrixBasis.apply(x.reshape(-1, x.shape[-1]), grid.to(x.dtype),
                             matrices.to(x.dtype), uniform)
    return out.reshape(*lead, *out.shape[1:])


class _MatrixBasis(torch.autograd.Function):
    """``(N, in) -> (N, in, G + k)``; backward returns the gradient for ``x`` only.

    Each input's row is ``sum_p u^p matrices[feature, slot, p]``: one `embedding_bag` (a fused
    gather and weighted sum) does the matrix product and the placement at once, writing the output
    in a single pass. Its derivative in ``u`` is the same bag with weights ``p u^(p-1)``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, grid: torch.Tensor, matrices: torch.Tensor,
                uniform: bool) -> torch.Tensor:
        k = matrices.shape[2] - 1
        slot, u = _locate(x.contiguous(), grid, uniform)
        table, rows = _bags(slot, matrices, uniform)
        out = F.embedding_bag(rows, table, per_sample_weights=_powers(u, k), mode="sum")
        ctx.save_for_backward(slot, u, grid, matrices)
        ctx.uniform = uniform
        return out.view(*x.shape, -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        slot, u, grid, matrices = ctx.saved_tensors
        k = matrices.shape[2] - 1
        # d/du sum_p u^p M_p = sum_{p >= 1} p u^(p-1) M_p: the same table, rows 1 .. k.
        table, rows = _bags(slot, matrices, ctx.uniform, first_power=1)
        slope = F.embedding_bag(rows, table, per_sample_weights=_powers(u, k, derivative=True),
                                mode="sum")
        if ctx.uniform:
            inv_width = (grid.shape[1] - 1) / (grid[:, -1] - grid[:, 0])
        else:
            inv_width = _inv_widths(grid).take(_flat_slot(slot, grid.shape[1]).long())
        # A batched dot product: no (N, in, G + k) temporary, unlike multiply-then-sum.
        grad_u = torch.einsum("nib,nib->ni", slope.view_as(grad), grad)
        return grad_u.mul_(inv_width), None, None, None


def _locate(x: torch.Tensor, grid: torch.Tensor, uniform: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot (0: left of the knots, ``M``: right of them, else interval ``slot - 1``) and ``u``."""
    n_knots = grid.shape[1]
    if uniform:
        s = (x - grid[:, 0]) * ((n_knots - 1) / (grid[:, -1] - grid[:, 0]))
        cell = s.floor()
        u = s - cell
        # Clamp while still float: a huge input must not overflow the integer cast.
        return cell.clamp_(-1, n_knots - 1).int() + 1, u
    slot = torch.searchsorted(grid, x.t().contiguous(), right=True, out_int32=True)
    slot = slot.t().contiguous()
    flat = _flat_slot(slot, n_knots).long()
    left = torch.cat([grid[:, :1], grid], 1)
    # Outside slots have inverse width 0, so their u is 0 and their powers stay finite.
    return slot, (x - left.take(flat)) * _inv_widths(grid).take(flat)


def _bags(slot: torch.Tensor, matrices: torch.Tensor, uniform: bool, first_power: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The table of matrix rows and, per input, the rows of its slot for powers ``first_power ..
    k``: ``(N * in, k + 1 - first_power)``.

    On a uniform grid every feature has the same matrices (in ``u``), so one feature's small table
    serves all and stays in cache.
    """
    n_slots, k1 = matrices.shape[1], matrices.shape[2]
    if uniform:
        table, first = matrices[0].flatten(0, 1), slot * k1
    else:
        table, first = matrices.flatten(0, 2), _flat_slot(slot, n_slots - 1) * k1
    # int32 rows: half the memory traffic of int64, and embedding_bag takes them.
    powers = torch.arange(first_power, k1, dtype=first.dtype, device=first.device)
    return table, (first.unsqueeze(-1) + powers).view(-1, k1 - first_power)


def _flat_slot(slot: torch.Tensor, n_knots: int) -> torch.Tensor:
    """Index of each input's slot in a flattened ``(in, M + 1)`` table."""
    feature = torch.arange(slot.shape[-1], dtype=slot.dtype, device=slot.device)
    return slot + feature * (n_knots + 1)


def _inv_widths(grid: torch.Tensor) -> torch.Tensor:
    """``(in, M + 1)``: one over each slot's interval width; 0 outside and on zero widths."""
    width = grid.diff(dim=1)
    inv = torch.where(width > 0, 1.0 / width, 0.0)
    return F.pad(inv, (1, 1))


def _powers(u: torch.Tensor, k: int, derivative: bool = False) -> torch.Tensor:
    """``[1, u, ..., u^k]`` as ``(u.numel(), k + 1)``, or with ``derivative`` the derivative's
    nonzero part ``[1, 2u, ..., k u^(k-1)]`` as ``(u.numel(), k)``; repeated products are faster
    than ``pow``."""
    u = u.reshape(-1)
    n = k if derivative else k + 1
    out = u.new_empty(len(u), n)
    out[:, 0] = 1.0
    for p in range(1, n):
        torch.mul(out[:, p - 1], u, out=out[:, p])
    if derivative and k > 1:
        out[:, 1:] *= torch.arange(2, k + 1, dtype=u.dtype, device=u.device)
    return out


def _extended(knots: torch.Tensor, k: int) -> torch.Tensor:
    """``(in, G + 1)`` grid knots extended by ``k`` knots of the mean spacing on each side."""
    step = (knots[:, -1:] - knots[:, :1]) / (knots.shape[1] - 1)
    ramp = torch.arange(1, k + 1, dtype=knots.dtype, device=knots.device)
    return torch.cat([knots[:, :1] - step * ramp.flip(0), knots, knots[:, -1:] + step * ramp], 1)


@register_kan("kan-bspline", paper=_KAN_PAPER,
              summary="B-spline KAN layer (matrix-form basis, grid update and extension).")
class KANLinear(KANLayer):
    """KAN layer with B-spline edges, ``G + k`` coefficients per edge.

    Args:
        in_features: input features.
        out_features: output features.
        grid_size: grid intervals ``G`` on ``grid_range``.
        spline_order: spline order ``k`` (>= 1).
        grid_range: range of the initial uniform grid; ``k`` knots extend it on each side.
        base_activation: activation of the residual base branch (``None``: none).
        bias: add a learnable output bias.
        grid_eps: in `update_grid`, the weight of the uniform grid against the quantile grid.
        basis_impl: ``matrix`` (fast) or ``recursive`` (plain Cox-de Boor, for reference).
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5,
                 spline_order: int = 3, grid_range: tuple[float, float] = (-1.0, 1.0),
                 base_activation: str | None = "silu", bias: bool = True, grid_eps: float = 0.02,
                 basis_impl: str = "matrix") -> None:
        if grid_size < 1 or spline_order < 1:
            raise ValueError(f"grid_size and spline_order must be >= 1, got {grid_size} and "
                             f"{spline_order}")
        if basis_impl not in ("matrix", "recursive"):
            raise ValueError(f"basis_impl must be 'matrix' or 'recursive', got '{basis_impl}'")
        super().__init__(in_features, out_features, grid_size + spline_order,
                         base_activation=base_activation, bias=bias)
        self.grid_size, self.spline_order = grid_size, spline_order
        self.grid_range = tuple(grid_range)
        self.grid_eps, self.basis_impl = grid_eps, basis_impl
        knots = torch.linspace(*grid_range, grid_size + 1, dtype=torch.float64)
        grid = _extended(knots.expand(in_features, -1), spline_order)
        self.register_buffer("grid", grid.to(torch.get_default_dtype()))
        # Derived from the grid, so not saved: the load hook rebuilds it.
        self.register_buffer("matrices", torch.empty(0), persistent=False)
        self._set_grid(self.grid)
        self.register_load_state_dict_post_hook(KANLinear._after_load)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        if self.basis_impl == "recursive":
            return cox_de_boor(x, self.grid, self.spline_order)
        return _MatrixBasis.apply(x, self.grid, self.matrices, self._uniform)

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.0) -> None:
        """Move the knots to the data in ``x`` (the layer's input) and keep the layer's function.

        The KAN paper's adaptive grid: per-feature quantiles of ``x``, blended with a uniform grid
        over the data range (widened by ``margin``) as ``grid_eps * uniform + (1 - grid_eps) *
        quantiles``, extended by ``k`` knots on each side. The coefficients are refit by least
        squares on ``x``.
        """
        x = x.reshape(-1, self.in_features).double()
        levels = torch.linspace(0, 1, self.grid_size + 1, dtype=x.dtype, device=x.device)
        quantiles = torch.quantile(x, levels, dim=0).t()
        lo, hi = x.amin(0)[:, None] - margin, x.amax(0)[:, None] + margin
        uniform = lo + (hi - lo) * levels
        knots = self.grid_eps * uniform + (1 - self.grid_eps) * quantiles
        self._refit(x, _extended(knots, self.spline_order))

    @torch.no_grad()
    def extend_grid(self, new_size: int) -> None:
        """Refine (or coarsen) the grid to ``new_size`` intervals, keeping the layer's function.

        New knots interpolate the old ones, so an adaptive grid keeps its density and a multiple of
        the old size nests the old knots (then the transfer is exact). Coefficients are fit by
        least squares on points spread over every new interval of the grid range. Parameters are
        replaced when their shape changes: build the optimizer afterwards.
        """
        k, size = self.spline_order, self.grid_size
        old = self.grid.double()[:, k:k + size + 1]
        at = torch.linspace(0, size, new_size + 1, dtype=old.dtype, device=old.device)
        i = at.floor().long().clamp_(max=size - 1)
        knots = old[:, i] + (old[:, i + 1] - old[:, i]) * (at - i)
        per_interval = 2 * (k + 1)
        frac = (torch.arange(per_interval, dtype=old.dtype, device=old.device) + 0.5) / per_interval
        points = knots[:, :-1, None] + knots.diff(dim=1)[..., None] * frac
        self._refit(points.flatten(1).t(), _extended(knots, k))

    def _refit(self, x: torch.Tensor, grid: torch.Tensor) -> None:
        """Switch to ``grid``, least-squares fitting each edge's spline to its values at ``x``.

        The fit is linear in the old coefficients, so one ``(new, old)`` transfer matrix per input
        feature does it for every output at once.
        """
        k = self.spline_order
        grid = grid.to(self.grid.dtype)  # fit on the knots the layer will hold
        old = bspline_basis(x, self.grid.double(), k).transpose(0, 1)  # (in, N, n_old)
        new = bspline_basis(x, grid.double(), k).transpose(0, 1)  # (in, N, n_new)
        gram = new.mT @ new
        # A tiny ridge keeps basis functions without data (possible at the grid ends) at zero.
        ridge = 1e-10 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)
        gram = gram + ridge[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype,
                                                       device=gram.device)
        transfer = torch.linalg.solve(gram, new.mT @ old)
        coef = torch.einsum("icb,oib->oic", transfer, self.coef.double()).to(self.coef).contiguous()
        self.grid_size = grid.shape[1] - 2 * k - 1
        self.n_basis = self.grid_size + k
        self._set_grid(grid)
        if coef.shape == self.coef.shape:
            self.coef.copy_(coef)
        else:
            self.coef = nn.Parameter(coef)

    @staticmethod
    def _after_load(module: KANLinear, incompatible_keys: Any) -> None:
        module._set_grid(module.grid)

    def _set_grid(self, grid: torch.Tensor) -> None:
        """Install knots ``grid`` and everything derived from them."""
        self.grid = grid.to(self.grid)
        self.matrices = interval_matrices(self.grid, self.spline_order).to(self.grid)
        self._uniform = is_uniform(self.grid)

    def _copy_input_state(self, small: KANLayer, keep_inputs: torch.Tensor) -> None:
        small._set_grid(self.grid[keep_inputs.to(self.grid.device)])

    def config(self) -> dict[str, Any]:
        return {**super().config(), "grid_size": self.grid_size,
                "spline_order": self.spline_order, "grid_range": self.grid_range,
                "grid_eps": self.grid_eps, "basis_impl": self.basis_impl}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid_size={self.grid_size}, k={self.spline_order}"


register_kan("kan-bspline-k7", paper=_KAN_PAPER,
             summary="B-spline KAN layer of order 7.", spline_order=7)(KANLinear)
register_kan("kan-matrix", paper=_MATRIXKAN_PAPER,
             summary="MatrixKAN: B-spline KAN with the basis as power vector times matrix.",
             basis_impl="matrix")(KANLinear)
