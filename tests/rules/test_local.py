"""Local learning with auxiliary networks: ``local`` (linear, infopro, auglocal, man) and presets.

Oracles: a per-block reference computation (gradients), the EMA formula, AugLocal's sampling
formula worked by hand, a checkpoint round trip, and accuracy on mnist5k against backprop.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from nnarena.cell import Cell, run_cell
from nnarena.checkpoint import load_weights, save_weights
from nnarena.data import DataBundle
from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import Blocks, create_model
from nnarena.registry import REGISTRY
from nnarena.rules import create_rule
from nnarena.rules.aux_nets import sample_following
from nnarena.rules.local import Local
from nnarena.train import Trainer

RULES = ["local", "infopro", "auglocal", "man"]
MODELS = {  # name -> (model, input shape, model kwargs)
    "mlp": ("mlp", (1, 6, 6), {"width": 10, "depth": 4}),
    "cnn": ("cnn", (1, 8, 8), {"channels": (4, 6, 6)}),
    "resnet": ("resnet", (1, 8, 8), {"width": 8, "depth": 2}),
}


def _setup(rule_name: str, model_key: str, **rule_kwargs) -> tuple[Blocks, Local, torch.Tensor,
                                                                    torch.Tensor]:
    name, shape, kwargs = MODELS[model_key]
    model = create_model(name, shape, 3, **kwargs)
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    rule = create_rule(rule_name, **rule_kwargs)
    rule.configure("classification")
    rule.check(model)
    rule.prepare(model, (x, y))
    return model, rule, x, y


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("rule_name", RULES)
def test_each_block_learns_from_its_own_local_loss_only(rule_name: str, model_key: str) -> None:
    model, rule, x, y = _setup(rule_name, model_key)
    ref_model, ref_aux = copy.deepcopy(model), copy.deepcopy(rule.owned["aux"])
    arrivals: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(model.blocks))}
    inputs_need_grad: list[bool] = []
    hooks = [model.head.register_forward_pre_hook(
        lambda _m, args: inputs_need_grad.append(args[0].requires_grad))]

    def record(k: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            out.register_hook(arrivals[k].append)  # every gradient that reaches block k's output
        return hook

    for k, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(record(k)))
        if k:
            hooks.append(block.register_forward_pre_hook(
                lambda _m, args: inputs_need_grad.append(args[0].requires_grad)))
    rule.step(model, x, y)
    for hook in hooks:
        hook.remove()

    assert inputs_need_grad == [False] * len(model.blocks)  # every block and the head: detached
    h = x
    for k, (block, ref_block) in enumerate(zip(model.blocks, ref_model.blocks, strict=True)):
        out = ref_block(h)  # the reference: block k and its auxiliary network, nothing else
        loss = ref_aux[k].loss(out, x, y, rule.criterion)
        params = [p for p in (*ref_block.parameters(), *ref_aux[k].parameters())
                  if p.requires_grad]
        wanted = torch.autograd.grad(loss, [out, *params])
        assert len(arrivals[k]) == 1  # one signal reaches block k: not one from block k+1 too
        torch.testing.assert_close(arrivals[k][0], wanted[0])
        got = [p for p in (*block.parameters(), *rule.owned["aux"][k].parameters())
               if p.requires_grad]
        for p, g in zip(got, wanted[1:], strict=True):
            torch.testing.assert_close(p.grad, g)
        h = out.detach()
    wanted = torch.autograd.grad(rule.criterion(ref_model.head(h), y),
                                 list(ref_model.head.parameters()))
    for p, g in zip(model.head.parameters(), wanted, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_man_auxiliary_starts_as_the_next_block_and_its_ema_follows_the_formula() -> None:
    model, rule, x, y = _setup("man", "mlp", momentum=0.9)
    aux = rule.owned["aux"]

    def source(k: int) -> nn.Module:
        return model.blocks[k + 1] if k + 1 < len(model.blocks) else model.head

    h = torch.randn(5, 10)
    for k, net in enumerate(aux):
        torch.testing.assert_close(net.shifted(h), source(k)(h))  # ema + biases, biases = 0
        for e, p in zip(net.ema, source(k).parameters(), strict=True):
            torch.testing.assert_close(e, p)
            assert e.data_ptr() != p.data_ptr() and not e.requires_grad
    trained = {id(p) for p in rule.parameters(model)}
    assert not any(id(e) in trained for net in aux for e in net.ema)

    with torch.no_grad():  # stand-ins for optimizer steps: the next blocks and the biases move
        for p in [*model.parameters(), *rule.parameters(model)]:
            p.add_(torch.randn_like(p))
    before = [([e.clone() for e in net.ema],
               [s - e for s, e in zip(net.shifted.parameters(), net.ema, strict=True)])
              for net in aux]
    rule.step(model, x, y)
    for k, (net, (ema, biases)) in enumerate(zip(aux, before, strict=True)):
        for e, old, p in zip(net.ema, ema, source(k).parameters(), strict=True):
            torch.testing.assert_close(e, 0.9 * old + 0.1 * p)
            assert e.grad is None
        for s, e, b in zip(net.shifted.parameters(), net.ema, biases, strict=True):
            torch.testing.assert_close(s - e, b)  # the EMA update leaves the biases alone
            assert s.grad is not None and s.grad.abs().sum() > 0


def test_auglocal_samples_following_blocks_uniformly_fewer_with_depth() -> None:
    # Worked by hand: 8 blocks, depth 3, shrink 0.5: counts 3, 3, ..., falling towards 2.
    assert sample_following(8, 0, 3, 0.5) == [2, 5, 7]
    assert sample_following(8, 1, 3, 0.5) == [3, 5, 7]
    assert sample_following(8, 3, 3, 0.5) == [5, 7]
    assert sample_following(8, 3, 3, 0.0) == [4, 6, 7]  # no shrink: depth kept
    assert sample_following(8, 6, 3, 0.5) == [7]
    assert sample_following(8, 7, 3, 0.5) == []
    counts = [len(sample_following(40, k, 5, 0.5)) for k in range(40)]
    assert counts[0] == 5 and counts[-2] == 1 and counts[-1] == 0
    assert counts[20] == 4 and all(a >= b for a, b in itertools.pairwise(counts))


def test_auglocal_copies_later_blocks_with_fresh_weights() -> None:
    model, rule, _, _ = _setup("auglocal", "mlp", depth=2, shrink=0.0)
    aux = rule.owned["aux"]
    assert [net.sampled for net in aux] == [(2, 3), (2, 3), (3,), ()]
    primary = {p.data_ptr() for p in model.parameters()}
    for net in aux:
        copies = list(net.net)[:-1]
        for j, block in zip(net.sampled, copies, strict=True):
            assert [type(m) for m in block.modules()] == [
                type(m) for m in model.blocks[j].modules()]
            for p, q in zip(block.parameters(), model.blocks[j].parameters(), strict=True):
                assert p.data_ptr() not in primary and not torch.equal(p, q)
    assert isinstance(list(aux[-1].net)[-1], nn.Linear)  # the last block: classifier alone


def test_auglocal_adapts_the_width_where_a_skipped_block_changes_it() -> None:
    model, rule, x, y = _setup("auglocal", "cnn", depth=1)  # block 0 (4 ch) -> copy of block 2
    first = list(rule.owned["aux"][0].net)
    assert rule.owned["aux"][0].sampled == (2,)
    assert isinstance(first[0], nn.Conv2d) and (first[0].in_channels, first[0].out_channels) == (
        4, 6)
    assert torch.isfinite(torch.tensor(rule.step(model, x, y)["loss"]))


@pytest.mark.parametrize("rule_name", RULES)
def test_rule_state_round_trips_through_a_checkpoint(rule_name: str, tmp_path) -> None:
    model, rule, x, y = _setup(rule_name, "cnn")
    optimizer = torch.optim.Adam(rule.parameters(model), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        rule.step(model, x, y)
        optimizer.step()
    save_weights(tmp_path / "w.safetensors", model, rule)
    torch.manual_seed(1)
    other_model, other_rule, _, _ = _setup(rule_name, "cnn")
    load_weights(tmp_path / "w.safetensors", other_model, other_rule)
    state, loaded = rule.state_dict(), other_rule.state_dict()
    assert state.keys() == loaded.keys() and len(state) > 0
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert rule.step(model, x, y) == other_rule.step(other_model, x, y)


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("rule_name", RULES)
def test_trains_mlp_cnn_and_resnet(rule_name: str, model_key: str, blobs: DataBundle) -> None:
    name, _, kwargs = MODELS[model_key]
    model = create_model(name, blobs.input_shape, blobs.n_classes, **kwargs)
    result = Trainer(rule_name, epochs=12, lr=2e-2, batch_size=32, measure=False).fit(model, blobs)
    assert result.status == "ok" and result.metrics["test_accuracy"] >= 0.8  # chance: 1/3


def test_bad_configurations_fail_with_the_valid_choices() -> None:
    with pytest.raises(ConfigError, match=r"'linera' \(did you mean 'linear'\?\); "
                                          r"valid: auglocal, infopro, linear, man"):
        Local(aux="linera")
    with pytest.raises(ConfigError, match="has no option 'depht'; accepted: depth, shrink"):
        Local(aux="auglocal", aux_kwargs={"depht": 2})
    with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\)"):
        create_rule("man", momentum=1.0)
    with pytest.raises(ConfigError, match="accepted: depth, shrink"):
        create_rule("auglocal", aux="man")
    with pytest.raises(IncompatibleError, match="needs a Blocks model"):
        create_rule("local").check(nn.Sequential(nn.Linear(2, 2)))


def test_each_paper_has_its_own_registry_entry() -> None:
    papers = {name: REGISTRY.get("rule", name).paper for name in RULES}
    assert papers == {
        "local": "Greedy Layerwise Learning Can Scale to ImageNet",
        "infopro": "Revisiting Locally Supervised Learning: an Alternative to End-to-end Training",
        "auglocal": "Scaling Supervised Local Learning with Augmented Auxiliary Networks",
        "man": "Momentum Auxiliary Network for Supervised Local Learning",
    }
    assert all(REGISTRY.get("rule", n).capabilities["needs_blocks"] for n in RULES)


def _mnist5k_accuracy(rule: str) -> float:
    result = run_cell(Cell(dataset="mnist5k", model="mlp", model_kwargs={"width": 256, "depth": 2},
                           rule=rule, trainer={"epochs": 15, "lr": 1e-3, "batch_size": 64,
                                               "optimizer": "adam"}, seed=0))
    assert result.status == "ok", result.reason
    return result.metrics["test_accuracy"]


@pytest.fixture(scope="module")
def backprop_accuracy() -> float:
    return _mnist5k_accuracy("backprop")


@pytest.mark.slow
@pytest.mark.parametrize(("rule", "gap"), [("local", 0.03), ("auglocal", 0.02), ("man", 0.02),
                                           ("infopro", 0.03)])
def test_mnist5k_accuracy_is_close_to_backprop(rule: str, gap: float,
                                               backprop_accuracy: float) -> None:
    assert _mnist5k_accuracy(rule) >= backprop_accuracy - gap
