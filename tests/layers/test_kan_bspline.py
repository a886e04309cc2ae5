"""B-spline KAN layer: the matrix-form basis against Cox-de Boor, gradients, grid tools, pruning."""

from __future__ import annotations

import pytest
import torch

from nnarena.layers import create_conv_layer, create_layer
from nnarena.layers.kan.bspline import KANLinear, bspline_basis, interval_matrices, is_uniform
from nnarena.registry import REGISTRY
from nnarena.testing.kan_reference import CoxDeBoorKAN, cox_de_boor

G = 5


def _grid(k: int, uniform: bool, n_in: int = 3, dtype: torch.dtype = torch.float32
          ) -> torch.Tensor:
    """Extended grid with its own range per feature: uniform, or every knot jittered by up to 30%
    of a step."""
    gen = torch.Generator().manual_seed(k)
    scale = 0.5 + 1.5 * torch.rand(n_in, 1, generator=gen, dtype=torch.float64)
    shift = 0.6 * torch.rand(n_in, 1, generator=gen, dtype=torch.float64) - 0.3
    steps = torch.arange(-k, G + k + 1, dtype=torch.float64) - G / 2
    knots = shift + scale * (2 / G) * steps
    if not uniform:
        jitter = torch.rand(knots.shape, generator=gen, dtype=torch.float64) - 0.5
        knots = knots + 0.6 * scale * (2 / G) * jitter
    return knots.to(dtype).contiguous()


def _inputs(grid: torch.Tensor, n: int = 4000) -> torch.Tensor:
    """Inputs over 1.3x the extended range: inside, in the extension and outside it."""
    reach = 1.3 * grid.abs().max()
    return (torch.rand(n, grid.shape[0]) * 2 - 1) * reach


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "non-uniform"])
@pytest.mark.parametrize("k", range(1, 8))
def test_basis_matches_cox_de_boor(k: int, uniform: bool) -> None:
    grid = _grid(k, uniform)
    assert is_uniform(grid) == uniform
    x = _inputs(grid)
    ours = bspline_basis(x, grid, k)
    assert ours.dtype == torch.float32 and ours.shape == (len(x), 3, G + k)
    exact = cox_de_boor(x.double(), grid.double(), k)
    assert (ours.double() - exact).abs().max() <= 2e-6
    assert (cox_de_boor(x, grid, k) - ours).abs().max() <= 2e-6


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "non-uniform"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_partition_of_unity_inside_and_zero_outside(k: int, uniform: bool) -> None:
    grid = _grid(k, uniform)
    lo, hi = grid[:, k], grid[:, G + k]
    inside = lo + (hi - lo) * torch.rand(2000, 3) * 0.9999
    torch.testing.assert_close(
        bspline_basis(inside, grid, k).sum(-1), torch.ones(2000, 3), atol=2e-6, rtol=0
    )
    huge = torch.full((3,), 1e30)
    beyond = torch.stack([huge, -huge, grid[:, 0] - 0.5, grid[:, -1] + 0.5])
    assert not bspline_basis(beyond, grid, k).any()
    # The last knot is outside too (half-open intervals, as in Cox-de Boor); on a uniform grid the
    # floor may round it into the last interval, where every basis function is ~0 anyway.
    assert bspline_basis(grid[:, -1][None], grid, k).abs().max() <= 1e-6


