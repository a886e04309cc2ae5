"""Function-fitting regression sets from the KAN paper (Liu et al. 2024, Section 3.1).

"KAN: Kolmogorov-Arnold Networks" fits five symbolic functions from samples drawn uniformly on
``[-1, 1]^d``; here they are generated on the spot from a numpy ``Generator`` seeded by ``seed``.
Pick one with ``synthetic:<fn>``, e.g. ``synthetic:exp-sin-sq``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nnarena.data._bundle import DataBundle, make_bundle
from nnarena.errors import ConfigError, UnknownNameError
from nnarena.registry import closest, register

__all__ = ["FUNCTIONS", "SynthFn", "synthetic"]


@dataclass(frozen=True)
class SynthFn:
    """A target function of ``n_inputs`` variables, evaluated on ``(N, n_inputs)`` float64."""

    n_inputs: int
    formula: str
    f: Callable[[np.ndarray], np.ndarray]


def _bessel(x: np.ndarray) -> np.ndarray:
    from scipy.special import j0  # imported lazily, like every heavy dependency here

    return j0(20 * x[:, 0])


FUNCTIONS: dict[str, SynthFn] = {
    "bessel": SynthFn(1, "J0(20 x)", _bessel),
    "exp-sin-sq": SynthFn(2, "exp(sin(pi x1) + x2^2)",
                          lambda x: np.exp(np.sin(np.pi * x[:, 0]) + x[:, 1] ** 2)),
    "xy": SynthFn(2, "x1 x2", lambda x: x[:, 0] * x[:, 1]),
    "exp-4d": SynthFn(4, "exp((sin(pi (x1^2 + x2^2)) + sin(pi (x3^2 + x4^2))) / 2)",
                      lambda x: np.exp(0.5 * (np.sin(np.pi * (x[:, 0] ** 2 + x[:, 1] ** 2))
                                              + np.sin(np.pi * (x[:, 2] ** 2 + x[:, 3] ** 2))))),
    "exp-100d": SynthFn(100, "exp(mean_i sin^2(pi x_i / 2)), i = 1..100",
                        lambda x: np.exp(np.mean(np.sin(np.pi * x / 2) ** 2, axis=1))),
}

_FN_HELP = "one of " + ", ".join(FUNCTIONS)


def _function(fn: str) -> SynthFn:
    if fn not in FUNCTIONS:
        near = closest(fn, FUNCTIONS)
        hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
        raise UnknownNameError(f"unknown synthetic function '{fn}'{hint}; "
                               f"valid: {', '.join(FUNCTIONS)}")
    return FUNCTIONS[fn]


@register("dataset", "synthetic", paper="KAN: Kolmogorov-Arnold Networks",
          summary="Function-fitting regression from the KAN paper: inputs uniform on [-1, 1]^d.",
          arg="fn", arg_help=_FN_HELP)
def synthetic(
    seed: int = 0, *, fn: str, n_train: int = 1000, n_test: int = 1000, noise: float = 0.0
) -> DataBundle:
    """Samples of one KAN-paper function; targets ``(N, 1)`` float32, inputs left unscaled.

    A tenth of the ``n_train`` samples is held out for validation. Inputs are not standardised,
    since KAN spline grids live on ``[-1, 1]``; targets are not either, so errors compare with the
    paper's.

    Args:
        seed: seeds the inputs, the noise and the validation split.
        fn: the function's name (see ``FUNCTIONS``).
        n_train: training plus validation samples.
        n_test: test samples (always noise-free, so test error measures the function itself).
        noise: std of Gaussian noise added to the training and validation targets.

    Raises:
        UnknownNameError: ``fn`` is not a known function.
        ConfigError: a size below 10 or a negative ``noise``.
    """
    spec = _function(fn)
    if n_train < 10 or n_test < 1:
        raise ConfigError(f"dataset 'synthetic' needs n_train >= 10 and n_test >= 1, "
                          f"got {n_train} and {n_test}")
    if noise < 0:
        raise ConfigError(f"dataset 'synthetic' noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        # Round to float32 first so the targets are exactly the function of the stored inputs.
        x = rng.uniform(-1.0, 1.0, size=(n, spec.n_inputs)).astype(np.float32)
        return x, spec.f(x.astype(np.float64)).reshape(n, 1)

    x, y = draw(n_train)
    x_test, y_test = draw(n_test)
    if noise > 0:
        y = y + noise * rng.standard_normal(y.shape)
    return make_bundle(
        f"synthetic:{fn}", x, y.astype(np.float32), task="regression", seed=seed,
        standardize="none", test=(x_test, y_test.astype(np.float32)),
        meta={"source": "KAN: Kolmogorov-Arnold Networks", "fn": fn, "formula": spec.formula,
              "noise": noise, "input_range": [-1.0, 1.0]},
    )
