"""``fgunet_rf``: the trained FG-UNET as a frozen contextual feature extractor, a Random Forest on top.

Seed §6 proposes it: the network learns spatial context (texture, neighbourhood), the RF adds a
classifier that is cheap to retrain (another nomenclature, another year's labels, more samples)
without touching the network. The features are the activations FG-UNET's last layer reads: the G
temporal groups' U-Net and 1x1-path features side by side (:meth:`pipeline.nets.arch.Net.penultimate`;
492 values per pixel with the demo's 6 groups). The RF is the project's RF (:mod:`pipeline.models.rf`)
with the run's ``rf`` settings, drawn on the same class-balanced pixel sample as the plain RF, so
the two differ only in their features.

Exactness: features are computed per window with a margin of at least the network's receptive
radius, rounded up to its pooling factor, in fp32, both for the training sample and for mapping,
so a pixel's features do not depend on how the tile was cut. The model folder holds a copy of the
network's weights, so it maps on its own even if the network's folder is retrained later. Its maps
get no majority regularisation (like the networks'): the context is in the features.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.layout import Layout
from pipeline.models import HYBRIDS, MapSettings, get, refuse_options, register
from pipeline.models.features import Normalisation, nodata_mask
from pipeline.models.pixel import map_pixels, training_sample
from pipeline.models.rf import RandomForest
from pipeline.nets.classifier import NetClassifier
from pipeline.nets.features import network_features
from pipeline.nets.weights import WEIGHTS, weights_digest

log = logging.getLogger(__name__)


class NetForest:
    """A frozen network's penultimate features -> the project's Random Forest."""

    name: ClassVar[str]
    network: ClassVar[str]  # registry name of the network whose features are used

    def __init__(self, net: NetClassifier, forest: RandomForest) -> None:
        self.net, self.forest = net, forest

    @property
    def classes_(self) -> np.ndarray:
        return self.forest.classes_

    def margin(self) -> int:
        """Px read around a window for exact features: the receptive radius on the pooling grid."""
        return self.net.spec.pool_aligned(self.net.receptive_radius)

    def set_threads(self, n: int) -> None:
        self.net.set_threads(n)
        self.forest.set_threads(n)

    def params(self) -> dict[str, Any]:
        return {"network": self.net.params(), "forest": self.forest.params()}

    # ---- training
    @classmethod
    def train_stage(
        cls,
        cfg: Any,
        gapfilled: Mapping[str, Path],
        labels: Mapping[str, Path],
        percentiles: Path,
        out_dir: Path,
        *,
        network: Path | None = None,
        **kw: Any,
    ) -> None:
        """Sample as RF does, compute the network's features at the sampled pixels, fit the RF.

        ``network``: the trained network's model folder (default: ``<network>`` beside ``out_dir``,
        with the same seed suffix: ``models/fgunet`` for ``models/fgunet_rf``).
        """
        from pipeline.train import META, load_meta, model_meta

        refuse_options(cls.name, kw)
        out_dir = Path(out_dir)
        net_dir = Path(network) if network else network_beside(out_dir, cls.network)
        net_meta = load_meta(net_dir)
        net = get(cls.network).load(net_dir)
        net.check_meta(net_meta, net_dir)  # type: ignore[attr-defined]
        feats = net_meta["features"]
        norm = Normalisation.from_json(net_meta["normalisation"], feats["bands"], feats["dates"])
        net.set_threads(cfg.threads())  # type: ignore[attr-defined]

        t0 = time.perf_counter()
        # the plain RF's pixels (same seed): only the features differ
        sample, _, per_class, empty = training_sample(cfg, labels, gapfilled, norm)
        model = cls(net, RandomForest.from_config(cfg))  # type: ignore[arg-type]
        window = int(cfg["inference"]["window"])
        x = network_features(model.net, norm, gapfilled, sample, window, model.margin())
        t_features = time.perf_counter() - t0
        log.info("%s: %d x %d network features in %.1f s", cls.name, *x.shape, t_features)
        t1 = time.perf_counter()
        model.forest.fit(x, sample.labels)
        t_fit = time.perf_counter() - t1

        meta = model_meta(cfg, cls.name, model.forest, norm, sample, per_class, empty, percentiles)
        meta["features"] = feats | {"forest_features": int(x.shape[1])}  # the network's inputs
        meta["params"] = model.params()
        meta["network"] = {
            "name": cls.network,
            "model": str(net_dir.resolve()),
            "weights_sha256": weights_digest(net_dir / WEIGHTS),
            "kept_epoch": net_meta.get("training", {}).get("kept_epoch"),
            "config_digest": net_meta.get("config_digest"),
        }
        meta["timing_s"] = {"sampling_and_features": round(t_features, 3), "fit": round(t_fit, 3)}
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            model.forest.save(tmp)
            model.net.save(tmp)  # a copy: the folder maps on its own
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")

    # ---- mapping
    @classmethod
    def load(cls, directory: Path) -> NetForest:
        net = get(cls.network).load(directory)
        return cls(net, RandomForest.load(directory))  # type: ignore[arg-type]

    def map_settings(self, cfg: Any, meta: dict[str, Any], model_dir: Path) -> MapSettings:
        """fp32 features, read with at least the receptive radius around each window."""
        codes = [int(c) for c in meta["classes"]["codes"]]
        if [int(c) for c in self.classes_] != codes:
            raise PipelineError(
                model_dir, f"forest's classes {list(self.classes_)} differ from model.json's {codes}"
            )
        self.net.check_inputs(meta, model_dir)
        return MapSettings(margin=self.net.window_margin(cfg, model_dir, at_least=self.net.receptive_radius))

    def classify_window(
        self, cube: np.ndarray, norm: Normalisation, probabilities: bool = False
    ) -> tuple[np.ndarray, ...]:
        """(T, C, H, W) raw cube -> (H, W) class codes (0 = no data) and confidence in % (255 = no
        data); with ``probabilities``, also the (K, H, W) class probabilities (NaN = no data)."""
        f = self.net.penultimate_window(cube, norm)
        flat = f.reshape(f.shape[0], -1)
        return map_pixels(
            lambda idx: self.forest.predict_proba(np.ascontiguousarray(flat[:, idx].T)),
            self.classes_,
            ~nodata_mask(cube),
            probabilities=probabilities,
        )


def network_beside(out_dir: Path, network: str) -> Path:
    """``models/fgunet`` for ``models/fgunet_rf``, ``models/fgunet-s7`` for ``models/fgunet_rf-s7``."""
    _, seed = Layout.split_seed_model(Path(out_dir).name)
    return Path(out_dir).with_name(network if seed is None else Layout.seed_model(network, seed))


def _register_all() -> None:
    for name, network in HYBRIDS.items():
        register(name)(type(f"Hybrid_{name}", (NetForest,), {"network": network, "__module__": __name__}))


_register_all()
