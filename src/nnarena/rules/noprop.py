"""NoProp-DT: every block learns on its own to denoise a noisy label embedding.

Rule ``noprop`` ("NoProp: Training Neural Networks without Back-propagation or
Forward-propagation", Li, Teh and Pascanu, arXiv:2503.24322), discrete-time variant, on the
``noprop-mlp`` model (`nnarena.models.noprop`). In one step, block ``t = 1..T`` receives ``x``
and ``z_{t-1}`` sampled directly from ``q(z_{t-1} | y)`` (no forward chaining) and is trained to
predict the class embedding ``u_y`` with the SNR-weighted L2 loss
``eta * T / 2 * (SNR(t) - SNR(t-1)) * ||u_hat_t - u_y||^2``, backpropagated at once into block
``t`` alone and freed, so the saved-activation peak is one block's whatever T; the head learns
cross-entropy on ``z_T ~ q(z_T | y)``. Prediction runs the inference chain from Gaussian noise
(`NoPropNet.infer`), with the sampler and the noise scale as options. Deviation: the KL term on
``z_0`` is left out (it is constant for fixed embeddings; with ``learn_embedding`` the
embeddings learn from the block and head losses only).
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models.noprop import NoPropNet
from nnarena.registry import register
from nnarena.rules.base import LearningRule, RuleCapabilities

__all__ = ["SAMPLERS", "NoProp"]

SAMPLERS = ("posterior", "marginal")
_CAPABILITIES = RuleCapabilities(supports_conv=False, supports_regression=False)


@register("rule", "noprop",
          paper="NoProp: Training Neural Networks without Back-propagation or "
                "Forward-propagation",
          summary="Each block denoises a noisy label embedding on its own; inference chains "
                  "the blocks from noise (model noprop-mlp).",
          capabilities={**dataclasses.asdict(_CAPABILITIES), "models": ["noprop-mlp"]})
class NoProp(LearningRule):
    """NoProp-DT on a `NoPropNet` (model ``noprop-mlp``).

    Args:
        eta: weight of the denoising losses against the head's cross-entropy (under Adam,
            whose steps are scale-free, it barely matters: each block has its own parameters).
        sampler: inference update, ``posterior`` (the paper's) or ``marginal`` (see
            `NoPropNet.infer`).
        noise: scale of the inference noise, ``z_0`` included (1: the paper's; 0: deterministic).

    Raises:
        ConfigError: an unknown sampler or a negative ``eta`` or ``noise``.
    """

    capabilities = _CAPABILITIES

    def __init__(self, eta: float = 0.1, sampler: str = "posterior", noise: float = 1.0) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown noprop sampler '{sampler}'; valid: {', '.join(SAMPLERS)}")
        if eta < 0 or noise < 0:
            raise ConfigError(f"noprop needs eta >= 0 and noise >= 0, got {eta} and {noise}")
        self.eta, self.sampler, self.noise = eta, sampler, noise

    @override
    def check(self, model: nn.Module) -> None:
        if not isinstance(model, NoPropNet):
            raise IncompatibleError(f"rule '{self.name}' trains only model 'noprop-mlp' (blocks "
                                    f"taking x and a noisy label), got {type(model).__name__}")
        super().check(model)

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        net = cast(NoPropNet, model)  # `check` ran first
        steps = len(net.blocks)
        snr = net.alpha_bar / (1 - net.alpha_bar)
        weighted, plain = [], []
        for t, block in enumerate(net.blocks, start=1):
            z = net.noisy_embedding(y, t - 1)
            error = (block(x, z, net.embed) - net.embed[y]).pow(2).sum(dim=1).mean()
            loss = self.eta * steps / 2 * (snr[t] - snr[t - 1]) * error
            loss.backward()  # block t only; its graph is freed before block t + 1 runs
            weighted.append(float(loss.detach()))
            plain.append(float(error.detach()))
        ce = self.criterion(net.head(net.noisy_embedding(y, steps)), y)
        ce.backward()
        return {"loss": float(ce.detach()) + sum(weighted), "ce": float(ce.detach()),
                "denoise_mse": sum(plain) / steps}

    @override
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return cast(NoPropNet, model).infer(x, self.sampler, self.noise)
