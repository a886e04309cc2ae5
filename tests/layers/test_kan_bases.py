"""KAN bases other than B-splines: each basis against an independent closed form, plus the layer
contract every `KANLayer` keeps (shapes, gradients, edge sums, conv form, pruning, training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.polynomial import legendre as np_legendre
from numpy.polynomial import polynomial as np_poly

from nnarena.layers import create_conv_layer, create_layer
from nnarena.layers.kan import KANLayer
from nnarena.layers.kan.polynomial import gram
from nnarena.layers.kan.rational import GroupRationalKAN, fit_rational, rational
from nnarena.models import create_model

IN, OUT = 5, 4

# Small settings per layer (every one a few coefficients per edge, so the tests stay fast).
KWARGS: dict[str, dict] = {
    "kan-cheby": {"degree": 4},
    "kan-legendre": {"degree": 4},
    "kan-gram": {"degree": 4},
    "kan-fourier": {"n_freqs": 3},
    "kan-rbf": {"n_centers": 5},
    "kan-relu": {"grid_size": 4, "order": 2},
    "kan-wavelet": {"n_wavelets": 4},
    "kan-rational": {"num_degree": 4},
    "kan-gr": {"groups": 2},
    "kan-skan": {"spaces": ("chebyshev", "legendre", "fourier", "rbf", "wavelet"),
                 "n_per_space": 4},
    "kan-cauchy": {"n_centers": 3},
}
NAMES = list(KWARGS)


def make(name: str, in_features: int = IN, out_features: int = OUT) -> KANLayer:
    """A layer with its learnable basis parameters moved off their init (so tests see them)."""
    layer = create_layer(name, in_features, out_features, **KWARGS[name])
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if pname not in ("coef", "base_weight", "bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif pname == "bias":
                p.normal_()
    return layer


# --- independent references: (layer, x of shape (N, in), float64 numpy) -> (N, in, n_basis) ---

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def ref_cheby(t: np.ndarray, degree: int) -> np.ndarray:
    # T_n(cos a) = cos(n a)
    return np.cos(np.arange(degree + 1) * np.arccos(t)[..., None])


def ref_legendre(t: np.ndarray, degree: int) -> np.ndarray:
    return np.stack([np_legendre.legval(t, np.eye(degree + 1)[n]) for n in range(degree + 1)], -1)


def ref_gram(t: np.ndarray, degree: int, n_points: int) -> np.ndarray:
    # Orthonormalise the monomials on the points (QR, positive leading coefficients), then
    # interpolate each column by its polynomial of degree n.
    points = -1 + (2 * np.arange(n_points) + 1) / n_points
    q, r = np.linalg.qr(np.vander(points, degree + 1, increasing=True))
    q = q * np.sign(np.diag(r)) * math.sqrt(n_points)
    return np.stack([np_poly.polyval(t, np_poly.polyfit(points, q[:, n], n))
                     for n in range(degree + 1)], -1)


def ref_fourier(x: np.ndarray, n_freqs: int) -> np.ndarray:
    kx = x[..., None] * np.arange(1, n_freqs + 1)
    return np.concatenate([np.cos(kx), np.sin(kx)], -1)


def ref_rbf(x: np.ndarray, n: int, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    centers = np.linspace(low, high, n)
    return np.exp(-(((x[..., None] - centers) / ((high - low) / (n - 1))) ** 2))


def ref_mexican_hat(u: np.ndarray) -> np.ndarray:
    return (1 - u**2) * np.exp(-(u**2) / 2)


def ref_relu(x: np.ndarray, grid_size: int, order: int, low: float = -1.0,
             high: float = 1.0) -> np.ndarray:
    # ReLU-KAN: r * (ReLU(e_i - x) ReLU(x - s_i))^2, r = 16 G^4 / (k + 1)^4 on a unit interval.
    step = (high - low) / grid_size
    i = np.arange(grid_size + order)
    s, e = low + (i - order) * step, low + (i + 1) * step
    r = 16 / ((order + 1) * step) ** 4
    xe = x[..., None]
    return r * (np.maximum(e - xe, 0) * np.maximum(xe - s, 0)) ** 2


def _ref_pade(x: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``P(x) / (1 + |Q(x)|)`` with numpy's polyval (``den`` holds ``b_1..b_n``)."""
    return np_poly.polyval(x, num) / (1 + np.abs(np_poly.polyval(x, np.r_[0.0, den])))


