"""Random Forest baseline (Stoian et al. 2019, §4.2): 100 trees, depth 20, no split below 10 samples.

The paper used OpenCV's RF through OTB; scikit-learn's is the same algorithm (bootstrap, sqrt(F)
features per split, Gini). OpenCV's "min sample count" is the smallest node that may still be split,
i.e. sklearn's ``min_samples_split``. Prediction averages tree probabilities (sklearn) where OpenCV
counts hard votes; both pick the same class except on near-ties.

Prediction is parallel over row chunks, each summing its trees in a fixed order: sklearn's own
``n_jobs`` prediction adds tree outputs in thread-completion order, so probabilities (and rare
argmax ties) would change from run to run and between a windowed and a whole-tile prediction.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import joblib
import numpy as np
from sklearn.ensemble import RandomForestClassifier

from pipeline.models import derive_seed, register

MODEL_FILE = "model.joblib"
CHUNK = 4096  # rows per predict call: the chunk (4096 x 330 float32 = 5 MB) stays in cache across trees


@register("rf")
class RandomForest:
    """sklearn RandomForestClassifier behind the :class:`~pipeline.models.Classifier` protocol."""

    name: ClassVar[str] = "rf"
    pixelwise: ClassVar[bool] = True

    def __init__(
        self,
        n_estimators: int = 100,
        max_depth: int = 20,
        min_samples_split: int = 10,
        n_jobs: int = 1,
        random_state: int = 0,
    ) -> None:
        self.threads = n_jobs
        self.model = RandomForestClassifier(
            n_estimators=n_estimators,
            max_depth=max_depth,
            min_samples_split=min_samples_split,
            max_features="sqrt",
            n_jobs=1,
            random_state=random_state,
        )

    @classmethod
    def from_config(cls, cfg: Any) -> RandomForest:
        rf = cfg["rf"]
        return cls(
            n_estimators=int(rf["n_estimators"]),
            max_depth=int(rf["max_depth"]),
            min_samples_split=int(rf["min_samples_split"]),
            n_jobs=cfg.threads(),
            random_state=derive_seed(cfg.seed, "rf"),
        )

    @property
    def classes_(self) -> np.ndarray:
        return self.model.classes_

    def set_threads(self, n: int) -> None:
        """Threads for predict: the node running inference may differ from the training one."""
        self.threads = max(1, int(n))

    def fit(self, features: np.ndarray, labels: np.ndarray) -> RandomForest:
        # trees are independent: threaded fitting is reproducible (each tree has its own seed)
        self.model.set_params(n_jobs=self.threads)
        try:
            self.model.fit(np.ascontiguousarray(features, dtype=np.float32), labels)
        finally:
            self.model.set_params(n_jobs=1)  # prediction parallelises over rows instead, see module doc
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(features, dtype=np.float32)  # sklearn trees work in float32: no copy
        starts = range(0, len(x), CHUNK)
        if len(starts) <= 1:
            return self.model.predict_proba(x)
        out = np.empty((len(x), len(self.classes_)), np.float64)

        def run(i: int) -> None:
            out[i : i + CHUNK] = self.model.predict_proba(x[i : i + CHUNK])  # tree traversal drops the GIL

        if self.threads > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(run, starts))
        else:
            for i in starts:
                run(i)
        return out

    def predict(self, features: np.ndarray) -> np.ndarray:
        proba = self.predict_proba(features)
        return self.classes_[np.argmax(proba, axis=1)]

    def params(self) -> dict[str, Any]:
        p = self.model.get_params()  # n_jobs is an execution detail, not a model parameter
        keys = ("n_estimators", "max_depth", "min_samples_split", "max_features", "criterion", "bootstrap")
        return {k: p[k] for k in keys} | {"random_state": p["random_state"], "library": "scikit-learn"}

    def save(self, directory: Path) -> None:
        joblib.dump(self.model, Path(directory) / MODEL_FILE, compress=3)

    @classmethod
    def load(cls, directory: Path) -> RandomForest:
        obj = cls.__new__(cls)
        obj.model = joblib.load(Path(directory) / MODEL_FILE)
        obj.threads = 1
        return obj