@pytest.mark.parametrize("k", [2, 3, 5])
def test_one_shared_matrix_is_wrong_on_a_non_uniform_grid(k: int) -> None:
    """MatrixKAN's published code applies one matrix to every interval: fine on the initial
    uniform grid, wrong after a grid update. Per-interval matrices stay exact."""
    grid = _grid(k, uniform=False)
    x = _inputs(grid)
    exact = cox_de_boor(x.double(), grid.double(), k)
    # The uniform grid's matrices are the one shared matrix (less the missing columns); the
    # interval search and u still use the real knots, as the published code does.
    shared = interval_matrices(_grid(k, uniform=True), k)
    published = bspline_basis(x, grid, k, matrices=shared, uniform=False)
    assert (published.double() - exact).abs().max() > 0.05
    assert (bspline_basis(x, grid, k).double() - exact).abs().max() <= 2e-6


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "non-uniform"])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_hand_written_backward_passes_gradcheck(k: int, uniform: bool) -> None:
    grid = _grid(k, uniform, n_in=2, dtype=torch.float64)
    assert is_uniform(grid) == uniform
    # Points across and beyond the grid, offset per feature so none sits on a knot.
    reach = 1.1 * grid.abs().max()
    x = torch.linspace(-reach, reach, 15, dtype=torch.float64)[:, None] + torch.tensor(
        [0.013, 0.029], dtype=torch.float64
    )
    assert torch.autograd.gradcheck(lambda t: bspline_basis(t, grid, k), (x.requires_grad_(),))


@pytest.mark.parametrize("update", [False, True], ids=["initial-grid", "updated-grid"])
def test_layer_gradcheck_in_parameters_and_input(update: bool) -> None:
    layer = KANLinear(3, 2)
    if update:
        layer.update_grid(torch.randn(500, 3) * 0.4)
    layer = layer.double()
    params = dict(layer.named_parameters())
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)

    def run(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(params, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params.values()))


@pytest.mark.parametrize("k", [3, 7])
def test_matrix_layer_equals_recursive_and_reference(k: int) -> None:
    x = torch.randn(64, 2, 4) * 0.8
    matrix = KANLinear(4, 3, spline_order=k)
    recursive = KANLinear(4, 3, spline_order=k, basis_impl="recursive")
    recursive.load_state_dict(matrix.state_dict())
    reference = CoxDeBoorKAN(4, 3, spline_order=k)
    reference.load_state_dict(matrix.state_dict())
    outs, grads = [], []
    for layer in (matrix, recursive, reference):
        out = layer(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), layer.coef)[0])
    assert outs[0].shape == (64, 2, 3)
    for out, grad in zip(outs[1:], grads[1:], strict=True):
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, grads[0], atol=1e-4, rtol=1e-4)


def _data(n: int = 3000, n_in: int = 4) -> torch.Tensor:
    """Non-uniform data: normal, clipped to the grid range."""
    return (torch.randn(n, n_in) * 0.4).clamp(-1, 1)


def _smooth_edges(layer: KANLinear, max_freq: float = 1.5) -> KANLinear:
    """Give every edge a smooth spline, ``0.5 sin(a x + b)`` with ``a <= max_freq``, as training
    leaves them (coefficients sampled at the Greville abscissae)."""
    k, t = layer.spline_order, layer.grid
    greville = torch.stack([t[:, j + 1 : j + k + 1].mean(1) for j in range(layer.n_basis)], 1)
    freq = 0.5 + (max_freq - 0.5) * torch.rand(layer.out_features, layer.in_features, 1)
    phase = 6 * torch.rand(layer.out_features, layer.in_features, 1)
    with torch.no_grad():
        layer.coef.copy_(0.5 * torch.sin(freq * greville + phase))
    return layer


@pytest.mark.parametrize("k", [3, 7])
def test_update_grid_keeps_outputs_and_follows_the_data(k: int) -> None:
    layer = _smooth_edges(KANLinear(4, 3, spline_order=k))
    x = _data()
    before = layer(x)
    layer.update_grid(x)
    assert not layer._uniform
    assert (layer(x) - before).abs().max() < 1e-3
    interior = layer.grid[:, k : k + G + 1]
    # Knots crowd where the data is dense (the middle): inner intervals shrink, outer ones grow.
    widths = interior.diff(dim=1)
    assert (widths[:, 2] < 0.6 * (2 / G)).all() and (widths[:, 0] > 1.5 * (2 / G)).all()
    levels = torch.linspace(0, 1, G + 1, dtype=torch.float64)
    quantiles = torch.quantile(x.double(), levels, dim=0).t()
    assert (interior.double() - quantiles).abs().max() < layer.grid_eps * 2 + 1e-6


