"""Neuro-modulated Hebbian test-time adaptation (``nhl-tta``): the Hebbian step against
`softhebb_update`, the modulator's entropy descent with the classifier locked, and accuracy on
digits with synthetic corruptions (noise, blur, contrast)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnarena.data import DataBundle, load
from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import Blocks, create_model
from nnarena.registry import REGISTRY
from nnarena.rules.hebbian import softhebb_update
from nnarena.rules.hebbian_tta import NHLAdapter
from nnarena.train import Trainer


def corrupt(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """Digits (globally standardised) with Gaussian noise, a 3x3 box blur or 0.15x contrast."""
    if kind == "noise":
        return x + torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    if kind == "blur":
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + 0.15 * (x - mean)


def source_model(seed: int) -> tuple[Blocks, DataBundle]:
    """A CNN (3x3 conv 16 and 32 channels, batch norm, ReLU, max-pool) trained by backprop on
    clean digits."""
    data = load("digits", seed=seed)
    torch.manual_seed(seed)
    model = create_model("cnn", data.input_shape, 10, channels=(16, 32))
    Trainer("backprop", epochs=15, lr=1e-3, seed=seed, measure=False).fit(model, data)
    return model, data


def stream_accuracy(model: Blocks, y: torch.Tensor, x: torch.Tensor, batch: int = 32,
                    **options: float | bool) -> float:
    """Online accuracy of a fresh copy of ``model`` adapted batch by batch on ``x``."""
    adapter = NHLAdapter(**options)  # type: ignore[arg-type]
    adapter.attach(copy.deepcopy(model))
    correct = sum(int((adapter.adapt(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(y), batch))
    return correct / len(y)


def _tiny() -> tuple[Blocks, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("mlp", (1, 4, 4), 3, width=8, depth=2), torch.randn(10, 1, 4, 4)


def test_hebbian_step_moves_only_the_first_layer_by_the_soft_hebbian_update() -> None:
    model, x = _tiny()
    before = copy.deepcopy(model)
    adapter = NHLAdapter(hebbian_lr=0.1, temperature=0.5, modulate=False)
    adapter.attach(model)
    logits = adapter.adapt(x)
    w0 = before.blocks[0][1].weight
    torch.testing.assert_close(model.blocks[0][1].weight,
                               w0 + 0.1 * softhebb_update(w0, x.flatten(1), 0.5))
    changed = [n for (n, p), q in zip(model.named_parameters(), before.parameters(), strict=True)
               if not torch.equal(p, q)]
    assert changed == ["blocks.0.1.weight"]
    torch.testing.assert_close(logits, model(x))  # identity modulator


def test_modulator_descends_the_prediction_entropy_with_the_model_locked() -> None:
    model, x = _tiny()
    before = copy.deepcopy(model)
    adapter = NHLAdapter(hebbian=False, modulator_lr=0.05)
    adapter.attach(model)

    def entropy() -> float:
        p = torch.softmax(adapter.forward(x).detach(), 1)
        return float(-(p * p.log()).sum(1).mean())

    start = entropy()
    for _ in range(20):
        adapter.adapt(x)
    assert entropy() < start - 0.05
    for p, q in zip(model.parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q) and p.grad is None


def test_bad_use_fails_with_the_cause() -> None:
    with pytest.raises(ConfigError, match="temperature > 0"):
        NHLAdapter(temperature=0.0)
    with pytest.raises(IncompatibleError, match="needs a Blocks model"):
        NHLAdapter().attach(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(RuntimeError, match="call attach"):
        NHLAdapter().adapt(torch.zeros(1, 3))
    entry = REGISTRY.get("tta", "nhl-tta")
    assert entry.paper == "Neuro-Modulated Hebbian Learning for Fully Test-Time Adaptation"


def test_conv_hebbian_step_treats_every_receptive_field_as_an_input() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", (1, 6, 6), 3, channels=(4,))
    x = torch.randn(5, 1, 6, 6)
    conv = model.blocks[0][0]
    w0 = conv.weight.detach().clone().view(4, -1)
    adapter = NHLAdapter(hebbian_lr=0.1, temperature=2.0, modulate=False)
    adapter.attach(model)
    adapter.adapt(x)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 9)
    expected = w0 + 0.1 * softhebb_update(w0, patches, 2.0)
    torch.testing.assert_close(conv.weight.view(4, -1), expected)


def test_batch_norm_uses_the_test_batch_statistics_unless_told_otherwise() -> None:
    torch.manual_seed(0)
    model = create_model("mlp", (6,), 3, width=8, depth=1, norm="batch")
    model.train()
    model(torch.randn(64, 6))  # running statistics of the source data
    x = 3 + 2 * torch.randn(16, 6)  # shifted test batch
    source, tent = copy.deepcopy(model), copy.deepcopy(model)
    fixed = NHLAdapter(hebbian=False, modulate=False, batch_stats=False)
    fixed.attach(source)
    torch.testing.assert_close(fixed.adapt(x), model.eval()(x))
    adaptive = NHLAdapter(hebbian=False, modulate=False)
    adaptive.attach(tent)
    linear, norm = tent.blocks[0][1], tent.blocks[0][2]
    torch.testing.assert_close(norm(linear(x)).mean(0), norm.bias, atol=1e-5, rtol=0)
    assert not torch.allclose(adaptive.adapt(x), fixed.adapt(x))


@pytest.mark.slow
def test_nhl_beats_the_source_model_and_matches_entropy_minimisation_on_corrupted_digits() -> None:
    """NHL (test-batch BN statistics, soft Hebbian first conv, entropy-trained modulator) is far
    above the unadapted source model on every corruption and at least as good as entropy
    minimisation alone on the mean over corruptions. The margin over entropy minimisation is
    small (+1.0 point on seed 0, +0.5 mean of seeds 0-2, +0.1 on held-out seeds 3-5: module
    docstring of `hebbian_tta`), so the test only asserts it is not lost."""
    model, data = source_model(0)
    source, entropy, nhl = [], [], []
    for kind in ("noise", "blur", "contrast"):
        x = corrupt(data.test.x, kind, 0)
        source.append(stream_accuracy(model, data.test.y, x, hebbian=False, modulate=False,
                                      batch_stats=False))
        entropy.append(stream_accuracy(model, data.test.y, x, hebbian=False))
        nhl.append(stream_accuracy(model, data.test.y, x))
        assert nhl[-1] > source[-1] + 0.03, (kind, nhl[-1], source[-1])
        assert nhl[-1] >= entropy[-1] - 0.01, (kind, nhl[-1], entropy[-1])
    assert sum(nhl) / 3 > sum(source) / 3 + 0.3, (nhl, source)
    assert sum(nhl) / 3 >= sum(entropy) / 3 + 0.003, (nhl, entropy)
