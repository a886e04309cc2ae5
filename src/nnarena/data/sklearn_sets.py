"""Small datasets bundled inside scikit-learn's wheel (``sklearn.datasets.load_*``).

Only the loaders that read files shipped with scikit-learn are used; nothing is fetched.
"""

from __future__ import annotations

from typing import Any

from nnarena.data._bundle import DataBundle, make_bundle
from nnarena.registry import register

__all__ = ["breast_cancer", "diabetes", "digits", "wine"]


def _sklearn(loader: str) -> Any:
    import sklearn.datasets  # imported lazily: it takes a while and most runs do not need it

    return getattr(sklearn.datasets, loader)()


@register("dataset", "digits", summary="8x8 handwritten digits bundled with scikit-learn "
          "(1797 images, 10 classes).")
def digits(seed: int = 0) -> DataBundle:
    """Scikit-learn's 8x8 digits as ``(1, 8, 8)`` images, globally standardised on train stats.

    Args:
        seed: split seed (70/10/20 train/val/test, stratified).
    """
    d = _sklearn("load_digits")
    return make_bundle("digits", d.data, d.target, task="classification", seed=seed,
                       input_shape=(1, 8, 8), standardize="global",
                       meta={"source": "sklearn.datasets.load_digits"})


@register("dataset", "breast-cancer", summary="Wisconsin breast cancer, 30 tabular features, "
          "2 classes (bundled with scikit-learn).")
def breast_cancer(seed: int = 0) -> DataBundle:
    """Wisconsin diagnostic breast cancer: 569 rows, 30 features, per-feature standardised.

    Args:
        seed: split seed (70/10/20 train/val/test, stratified).
    """
    d = _sklearn("load_breast_cancer")
    return make_bundle("breast-cancer", d.data, d.target, task="classification", seed=seed,
                       standardize="feature",
                       meta={"source": "sklearn.datasets.load_breast_cancer"})


@register("dataset", "wine", summary="Wine recognition, 13 tabular features, 3 classes "
          "(bundled with scikit-learn).")
def wine(seed: int = 0) -> DataBundle:
    """UCI wine recognition: 178 rows, 13 features, per-feature standardised.

    Args:
        seed: split seed (70/10/20 train/val/test, stratified).
    """
    d = _sklearn("load_wine")
    return make_bundle("wine", d.data, d.target, task="classification", seed=seed,
                       standardize="feature", meta={"source": "sklearn.datasets.load_wine"})


@register("dataset", "diabetes", summary="Diabetes progression regression, 10 features "
          "(bundled with scikit-learn); targets standardised, so RMSE is in std units.")
def diabetes(seed: int = 0) -> DataBundle:
    """Diabetes disease progression: 442 rows, 10 features, one target.

    Features and the target are standardised with the train split's statistics; the target's
    mean and std are in ``meta["target_mean"]``/``meta["target_std"]`` to undo it.

    Args:
        seed: split seed (70/10/20 train/val/test).
    """
    d = _sklearn("load_diabetes")
    return make_bundle("diabetes", d.data, d.target, task="regression", seed=seed,
                       standardize="feature", standardize_targets=True,
                       meta={"source": "sklearn.datasets.load_diabetes"})
