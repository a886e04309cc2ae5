"""Robust convex ReLU training: the recovered net reproduces the convex model on and around the
data, eps=0 is convex-relu's program, it beats FGSM training under PGD, bad options fail."""

from __future__ import annotations

import pytest
import torch

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import create_model
from nnarena.rules import create_rule
from nnarena.rules.convex import ConvexReLU
from nnarena.rules.convex_robust import RobustConvexReLU

BETA, WIDTH, EPS = 1e-2, 20, 0.05


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 20)[:, None]
    return x, torch.sin(3 * x) + 0.1 * torch.randn(20, 1)


def _robust(eps: float) -> tuple[torch.nn.Module, RobustConvexReLU, torch.Tensor]:
    x = _data()[0]
    model = create_model("mlp", (1,), 1, width=WIDTH, depth=1)
    rule = create_rule("convex-relu-robust", eps=eps, loss="squared", beta=BETA, n_patterns=200)
    assert isinstance(rule, RobustConvexReLU)
    return model, rule, x


def test_recovered_net_reproduces_the_convex_model_over_each_eps_ball() -> None:
    model, rule, x = _robust(EPS)
    program = rule.program(model, x, _data()[1], seed=0)
    u = program.solve(2000)
    assert program.max_violation(u) < 1e-6
    assert rule.load_solution(model, u) == 0
    clean, spread = program.worst_case(u)
    assert spread.min() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), clean, atol=1e-5, rtol=0)
        ends = torch.cat([model(x - EPS), model(x + EPS)], 1).double()  # 1-D: the ball's ends
        torch.testing.assert_close(ends.max(1, keepdim=True)[0], clean + spread, atol=1e-5, rtol=0)
        torch.testing.assert_close(ends.min(1, keepdim=True)[0], clean - spread, atol=1e-5, rtol=0)


def test_eps_zero_is_the_convex_relu_program() -> None:
    model, rule, x = _robust(0.0)
    y = _data()[1]
    robust = rule.program(model, x, y, seed=0)
    u = robust.solve(1000)
    plain_rule = create_rule("convex-relu", beta=BETA, n_patterns=200)
    assert isinstance(plain_rule, ConvexReLU)
    plain = plain_rule.program(model, x, y, seed=0)
    z = plain.solve(1000)
    assert robust.objective(u) == pytest.approx(plain.objective(z), rel=1e-5)
    torch.testing.assert_close(robust.predict(u), plain.predict(z) * len(x) ** 0.5,
                               atol=1e-3, rtol=0)


def _blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = 2.0 * torch.randint(0, 2, (n,), generator=generator) - 1
    x = torch.randn(n, 2, generator=generator) * torch.tensor([1.0, 0.3])
    return x + y[:, None] * torch.tensor([0.0, 0.6]), y


def _pgd_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(20):
        (grad,) = torch.autograd.grad((y * model(x + delta)[:, 0]).sum(), delta)
        delta = (delta - eps / 4 * grad.sign()).clamp(-eps, eps).detach().requires_grad_(True)
    with torch.no_grad():
        return (y * model(x + delta)[:, 0] > 0).double().mean().item()


def _fgsm_net(x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = create_model("mlp", (2,), 1, width=40, depth=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(500):
        probe = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((y * net(probe)[:, 0]).sum(), probe)
        optimizer.zero_grad()
        (1 - y * net(x - eps * grad.sign())[:, 0]).clamp_min(0).mean().backward()
        optimizer.step()
    return net


@pytest.mark.slow
def test_pgd_accuracy_beats_fgsm_training_on_average_over_three_seeds() -> None:
    eps, convex, fgsm = 0.3, [], []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        (x, y), (x_test, y_test) = _blobs(200, generator), _blobs(500, generator)
        model = create_model("mlp", (2,), 1, width=40, depth=1)
        rule = create_rule("convex-relu-robust", eps=eps, iterations=1000)
        assert isinstance(rule, RobustConvexReLU)
        program = rule.program(model, x, y[:, None], seed)
        assert rule.load_solution(model, program.solve(1000)) == 0
        convex.append(_pgd_accuracy(model, x_test, y_test, eps))
        fgsm.append(_pgd_accuracy(_fgsm_net(x, y, eps, seed), x_test, y_test, eps))
    print(f"PGD accuracy (eps={eps}): convex-robust {convex}, fgsm {fgsm}")
    assert sum(convex) > sum(fgsm)


def test_bad_options_raise_config_errors_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="eps must be >= 0"):
        RobustConvexReLU(eps=-0.1)
    with pytest.raises(ConfigError, match="loss must be one of hinge, squared"):
        RobustConvexReLU(loss="logistic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'hinge', 'squared'"):
        create_rule("convex-relu-robust", loss="logistic")
    with pytest.raises(ConfigError, match="convex-relu-robust beta must be > 0"):
        create_rule("convex-relu-robust", beta=0.0)
    with pytest.raises(IncompatibleError, match="use loss='squared' for regression"):
        create_rule("convex-relu-robust").configure("regression")
    with pytest.raises(IncompatibleError, match="one ReLU hidden layer"):
        create_rule("convex-relu-robust").check(create_model("mlp", (4,), 2, width=8, depth=2))
    big = create_model("mlp", (1, 28, 28), 10, width=200, depth=1)
    with pytest.raises(IncompatibleError, match=r"31380 rows .* smaller n_patterns"):
        create_rule("convex-relu-robust").check(big)
    create_rule("convex-relu-robust", n_patterns=3).check(big)  # 2*3*1569 rows fit
