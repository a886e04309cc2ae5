"""Sparse kernels: SparseLinear and to_sparse_inference against F.linear, SparseProp against dense
autograd with the mask applied; both backends, and the fallback when C++ is off or fails."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from nnarena.errors import ConfigError
from nnarena.sparsity import kernels
from nnarena.sparsity.kernels import SparseLinear, cpp_kernels_available, to_sparse_inference
from nnarena.sparsity.sparseprop import SparsePropLinear

BACKENDS = ("cpp", "torch")


def _backend(name: str) -> str:
    if name == "cpp" and not cpp_kernels_available():
        pytest.skip("C++ sparse kernels cannot be built here")
    return name


def _sparse_linear(n_in: int = 64, n_out: int = 48, density: float = 0.2, bias: bool = True,
                   block: tuple[int, int] = (1, 1), dtype: torch.dtype = torch.float32
                   ) -> nn.Linear:
    """A Linear whose weight keeps ``density`` of its (block) entries, zeros elsewhere."""
    lin = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    keep = torch.rand(n_out // block[0], n_in // block[1]) < density
    keep = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    with torch.no_grad():
        lin.weight.mul_(keep)
    return lin


class _Masked(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


# --- SparseLinear: same outputs as F.linear ------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("layout", "block"), [("csr", (1, 1)), ("bsr", (4, 8)), ("bsr", (16, 16))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 64), (300, 64), (3, 7, 64), (0, 64)])
def test_sparse_linear_matches_linear(backend: str, layout: str, block: tuple[int, int],
                                      bias: bool, shape: tuple[int, ...]) -> None:
    lin = _sparse_linear(n_out=64, bias=bias, block=block)
    sparse = SparseLinear.from_dense(lin, layout=layout, blocksize=block,
                                     backend=_backend(backend))
    x = torch.randn(*shape)
    torch.testing.assert_close(sparse(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.to_dense(), lin.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_linear_float64_and_empty_weight(backend: str) -> None:
    lin = _sparse_linear(n_in=33, n_out=17, dtype=torch.float64)
    x = torch.randn(70, 33, dtype=torch.float64)
    sparse = SparseLinear.from_dense(lin, backend=_backend(backend))
    torch.testing.assert_close(sparse(x), lin(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        lin.weight.zero_()
    empty = SparseLinear.from_dense(lin, backend=backend)
    assert empty.values.numel() == 0
    torch.testing.assert_close(empty(x), lin.bias.detach().expand(70, 17))


def test_sparse_linear_uses_the_parametrized_weight() -> None:
    lin = nn.Linear(40, 30)
    mask = (torch.rand(30, 40) < 0.1).float()
    parametrize.register_parametrization(lin, "weight", _Masked(mask))
    sparse = SparseLinear.from_dense(lin)
    assert sparse.values.numel() == int(mask.sum())
    x = torch.randn(9, 40)
    torch.testing.assert_close(sparse(x), lin(x), rtol=1e-5, atol=1e-5)


def test_sparse_linear_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="unknown sparse layout 'coo'; choose one of csr, bsr"):
        SparseLinear(torch.ones(4, 4), layout="coo")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be 2-D"):
        SparseLinear(torch.ones(4))
    with pytest.raises(ConfigError, match="unknown sparse backend 'gpu'; choose one of auto"):
        SparseLinear(torch.ones(4, 4), backend="gpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"blocksize \(3, 3\) does not divide"):
        SparseLinear(torch.ones(4, 4), layout="bsr", blocksize=3)
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 4\)"):
        SparseLinear(torch.ones(2, 4))(torch.ones(3, 5))
    with pytest.raises(RuntimeError, match="inference-only"):
        SparseLinear(torch.ones(2, 4))(torch.ones(3, 4, requires_grad=True))
    with pytest.raises(ValueError, match="spmm: inconsistent shapes"):
        kernels.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(2), torch.ones(4, 3))


def test_cpp_kernels_refuse_int32_indices() -> None:
    index = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(TypeError, match="must be int64"):
        kernels.spmm(index, index[:1], torch.ones(1), torch.ones(4, 3), backend=_backend("cpp"))


# --- to_sparse_inference ------------------------------------------------------------------------

class _Scaled(nn.Linear):
    """A subclass with its own forward: must not be replaced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sparse = _sparse_linear(16, 32, density=0.1)
        self.dense = nn.Linear(32, 32)
        self.masked = nn.Linear(32, 32)
        parametrize.register_parametrization(
            self.masked, "weight", _Masked((torch.rand(32, 32) < 0.3).float()))
        self.custom = _Scaled(32, 32)
        with torch.no_grad():
            self.custom.weight.mul_(torch.rand(32, 32) < 0.1)
        self.shared = _sparse_linear(32, 32, density=0.2)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        with torch.no_grad():
            self.attn.out_proj.weight.mul_(torch.rand(32, 32) < 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.sparse(x))
        h = self.custom(self.masked(self.dense(h)))
        h = self.shared(torch.relu(self.shared(h)))
        return self.attn(h, h, h, need_weights=False)[0]


