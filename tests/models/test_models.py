from __future__ import annotations

import pytest
import torch

from nnarena.errors import IncompatibleError
from nnarena.layers.black_box import BlackBoxGradientError
from nnarena.models import Blocks, create_model
from nnarena.registry import REGISTRY

CONV_MODELS = [e.name for e in REGISTRY.list("model") if e.capabilities.get("conv")]
SHAPES = {"image": (1, 8, 8), "sequence": (2, 16), "flat": (12,)}


def _shapes_for(name: str) -> list[tuple[int, ...]]:
    return [SHAPES["image"], SHAPES["sequence"]] if name in CONV_MODELS else list(SHAPES.values())


@pytest.mark.parametrize("name", REGISTRY.names("model"))
def test_every_model_runs_forward_and_backward(name: str) -> None:
    for shape in _shapes_for(name):
        kwargs = {"patch": 2} if name == "transformer" else {}
        model = create_model(name, shape, 5, **kwargs)
        assert isinstance(model, Blocks)
        x = torch.randn(4, *shape)
        out = model(x)
        assert out.shape == (4, 5)
        if REGISTRY.get("model", name).capabilities.get("black_box"):
            with pytest.raises(BlackBoxGradientError, match="no gradient through a BlackBox"):
                out.square().mean().backward()
            continue
        out.square().mean().backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name} {shape} {pname}"


@pytest.mark.parametrize("name", REGISTRY.names("model"))
def test_forward_intermediates_match_forward(name: str) -> None:
    shape = _shapes_for(name)[0]
    kwargs = {"patch": 2} if name == "transformer" else {}
    model = create_model(name, shape, 3, **kwargs).eval()
    x = torch.randn(2, *shape)
    features, out = model.forward_intermediates(x)
    assert len(features) == len(model.blocks)
    torch.testing.assert_close(out, model(x))


def test_mlp_hidden_widths_and_depth() -> None:
    model = create_model("mlp", (2,), 1, hidden=(5,))
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [5, 1]
    deep = create_model("mlp", (10,), 3, width=7, depth=4)
    assert len(deep.blocks) == 4


def test_cnn_picks_1d_or_2d_from_the_input_shape() -> None:
    assert any(isinstance(m, torch.nn.Conv1d) for m in create_model("cnn", (3, 20), 2).modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in create_model("cnn", (3, 8, 8), 2).modules())


def test_cnn_on_flat_input_says_what_to_use() -> None:
    with pytest.raises(IncompatibleError, match=r"needs \(C, L\) or \(C, H, W\) inputs.*\(12,\).*"
                       "mlp"):
        create_model("cnn", (12,), 2)


def test_transformer_on_tokens() -> None:
    model = create_model("transformer", (6,), 4, vocab_size=11, d_model=16, n_heads=2)
    tokens = torch.randint(0, 11, (3, 6)).float()
    assert model(tokens).shape == (3, 4)


def test_unknown_layer_name_fails_before_building() -> None:
    with pytest.raises(Exception, match=r"unknown layer 'lineer'.*'linear'"):
        create_model("mlp", (4,), 2, layer="lineer")
