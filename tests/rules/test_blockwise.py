"""The block runner and the gradient-replacing identity that non-backprop rules share."""

from __future__ import annotations

import torch
from torch import nn

from nnarena.models.mlp import mlp
from nnarena.rules.blockwise import replace_grad, run_blockwise
from nnarena.train.metrics import SavedActivationMeter


def test_each_block_gets_only_its_own_signal() -> None:
    model = mlp((6,), 3, width=5, depth=3)
    x, grads = torch.randn(4, 6), [torch.randn(4, 5) for _ in range(3)]
    out, losses = run_blockwise(model, x, lambda i, h: (h, grads[i]),
                                head=lambda o: o.square().mean())
    for i, block in enumerate(model.blocks):  # each block's grads: its own output gradient only
        ref = [p.detach().clone().requires_grad_() for p in block.parameters()]
        inp = x if i == 0 else _features(model, x, i)
        y = torch.func.functional_call(block, dict(zip(
            [n for n, _ in block.named_parameters()], ref, strict=True)), (inp,))
        y.backward(grads[i])
        for p, r in zip(block.parameters(), ref, strict=True):
            torch.testing.assert_close(p.grad, r.grad)
    torch.testing.assert_close(out, model(x))
    assert len(losses) == 1 and abs(losses[0] - model(x).square().mean().item()) < 1e-6


def _features(model: nn.Module, x: torch.Tensor, upto: int) -> torch.Tensor:
    with torch.no_grad():
        for block in model.blocks[:upto]:
            x = block(x)
    return x


def test_peak_saved_memory_is_one_blocks_not_the_depths() -> None:
    def peak(depth: int) -> int:
        model, x = mlp((64,), 10, width=128, depth=depth), torch.randn(32, 64)
        meter = SavedActivationMeter(model)
        with meter.track():
            run_blockwise(model, x, lambda i, h: h.square().mean(), head=lambda o: o.sum())
        return meter.peak

    assert peak(8) == peak(2)


def test_replace_grad_swaps_the_incoming_gradient() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    box: dict[str, torch.Tensor] = {}
    y = replace_grad(x * 2, lambda: box["g"])
    box["g"] = torch.ones(3, 4) * 7
    (y * 100).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 4), 14.0))
    torch.testing.assert_close(replace_grad(x, box["g"]), x)