def test_to_sparse_inference_replaces_sparse_linears_only() -> None:
    model = _Net()
    fast = to_sparse_inference(model, min_sparsity=0.5)
    assert model.training and isinstance(model.sparse, nn.Linear)  # the original is untouched
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert {n for n, m in fast.named_modules() if isinstance(m, SparseLinear)} == {
        "sparse", "masked", "shared"}
    assert isinstance(fast.dense, nn.Linear) and isinstance(fast.custom, _Scaled)
    assert type(fast.attn.out_proj) is type(model.attn.out_proj)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_to_sparse_inference_on_a_bare_linear_and_thresholds() -> None:
    lin = _sparse_linear(density=0.2)
    assert isinstance(to_sparse_inference(lin, 0.7), SparseLinear)
    assert isinstance(to_sparse_inference(lin, 0.9), nn.Linear)
    bsr = to_sparse_inference(nn.Sequential(lin, _sparse_linear(48, 10)), 0.5, layout="bsr")
    assert isinstance(bsr[0], SparseLinear) and isinstance(bsr[1], nn.Linear)  # 10 % 16 != 0
    with pytest.raises(ConfigError, match="min_sparsity must be in"):
        to_sparse_inference(lin, 1.5)


# --- SparseProp: gradients equal dense autograd with the mask applied -----------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("shape", "bias"), [((37,), True), ((300,), False), ((4, 9), True)])
def test_sparseprop_gradients_equal_dense_masked(backend: str, dtype: torch.dtype, tol: float,
                                                 shape: tuple[int, ...], bias: bool) -> None:
    lin = nn.Linear(70, 45, bias=bias).to(dtype)
    mask = torch.rand(45, 70) < 0.3
    layer = SparsePropLinear.from_dense(lin, mask, backend=_backend(backend))
    x = torch.randn(*shape, 70, dtype=dtype, requires_grad=True)
    w = lin.weight.detach().clone().requires_grad_()
    b = None if lin.bias is None else lin.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), F.linear(x_ref, w * mask, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    close = {"rtol": tol, "atol": tol}
    torch.testing.assert_close(y, y_ref, **close)
    torch.testing.assert_close(x.grad, x_ref.grad, **close)
    torch.testing.assert_close(layer.to_dense(layer.values.grad), w.grad * mask, **close)
    if b is not None:
        torch.testing.assert_close(layer.bias.grad, b.grad, **close)
    torch.testing.assert_close(layer.weight, (w * mask).detach(), rtol=0, atol=0)
    assert torch.equal(layer.mask, mask)


def test_sparseprop_first_layer_and_empty_pattern() -> None:
    layer = SparsePropLinear(torch.randn(6, 5), torch.zeros(6), torch.zeros(6, 5))
    x = torch.randn(3, 5)  # no grad wanted for x
    layer(x).sum().backward()
    assert layer.values.grad.shape == (0,)
    torch.testing.assert_close(layer.bias.grad, torch.full((6,), 3.0))


def test_sparseprop_trains_like_masked_dense_sgd() -> None:
    lin = nn.Linear(20, 12)
    mask = torch.rand(12, 20) < 0.25
    layer = SparsePropLinear.from_dense(lin, mask)
    w = (lin.weight.detach() * mask).requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD([w, b], lr=0.1)
    x, target = torch.randn(16, 20), torch.randn(16, 12)
    for _ in range(3):
        opt.zero_grad()
        opt_ref.zero_grad()
        F.mse_loss(layer(x), target).backward()
        F.mse_loss(F.linear(x, w * mask, b), target).backward()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(layer.weight, (w * mask).detach(), rtol=1e-6, atol=1e-6)
    assert not layer.weight[~mask].any()
    assert len(list(layer.parameters())) == 2  # values and bias


def test_sparseprop_errors() -> None:
    with pytest.raises(ConfigError, match=r"mask shape \(3, 3\) differs"):
        SparsePropLinear(torch.ones(4, 4), mask=torch.ones(3, 3))
    with pytest.raises(ConfigError, match="must be 2-D"):
        SparsePropLinear(torch.ones(2, 3, 4))


# --- fallback -------------------------------------------------------------------------------------

def test_env_var_disables_the_cpp_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert not cpp_kernels_available()
    lin = _sparse_linear()
    x = torch.randn(8, 64)
    torch.testing.assert_close(SparseLinear.from_dense(lin)(x), lin(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="backend='cpp' but the C\\+\\+ sparse kernels"):
        SparseLinear.from_dense(lin, backend="cpp")(x)


def test_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("g++ failed: boom")

    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", broken)
    lin = _sparse_linear()
    layer = SparsePropLinear.from_dense(lin)
    x = torch.randn(8, 64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ sparse kernels unavailable.*boom"):
        layer(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
    assert x.grad is not None and not cpp_kernels_available()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transpose(backend: str, dtype: torch.dtype) -> None:
    for shape in [(37, 70), (16, 16), (3, 5), (0, 4)]:
        x = torch.randn(*shape, dtype=dtype)
        xt = kernels.transpose(x, backend=_backend(backend))
        assert xt.is_contiguous() and torch.equal(xt, x.t())
