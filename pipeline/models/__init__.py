"""Classifier registry: ``name -> model class``, so stages dispatch on the config's ``classifiers``.

A model is anything following :class:`Classifier`: the ``train`` stage calls its ``train_stage``,
the ``predict`` stage its ``load``, ``map_settings`` and ``classify_window``; neither knows the
model's family. Adding one is a module with a class decorated ``@register("name")`` and one line in
:data:`_MODULES` (imported lazily, so the RF stages never import torch).

Two families implement it: pixel-wise models (:class:`pipeline.models.pixel.PixelClassifier`: RF),
trained on a class-balanced pixel sample and predicted on (N, F) features, and the patch-trained
networks of :mod:`pipeline.nets` (one registered subclass of
:class:`pipeline.nets.classifier.NetClassifier` per architecture).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from pipeline.errors import PipelineError

# name -> module that registers it; imported on first lookup so heavy deps load only when used
NETWORKS = ("fgunet", "unet3", "mlp3", "lstm3", "tsfgunet")  # the seed's network family (§3.2, §4.2)
# a network's frozen penultimate features + the RF (seed §6): name -> the network it reads
HYBRIDS = {"fgunet_rf": "fgunet"}
_MODULES: dict[str, str] = {
    "rf": "pipeline.models.rf",
    **{arch: "pipeline.nets.classifier" for arch in NETWORKS},
    **{name: "pipeline.nets.hybrid" for name in HYBRIDS},
}

REGISTRY: dict[str, type[Classifier]] = {}


@dataclass(frozen=True)
class MapSettings:
    """How the predict stage runs a model over a tile's windows (decided once, before any compute)."""

    margin: int  # px read around each window and cut off after classification
    radius: int = 0  # majority-vote regularisation radius applied to each window's classes (0: none)
    precision: str = "fp32"  # arithmetic really used, for the map's PRECISION tag


@runtime_checkable
class Classifier(Protocol):
    """What the train/predict stages need from a model, whatever its family.

    ``classes_`` are the class codes the model maps to. ``train_stage`` writes the whole model
    folder (fitted state plus ``model.json``) atomically; ``map_settings`` checks the loaded model
    against its ``model.json`` and the config; ``classify_window`` maps one raw (T, C, H, W) window.
    """

    name: ClassVar[str]
    classes_: np.ndarray

    @classmethod
    def train_stage(
        cls, cfg: Any, gapfilled: Any, labels: Any, percentiles: Path, out_dir: Path, **kw: Any
    ) -> None: ...

    @classmethod
    def load(cls, directory: Path) -> Classifier: ...

    def map_settings(self, cfg: Any, meta: dict[str, Any], model_dir: Path) -> MapSettings: ...

    def classify_window(
        self, cube: np.ndarray, norm: Any, probabilities: bool = False
    ) -> tuple[np.ndarray, ...]: ...

    def set_threads(self, n: int) -> None: ...

    def params(self) -> dict[str, Any]: ...


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


def refuse_options(name: str, options: dict[str, Any]) -> None:
    """A ``train_stage`` option that does not apply to this model, given anyway, is an error (a
    silently ignored ``--fold`` or ``--checkpoints`` would train something else than asked)."""
    if given := sorted(k for k, v in options.items() if v is not None):
        verb = "does" if len(given) == 1 else "do"
        raise PipelineError(None, f"{', '.join(given)} {verb} not apply to training {name}")


def is_network(name: str) -> bool:
    """True for patch-trained networks (they need patch positions); answered without importing torch."""
    return name in NETWORKS


def module_of(name: str) -> str:
    """The module that registers ``name`` (for provenance), without importing it."""
    return _MODULES.get(name, REGISTRY[name].__module__ if name in REGISTRY else "?")


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
