"""Random Forest baseline (Stoian et al. 2019, §4.2): 100 trees, depth 20, no split below 10 samples.

The paper used OpenCV's RF through OTB: bootstrap, sqrt(F) features per split, Gini, exact
thresholds; :mod:`pipeline.models.forest` grows forests by that algorithm (checked split by split
against scikit-learn's trees) in 0.22 of scikit-learn's fit time on the same cores, and predicts through a
compiled kernel. OpenCV's "min sample count" is the smallest node that may still be split, i.e.
sklearn's ``min_samples_split``. Prediction averages tree probabilities (as sklearn) where OpenCV
counts hard votes; both pick the same class except on near-ties.

The model folder holds ``forest.npz``: plain arrays (nodes, leaf entries, class codes), loaded with
``allow_pickle=False`` so a model file can never run code.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.models import derive_seed, register
from pipeline.models.forest import Forest, grow_forest
from pipeline.models.pixel import PixelClassifier

MODEL_FILE = "forest.npz"


@register("rf")
class RandomForest(PixelClassifier):
    """The seed's RF behind the :class:`~pipeline.models.Classifier` protocol."""

    name: ClassVar[str] = "rf"

    def __init__(
        self,
        n_estimators: int = 100,
        max_depth: int = 20,
        min_samples_split: int = 10,
        n_jobs: int = 1,
        random_state: int = 0,
    ) -> None:
        self.n_estimators = int(n_estimators)
        self.max_depth = int(max_depth)
        self.min_samples_split = int(min_samples_split)
        self.random_state = int(random_state)
        self.threads = max(1, int(n_jobs))
        self.forest: Forest | None = None
        self.classes_ = np.empty(0, np.int64)

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

    def set_threads(self, n: int) -> None:
        """Threads for fit and predict: the node running inference may differ from the training one."""
        self.threads = max(1, int(n))

    @staticmethod
    def max_features(n_features: int) -> int:
        """sqrt(F) features drawn per split, as OpenCV's default and sklearn's ``"sqrt"``."""
        return max(1, math.isqrt(n_features))

    def fit(self, features: np.ndarray, labels: np.ndarray) -> RandomForest:
        x = np.ascontiguousarray(features, dtype=np.float32)
        self.classes_, y = np.unique(np.asarray(labels), return_inverse=True)
        with tqdm(total=self.n_estimators, desc="rf trees", unit="tree", leave=False, disable=None) as bar:
            self.forest = grow_forest(
                x, y.astype(np.int32), len(self.classes_), self.n_estimators, self.max_depth,
                self.min_samples_split, self.max_features(x.shape[1]), self.random_state,
                threads=self.threads, progress=bar.update,
            )  # fmt: skip
        return self

    def _fitted(self) -> Forest:
        if self.forest is None:
            raise ValueError("the forest is not fitted")
        return self.forest

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self._fitted().run(features, self.threads, proba=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Same classes as ``argmax(predict_proba)``, without materialising the (N, K) probabilities."""
        return self.classes_[self._fitted().run(features, self.threads, proba=False)]

    def params(self) -> dict[str, Any]:
        return {
            "n_estimators": self.n_estimators,
            "max_depth": self.max_depth,
            "min_samples_split": self.min_samples_split,
            "max_features": "sqrt",
            "criterion": "gini",
            "bootstrap": True,
            "random_state": self.random_state,
            "library": "pipeline.models.forest (exact CART)",
        }

    def save(self, directory: Path) -> None:
        self._fitted().save(Path(directory) / MODEL_FILE, classes=self.classes_, params=self._param_array())

    def _param_array(self) -> np.ndarray:
        values = [self.n_estimators, self.max_depth, self.min_samples_split, self.random_state]
        return np.array(values, np.int64)

    @classmethod
    def load(cls, directory: Path) -> RandomForest:
        path = Path(directory) / MODEL_FILE
        try:
            forest, extra = Forest.load(path)
            classes, params = extra["classes"], extra["params"]
        except FileNotFoundError:
            raise PipelineError(path, "model file not found (train the model first)") from None
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise PipelineError(path, f"not a readable forest ({exc})") from exc
        if classes.size != forest.n_classes:
            msg = f"{classes.size} class codes for a forest of {forest.n_classes} classes"
            raise PipelineError(path, msg)
        obj = cls(*(int(v) for v in params[:3]), random_state=int(params[3]))
        obj.forest, obj.classes_ = forest, classes
        return obj
