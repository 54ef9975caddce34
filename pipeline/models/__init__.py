"""Classifier registry: ``name -> model class``, so stages dispatch on the config's ``classifiers``.

A model is anything following :class:`Classifier`. Adding one is a module with a class decorated
``@register("name")`` and one line in :data:`_MODULES` (imported lazily, so the RF stages never
import torch). The network family registers one subclass of
:class:`pipeline.models.net.NetClassifier` per architecture of :mod:`pipeline.models.nets`.

Pixel-wise models (``pixelwise = True``) are trained by :func:`pipeline.train.train` on a
class-balanced pixel sample and predicted on (N, F) features; patch models implement their own
``train_stage(cfg, gapfilled, labels, percentiles, out_dir, **kw)`` classmethod, which
:func:`pipeline.train.train` hands over to, and ``classify_window(cube, norm)`` for prediction.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from pipeline.errors import PipelineError

# name -> module that registers it; imported on first lookup so heavy deps load only when used
NETWORKS = ("fgunet", "unet3", "mlp3", "lstm3", "tsfgunet")  # the seed's network family (§3.2, §4.2)
_MODULES: dict[str, str] = {
    "rf": "pipeline.models.rf",
    **{arch: "pipeline.models.net" for arch in NETWORKS},
}

REGISTRY: dict[str, type[Classifier]] = {}


@runtime_checkable
class Classifier(Protocol):
    """What the train/predict stages need from a model.

    ``classes_`` are the class codes of the columns of :meth:`predict_proba`; ``save``/``load``
    persist the fitted state only (``model.json`` is written by the training stage).
    """

    name: ClassVar[str]
    pixelwise: ClassVar[bool]
    classes_: np.ndarray

    @classmethod
    def from_config(cls, cfg: Any) -> Classifier: ...

    def fit(self, features: np.ndarray, labels: np.ndarray) -> Classifier: ...

    def predict_proba(self, features: np.ndarray) -> np.ndarray: ...

    def predict(self, features: np.ndarray) -> np.ndarray: ...

    def params(self) -> dict[str, Any]: ...

    def save(self, directory: Path) -> None: ...

    @classmethod
    def load(cls, directory: Path) -> Classifier: ...


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding a model under ``name``."""

    def deco(cls: type) -> type:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def derive_seed(seed: int, purpose: str) -> int:
    """A per-purpose seed from the run's root seed, so sampling and model init draw independent streams."""
    return int(np.random.SeedSequence([seed, *purpose.encode()]).generate_state(1)[0])


def is_network(name: str) -> bool:
    """True for patch-trained networks (they need patch positions); answered without importing torch."""
    return name in NETWORKS


def known() -> list[str]:
    return sorted(set(_MODULES) | set(REGISTRY))


def get(name: str, source: str | Path | None = None) -> type[Classifier]:
    """The model class registered as ``name``; unknown names raise a :class:`PipelineError`."""
    if name not in REGISTRY and name in _MODULES:
        importlib.import_module(_MODULES[name])
    try:
        return REGISTRY[name]
    except KeyError:
        raise PipelineError(source, f"unknown model {name!r}; known models: {', '.join(known())}") from None