def reference(name: str, layer: KANLayer, x: torch.Tensor) -> np.ndarray:
    kw, xn = KWARGS[name], _np(x)
    if name == "kan-cheby":
        return ref_cheby(np.tanh(xn), kw["degree"])
    if name == "kan-legendre":
        return ref_legendre(np.tanh(xn), kw["degree"])
    if name == "kan-gram":
        return ref_gram(np.tanh(xn), kw["degree"], 2 * (kw["degree"] + 1))
    if name == "kan-fourier":
        return ref_fourier(xn, kw["n_freqs"])
    if name == "kan-rbf":
        return ref_rbf(xn, kw["n_centers"])
    if name == "kan-relu":
        return ref_relu(xn, kw["grid_size"], kw["order"])
    if name == "kan-wavelet":
        scale = np.exp(_np(layer.log_scale))
        return ref_mexican_hat((xn[..., None] - _np(layer.translation)) / scale)
    if name == "kan-rational":
        den = _np(layer.denominator)
        out = np.empty((*xn.shape, kw["num_degree"] + 1))
        for i in range(xn.shape[1]):
            d = 1 + np.abs(np_poly.polyval(xn[:, i], np.r_[0.0, den[i]]))
            out[:, i] = xn[:, i, None] ** np.arange(kw["num_degree"] + 1) / d[:, None]
        return out
    if name == "kan-gr":
        num, den, groups = _np(layer.numerator), _np(layer.denominator), kw["groups"]
        cols = [_ref_pade(xn[:, i], num[i * groups // IN], den[i * groups // IN])
                for i in range(xn.shape[1])]
        return np.stack(cols, -1)[..., None]
    if name == "kan-skan":
        n = kw["n_per_space"]
        refs = {"chebyshev": ref_cheby(np.tanh(xn), n - 1),
                "legendre": ref_legendre(np.tanh(xn), n - 1),
                "fourier": ref_fourier(xn, n // 2), "rbf": ref_rbf(xn, n),
                "wavelet": ref_mexican_hat((xn[..., None] - np.linspace(-2, 2, n)) * (n - 1) / 4)}
        logits = _np(layer.logits)
        weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) * len(kw["spaces"])
        return np.concatenate([weights[:, s, None] * refs[space]
                               for s, space in enumerate(kw["spaces"])], -1)
    if name == "kan-cauchy":
        # XNet's kernels 1 / ((x - c)^2 + d^2) and (x - c) / (...), scaled by d^2 and d.
        d = np.exp(_np(layer.log_width))
        diff = xn[..., None] - np.linspace(-2, 2, kw["n_centers"])
        denom = diff**2 + d**2
        return np.stack([d**2 / denom, d * diff / denom], -1).reshape(*xn.shape, -1)
    raise AssertionError(name)


@pytest.mark.parametrize("name", NAMES)
def test_basis_matches_independent_reference(name: str) -> None:
    layer = make(name).double()
    x = 1.5 * torch.randn(64, IN, dtype=torch.float64)
    phi = layer.basis(x)
    assert phi.shape == (64, IN, layer.n_basis)
    # Gaussian factors are cut at exp(-20) ~ 2e-9 (see nnarena.layers.kan.rbf.gaussian), which
    # shifts them by up to ~2e-9 (times |1 - u^2| < 40 for the wavelet).
    np.testing.assert_allclose(phi.detach().numpy(), reference(name, layer, x), rtol=1e-7,
                               atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lead", [(), (7,), (2, 3)])
def test_forward_shape_for_any_leading_dims(name: str, lead: tuple[int, ...]) -> None:
    assert make(name)(torch.randn(*lead, IN)).shape == (*lead, OUT)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_finite_gradient(name: str) -> None:
    layer = make(name)
    x = (2 * torch.randn(32, IN)).requires_grad_()
    layer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_edge_activations_sum_to_the_output(name: str) -> None:
    layer = make(name)
    x = torch.randn(16, IN)
    edges = layer.edge_activations(x)
    assert edges.shape == (16, OUT, IN)
    torch.testing.assert_close(edges.sum(-1) + layer.bias, layer(x), rtol=1e-5, atol=1e-5)


CONV_CASES = [(name, {}) for name in NAMES] + [
    # A base activation nonzero at 0 and a stride: the padded border's shifts and strided output.
    ("kan-cheby", {"base_activation": "sigmoid", "stride": 2}),
]


@pytest.mark.parametrize(("name", "extra"), CONV_CASES)
def test_conv_equals_unfold_basis_gemm_reference(name: str, extra: dict) -> None:
    c, o, k = 3, 4, 3
    stride = extra.get("stride", 1)
    conv = create_conv_layer(name, c, o, k, dim=2, padding=1, **KWARGS[name], **extra)
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, c, 5, 6)
    kan, nb = conv.kan, conv.kan.n_basis
    patches = F.unfold(x, k, padding=1, stride=stride)  # (B, C*k*k, L), channel-major
    b, _, n_pos = patches.shape
    values = patches.view(b, c, k * k, n_pos).permute(0, 3, 2, 1)  # (B, L, k*k, C)
    phi = kan.basis(values.reshape(-1, c)).view(b, n_pos, k * k, c, nb)
    phi = phi.permute(0, 1, 3, 2, 4).reshape(b, n_pos, c * k * k, nb)
    # conv weight (out, C*nb, k, k) <-> coef (out, C*k*k, nb)
    coef = conv.weight.view(o, c, nb, k * k).permute(0, 1, 3, 2).reshape(o, c * k * k, nb)
    ref = torch.einsum("blfn,ofn->bol", phi, coef) + conv.bias[:, None]
    if conv.base_weight is not None:
        ref = ref + torch.einsum("bfl,of->bol", kan.base_act(patches), conv.base_weight.view(o, -1))
    out = conv(x)
    torch.testing.assert_close(out, ref.view(out.shape), rtol=1e-4, atol=1e-5)
    assert out.shape[2:] == ((5 + 2 - k) // stride + 1, (6 + 2 - k) // stride + 1)
    assert create_conv_layer(name, c, o, k, dim=1, **KWARGS[name])(torch.randn(2, c, 9)).shape \
        == (2, o, 7)


@pytest.mark.parametrize("name", NAMES)
def test_prune_keeps_the_outputs_of_kept_paths(name: str) -> None:
    layer = make(name)
    keep_in = torch.tensor([True, False, True, True, False])
    keep_out = torch.tensor([True, True, False, True])
    small = layer.prune(keep_in, keep_out)
    assert (small.in_features, small.out_features) == (3, 3)
    x = torch.randn(16, IN)
    with torch.no_grad():
        expected = layer.edge_activations(x)[:, keep_out][:, :, keep_in].sum(-1) \
            + layer.bias[keep_out]
        torch.testing.assert_close(small(x[:, keep_in]), expected, rtol=1e-5, atol=1e-5)


def _loss_drops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 25) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", NAMES)
def test_mlp_and_cnn_built_with_the_layer_train(name: str) -> None:
    y = torch.arange(24) % 3
    x = torch.randn(3, 64)[y] + 0.3 * torch.randn(24, 64)
    mlp = create_model("mlp", (8,), 3, layer=name, width=16, layer_kwargs=KWARGS[name])
    _loss_drops(mlp, x[:, :8], y)
    cnn = create_model("cnn", (1, 8, 8), 3, layer=name, channels=(4,),
                       layer_kwargs=KWARGS[name])
    _loss_drops(cnn, x.view(24, 1, 8, 8), y)


# --- basis-specific properties ---

def test_chebyshev_is_cos_of_n_times_the_angle() -> None:
    layer = create_layer("kan-cheby", 1, 1, degree=6).double()
    angle = torch.linspace(0.1, 3.0, 50, dtype=torch.float64)
    phi = layer.basis(torch.atanh(torch.cos(angle))[:, None])[:, 0]
    torch.testing.assert_close(phi, torch.cos(angle[:, None] * torch.arange(7)))


def test_gram_polynomials_are_orthogonal_on_their_points() -> None:
    m = 9
    points = torch.tensor([-1 + (2 * i + 1) / m for i in range(m)], dtype=torch.float64)
    g = gram(points, 6, m)
    torch.testing.assert_close(g.T @ g / m, torch.eye(7, dtype=torch.float64))


@pytest.mark.parametrize("name", ["kan-rbf", "kan-wavelet", "kan-skan"])
def test_far_inputs_give_zeros_never_subnormals(name: str) -> None:
    layer = make(name)
    x = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.linspace(-12, 12, 2001)])
    x = x[:, None].expand(-1, IN).clone().requires_grad_()
    phi = layer.basis(x)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((phi != 0) & (phi.abs() < tiny)).any()
    assert (phi[:2001:100] == 0).sum() > 0  # far away: exactly zero
    phi.sum().backward()
    assert not ((x.grad != 0) & (x.grad.abs() < tiny)).any()