def test_update_grid_refit_is_least_squares_on_the_data() -> None:
    """Random (rough) coefficients cannot be kept exactly on other knots; the refit must still be
    the best the new grid can do: its residual is orthogonal to the new basis."""
    layer = KANLinear(3, 2)
    x = _data(2000, 3)
    with torch.no_grad():
        edges = layer.edge_activations(x)
        layer.update_grid(x)
        residual = (layer.edge_activations(x) - edges).double()  # (N, out, in)
        basis = layer.basis(x).double()  # (N, in, n_basis)
        normal = torch.einsum("noi,nib->oib", residual, basis)
    assert normal.abs().max() < 1e-4 * len(x)


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "updated"])
def test_extend_grid_keeps_outputs(uniform: bool) -> None:
    layer = _smooth_edges(KANLinear(4, 3))
    x = _data()
    if not uniform:
        layer.update_grid(x)
    before = layer(x)
    for size in (8, 16):  # 5 -> 8 does not nest the old knots, 8 -> 16 does
        layer.extend_grid(size)
        assert layer.grid.shape == (4, size + 2 * 3 + 1) and layer.coef.shape == (3, 4, size + 3)
        assert layer.grid_size == size and layer.config()["grid_size"] == size
        assert layer._uniform == uniform
        assert (layer(x) - before).abs().max() < 1e-3


def test_extend_grid_by_a_multiple_is_exact() -> None:
    layer = KANLinear(2, 2)  # random coefficients: only nested knots can keep them
    x = torch.rand(1000, 2) * 2 - 1
    before = layer(x)
    layer.extend_grid(2 * G)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)


def test_prune_keeps_kept_paths_and_grids() -> None:
    layer = KANLinear(4, 3)
    x = _data(500)
    layer.update_grid(x)
    keep_in = torch.tensor([True, False, True, True])
    keep_out = torch.tensor([True, False, True])
    small = layer.prune(keep_in, keep_out)
    assert isinstance(small, KANLinear) and (small.in_features, small.out_features) == (3, 2)
    torch.testing.assert_close(small.grid, layer.grid[keep_in])
    torch.testing.assert_close(small.matrices, layer.matrices[keep_in])
    with torch.no_grad():
        removed = layer.edge_activations(x)[:, keep_out][:, :, ~keep_in].sum(-1)
        expected = layer(x)[:, keep_out] - removed
        torch.testing.assert_close(small(x[:, keep_in]), expected, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_rebuilds_the_matrices() -> None:
    layer = KANLinear(3, 2)
    x = _data(400, 3)
    layer.update_grid(x)
    layer.extend_grid(8)
    assert "matrices" not in layer.state_dict()
    fresh = KANLinear(3, 2, grid_size=8)
    fresh.load_state_dict(layer.state_dict())
    assert not fresh._uniform
    torch.testing.assert_close(fresh.matrices, layer.matrices)
    torch.testing.assert_close(fresh(x), layer(x))


def test_registered_forms_and_edge_less_basis() -> None:
    papers = {e.name: e.paper for e in REGISTRY.list("layer")}
    assert papers["kan-bspline"] == papers["kan-bspline-k7"] == "KAN: Kolmogorov-Arnold Networks"
    assert papers["kan-matrix"] == "MatrixKAN: Parallelized Kolmogorov-Arnold Network"
    k7 = create_layer("kan-bspline-k7", 3, 2)
    assert isinstance(k7, KANLinear) and k7.spline_order == 7 and k7.n_basis == G + 7
    assert create_layer("kan-matrix", 3, 2, grid_size=8).basis_impl == "matrix"
    conv = create_conv_layer("kan-bspline", 2, 4, 3, dim=2, padding=1)
    assert conv.kan.out_features == 0
    out = conv(torch.randn(2, 2, 6, 6))
    assert out.shape == (2, 4, 6, 6)
    out.sum().backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_bad_settings_fail() -> None:
    with pytest.raises(ValueError, match="spline_order"):
        KANLinear(2, 2, spline_order=0)
    with pytest.raises(ValueError, match="basis_impl"):
        KANLinear(2, 2, basis_impl="fast")
