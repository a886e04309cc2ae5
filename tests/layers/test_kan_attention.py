"""KArAt: multi-head attention whose softmax is a learnable KAN operator on each score row."""

from __future__ import annotations

import pytest
import torch

from nnarena.cell import Cell, run_cell
from nnarena.errors import ConfigError, UnknownNameError
from nnarena.layers.kan.attention import KArAtAttention
from nnarena.models.transformer import transformer

B, T, D, H = 2, 6, 8, 2


def _qkv(attn: KArAtAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Queries, keys, values ``(B, H, T, d_head)`` and scaled scores ``(B, H, T, T)``."""
    q, k, v = (part.view(B, T, H, D // H).transpose(1, 2)
               for part in attn.qkv(x).split(D, dim=-1))
    return q, k, v, q @ k.transpose(-2, -1) / (D // H) ** 0.5


def _merge(attn: KArAtAttention, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("basis", ["fourier", "rbf", "cheby"])
@pytest.mark.parametrize("rank", [3, None])
def test_output_shape_and_gradients_reach_every_parameter(basis: str, rank: int | None) -> None:
    attn = KArAtAttention(D, H, T, basis=basis, rank=rank)
    x = torch.randn(B, T, D, requires_grad=True)
    out = attn(x)
    assert out.shape == (B, T, D)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_kernel_normalisation_reference() -> None:
    # Full-rank Fourier operator set to phi_jk(a) = delta_jk cos(a) plus bias 1: each weight row is
    # (1 + cos a_j) / sum_k (1 + cos a_k), softmax's normalisation with exp replaced by 1 + cos.
    attn = KArAtAttention(D, H, T, basis="fourier", rank=None, basis_kwargs={"n_freqs": 1})
    with torch.no_grad():
        attn.operator.coef.zero_()
        attn.operator.coef[range(T), range(T), 0] = 1.0  # the cos(1 * a) coefficient
        attn.operator.bias.fill_(1.0)
    x = torch.randn(B, T, D)
    _, _, v, scores = _qkv(attn, x)
    kernel = 1 + torch.cos(scores)
    expected = _merge(attn, kernel / kernel.sum(-1, keepdim=True), v)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_low_rank_operator_reference() -> None:
    # Written out: weights = L1-normalise(E (sum_kf a_rkf cos(f s_k) + b_rkf sin(f s_k) + c_r)).
    attn = KArAtAttention(D, H, T, basis="fourier", rank=3, basis_kwargs={"n_freqs": 2})
    x = torch.randn(B, T, D)
    _, _, v, scores = _qkv(attn, x)
    f = torch.arange(1, 3.0)
    fs = scores[..., None] * f  # (B, H, T, T, 2)
    cos_coef, sin_coef = attn.operator.coef[..., :2], attn.operator.coef[..., 2:]
    low = (torch.einsum("bhtkf,rkf->bhtr", fs.cos(), cos_coef)
           + torch.einsum("bhtkf,rkf->bhtr", fs.sin(), sin_coef) + attn.operator.bias)
    raw = low @ attn.expand.weight.T
    weights = raw / (raw.abs().sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(attn(x), _merge(attn, weights, v), rtol=1e-5, atol=1e-6)


def test_rows_are_l1_normalised_and_raw_without_normalize() -> None:
    attn = KArAtAttention(D, H, T)
    q, k, _, _ = _qkv(attn, torch.randn(B, T, D))
    torch.testing.assert_close(attn.attention_weights(q, k).abs().sum(-1),
                               torch.ones(B, H, T), rtol=1e-4, atol=1e-4)
    attn.normalize = False
    assert not torch.allclose(attn.attention_weights(q, k).abs().sum(-1), torch.ones(B, H, T))


def test_wrong_token_count_and_heads_fail_clearly() -> None:
    attn = KArAtAttention(D, H, T)
    with pytest.raises(ConfigError, match="built for 6 tokens"):
        attn(torch.randn(B, T + 1, D))
    with pytest.raises(ConfigError, match="divisible"):
        KArAtAttention(D, 3, T)


def test_transformer_takes_attention_by_name() -> None:
    model = transformer((1, 8, 8), 10, d_model=D, n_heads=H, patch=2, attention="karat",
                        attention_kwargs={"basis": "rbf", "rank": 4})
    attn = model.blocks[1].attn
    assert isinstance(attn, KArAtAttention) and attn.n_tokens == 16
    assert attn.operator.out_features == 4
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(UnknownNameError, match="softmax"):
        transformer((1, 8, 8), 10, attention="softmx")


@pytest.mark.slow
def test_fourier_karat_is_close_to_softmax_on_digits() -> None:
    # The paper's check at small scale: a tiny ViT on 8 x 8 digits with 2 x 2 patches (16 tokens).
    def accuracy(attention: str) -> float:
        kwargs = {"patch": 2, "d_model": 32, "depth": 1, "attention": attention}
        cell = Cell(dataset="digits", model="transformer", model_kwargs=kwargs,
                    trainer={"epochs": 20, "lr": 3e-3, "batch_size": 64})
        result = run_cell(cell)
        assert result.status == "ok", result.reason
        return result.metrics["test_accuracy"]

    softmax, karat = accuracy("softmax"), accuracy("karat")
    assert softmax >= 0.92
    assert karat >= softmax - 0.03, (karat, softmax)