@pytest.mark.parametrize("name", ["kan-rbf", "kan-relu", "kan-wavelet"])
def test_fused_basis_gradients_match_finite_differences(name: str) -> None:
    # These bases have hand-written backward passes; check them against finite differences.
    layer = make(name).double()
    x = (1.5 * torch.randn(6, IN, dtype=torch.float64)).requires_grad_()
    params = [p for n, p in layer.named_parameters() if n not in ("coef", "base_weight", "bias")]
    assert torch.autograd.gradcheck(lambda x, *_: layer.basis(x), (x, *params))


def test_rbf_matches_formula_in_float32_far_and_near() -> None:
    layer = create_layer("kan-rbf", 1, 1, n_centers=8)
    x = torch.linspace(-30, 30, 4001)[:, None]
    ref = torch.from_numpy(ref_rbf(x.double().numpy(), 8)).float()
    torch.testing.assert_close(layer.basis(x), ref, rtol=0, atol=3e-7)


def test_gr_rational_starts_as_gelu_within_1e2() -> None:
    num, den = (torch.tensor(c) for c in fit_rational("gelu", 5, 4))
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    assert (rational(x, num, den) - F.gelu(x)).abs().max() < 1e-2
    layer = create_layer("kan-gr", 16, 16, init="identity")
    z = torch.randn(100, 16)
    torch.testing.assert_close(layer.basis(z)[..., 0], z, rtol=1e-5, atol=1e-5)


