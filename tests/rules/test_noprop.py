"""NoProp-DT (``noprop`` on ``noprop-mlp``).

Oracles: each block's gradient against a per-block reference computation, the order in which
gradients arrive (each block's loss reaches its own parameters only, before the next block
runs), the inference update's marginals against ``q(z_t | y)`` when a block predicts ``u_y``
exactly, a saved-activation peak that does not grow with T, the compatibility errors, and
accuracy on digits (methods.tsv: >= 90% with T = 10).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nnarena.cell import Cell, run_cell
from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import create_model
from nnarena.models.noprop import NoPropNet, noise_schedule
from nnarena.registry import REGISTRY
from nnarena.rules import create_rule
from nnarena.rules.noprop import NoProp
from nnarena.train.metrics import SavedActivationMeter


def _setup(steps: int = 3, width: int = 16, **model_kwargs) -> tuple[NoPropNet, NoProp,
                                                                     torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("noprop-mlp", (1, 6, 6), 4, steps=steps, width=width, **model_kwargs)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,))
    rule = create_rule("noprop")
    rule.configure("classification")
    rule.check(model)
    rule.prepare(model, (x, y))
    return model, rule, x, y


def test_each_block_learns_from_its_own_denoising_loss_only() -> None:
    model, rule, x, y = _setup()
    ref = copy.deepcopy(model)
    running: list[str] = []  # the module whose forward ran last
    arrivals: list[tuple[str, str]] = []  # (module running, module whose parameter got a grad)
    for name, module in [*((f"block{t}", b) for t, b in enumerate(model.blocks)),
                         ("head", model.head)]:
        module.register_forward_pre_hook(lambda _m, _a, name=name: running.append(name))
        for p in module.parameters():
            p.register_post_accumulate_grad_hook(
                lambda _p, name=name: arrivals.append((running[-1], name)))
    torch.manual_seed(5)
    rule.step(model, x, y)

    params_per_module = [len(list(b.parameters())) for b in model.blocks]
    assert [a for a, b in arrivals if a != b] == []  # no loss reaches another block's weights
    assert [b for _, b in arrivals] == [name for t, n in enumerate(params_per_module)
                                        for name in [f"block{t}"] * n] + ["head"] * 2
    torch.manual_seed(5)  # the same noise, drawn in the same order: a per-block reference
    snr = ref.alpha_bar / (1 - ref.alpha_bar)
    for t, (block, ref_block) in enumerate(zip(model.blocks, ref.blocks, strict=True), start=1):
        z = ref.noisy_embedding(y, t - 1)
        error = (ref_block(x, z, ref.embed) - ref.embed[y]).pow(2).sum(dim=1).mean()
        loss = 0.1 * 3 / 2 * (snr[t] - snr[t - 1]) * error
        wanted = torch.autograd.grad(loss, list(ref_block.parameters()))
        for p, g in zip(block.parameters(), wanted, strict=True):
            torch.testing.assert_close(p.grad, g)
    ce = nn.functional.cross_entropy(ref.head(ref.noisy_embedding(y, 3)), y)
    for p, g in zip(model.head.parameters(), torch.autograd.grad(ce, list(ref.head.parameters())),
                    strict=True):
        torch.testing.assert_close(p.grad, g)


class _Oracle(nn.Module):
    """A block that always predicts class 0's embedding."""

    def forward(self, x: torch.Tensor, z: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        return embed[0].expand_as(z)


@pytest.mark.parametrize("sampler", ["posterior", "marginal"])
def test_inference_keeps_the_marginals_of_q_when_blocks_predict_the_embedding(sampler: str
                                                                             ) -> None:
    model, _, _, _ = _setup(steps=3, schedule="linear")
    model.head = nn.Identity()
    x = torch.zeros(40000, 36)
    for k in (1, 2, 3):  # z_k after k blocks ~ N(sqrt(alpha_bar_k) u, (1 - alpha_bar_k) I)
        model.blocks = nn.ModuleList([_Oracle() for _ in range(k)])
        torch.manual_seed(k)
        z = model.infer(x, sampler, noise=1.0)
        alpha_bar = model.alpha_bar[k]
        torch.testing.assert_close(z.mean(0), alpha_bar.sqrt() * model.embed[0],
                                   atol=0.02, rtol=0)
        torch.testing.assert_close(z.var(0), (1 - alpha_bar).expand(4), atol=0.02, rtol=0.05)
    torch.testing.assert_close(model.infer(x[:2], sampler, noise=0.0),
                               model.alpha_bar[3].sqrt() * model.embed[0].expand(2, 4))


def test_schedules_rise_from_noise_to_nearly_clean() -> None:
    cosine = noise_schedule("cosine", 10)
    assert cosine[0] == 0 and 0.999 < cosine[-1] <= 0.9999
    assert bool((cosine[1:] > cosine[:-1]).all())
    torch.testing.assert_close(noise_schedule("linear", 4), torch.tensor([0, .25, .5, .75, .9999]))


def test_saved_activation_peak_does_not_grow_with_the_number_of_blocks() -> None:
    peaks = {}
    for steps in (2, 8):
        model, rule, x, y = _setup(steps=steps, width=64)
        meter = SavedActivationMeter(model, rule.parameters(model))
        with meter.track(x, y):
            rule.step(model, x, y)
        peaks[steps] = meter.peak
    assert peaks[2] > 0 and peaks[8] == peaks[2]


def test_learned_embeddings_are_trained_and_fixed_ones_are_buffers() -> None:
    model, rule, x, y = _setup(learn_embedding=True)
    rule.step(model, x, y)
    assert isinstance(model.embed, nn.Parameter) and model.embed.grad is not None
    fixed, _, _, _ = _setup(embed_dim=6)
    assert "embed" in dict(fixed.named_buffers())
    torch.testing.assert_close(fixed.embed @ fixed.embed.T, torch.eye(4))


def test_incompatible_models_and_rules_and_bad_options_fail_up_front() -> None:
    with pytest.raises(IncompatibleError, match="rule 'noprop' cannot train model 'mlp'"):
        Cell(dataset="digits", model="mlp", rule="noprop").check()
    with pytest.raises(IncompatibleError, match="rule 'backprop' cannot train model 'noprop-mlp'"):
        Cell(dataset="digits", model="noprop-mlp", rule="backprop").check()
    with pytest.raises(IncompatibleError, match="rule 'local' cannot train model 'noprop-mlp'"):
        Cell(dataset="digits", model="noprop-mlp", rule="local").check()
    with pytest.raises(IncompatibleError, match="cannot train a NoPropNet; rules that can: noprop"):
        create_rule("local").check(create_model("noprop-mlp", (4,), 3))
    with pytest.raises(IncompatibleError, match="trains only model 'noprop-mlp'"):
        create_rule("noprop").check(create_model("mlp", (4,), 3))
    with pytest.raises(ConfigError, match="valid: posterior, marginal"):
        create_rule("noprop", sampler="ddim")
    with pytest.raises(ConfigError, match="valid: cosine, linear"):
        create_model("noprop-mlp", (4,), 3, schedule="sigmoid")
    assert REGISTRY.get("rule", "noprop").paper == ("NoProp: Training Neural Networks without "
                                                    "Back-propagation or Forward-propagation")


@pytest.mark.slow
def test_digits_accuracy_reaches_the_check_of_methods_tsv() -> None:
    result = run_cell(Cell(dataset="digits", model="noprop-mlp", model_kwargs={"steps": 10},
                           rule="noprop", trainer={"epochs": 15, "lr": 1e-3, "batch_size": 64,
                                                   "optimizer": "adam"}, seed=0))
    assert result.status == "ok" and result.metrics["test_accuracy"] >= 0.90