def test_gr_init_preserves_variance_through_12_layers() -> None:
    # KAT's claim: with the variance-preserving init the second moment stays ~1 through a deep
    # stack, while a naive 1 / sqrt(in) init shrinks it by E[GELU(z)^2] ~ 0.43 per layer.
    x = torch.randn(2048, 256)

    def second_moment_after_12(naive: bool) -> float:
        h = x
        with torch.no_grad():
            for _ in range(12):
                layer = GroupRationalKAN(256, 256, bias=False)
                if naive:
                    layer.coef.normal_(0, 256**-0.5)
                h = layer(h)
        return h.square().mean().item() / x.square().mean().item()

    assert 0.25 < second_moment_after_12(naive=False) < 4
    assert second_moment_after_12(naive=True) < 1e-3


def test_gr_groups_share_their_rational() -> None:
    layer = create_layer("kan-gr", 6, 2, groups=3)
    assert layer.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert layer.numerator.shape == (3, 6) and layer.denominator.shape == (3, 4)


def test_skan_selection_is_a_distribution_per_input() -> None:
    layer = make("kan-skan")
    weights = layer.selection()
    assert weights.shape == (IN, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(IN))


# --- MLP-KAN ---

def test_mlp_kan_routes_each_example_to_exactly_k_experts() -> None:
    layer = create_layer("mlp-kan", 6, 3, n_mlp=2, n_kan=2, top_k=2,
                         kan_kwargs={"n_centers": 4})
    x = torch.randn(64, 6)
    gates = layer.route(x)
    torch.testing.assert_close(gates.sum(-1), torch.ones(64))
    assert ((gates > 0).sum(-1) == 2).all()
    seen: list[int] = []
    for expert in layer.experts:
        expert.register_forward_hook(lambda _m, args, _out: seen.append(len(args[0])))
    out = layer(x.view(8, 8, 6))
    assert out.shape == (8, 8, 3) and sum(seen) == 64 * 2
    out.square().mean().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_mlp_kan_with_one_expert_is_that_expert() -> None:
    for n_mlp, n_kan in [(1, 0), (0, 1)]:
        layer = create_layer("mlp-kan", 6, 3, n_mlp=n_mlp, n_kan=n_kan, top_k=1)
        x = torch.randn(10, 6)
        torch.testing.assert_close(layer(x), layer.experts[0](x))


def test_mlp_with_mlp_kan_layers_trains() -> None:
    y = torch.arange(24) % 3
    x = torch.randn(3, 8)[y] + 0.3 * torch.randn(24, 8)
    model = create_model("mlp", (8,), 3, layer="mlp-kan", width=16,
                         layer_kwargs={"kan_kwargs": {"n_centers": 4}})
    _loss_drops(model, x, y)


def test_every_layer_here_is_registered_with_its_paper() -> None:
    from nnarena.registry import REGISTRY

    for name in [*NAMES, "mlp-kan"]:
        entry = REGISTRY.get("layer", name)
        assert entry.paper and entry.capabilities["nonlinear"]
        assert entry.capabilities["conv"] == (name != "mlp-kan")

