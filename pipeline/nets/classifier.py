"""The network models (FG-UNET and the seed's baselines) as registry entries, like the Random Forest.

One class serves every architecture of :mod:`pipeline.nets.arch`; the registry holds one subclass
per name (``fgunet``, ``unet3``, ``mlp3``, ``lstm3``, ``tsfgunet``), so the config picks a model by
name and the stages call the same :class:`~pipeline.models.Classifier` methods as for RF:
``train_stage`` (one process, or several under torchrun/srun: :mod:`pipeline.nets.train`),
``load`` (weights read with ``torch.load(weights_only=True)``), ``map_settings`` and
``classify_window``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.config import map_dtype
from pipeline.errors import PipelineError
from pipeline.models import MapSettings, refuse_options, register
from pipeline.models.features import Normalisation, nodata_mask
from pipeline.nets import capability
from pipeline.nets.arch import ARCHS, NetSpec, build
from pipeline.nets.distributed import process_group, world_from_env
from pipeline.nets.patches import patch_inputs
from pipeline.nets.train import train_network
from pipeline.nets.weights import WEIGHTS, load_weights, save_weights, weights_blob

log = logging.getLogger(__name__)

CONFIDENCE_NODATA = 255


class NetClassifier:
    """A trained network plus what maps its output to the run: class codes, channel recipe, device."""

    name: ClassVar[str]
    arch: ClassVar[str]

    def __init__(self, net: Any, codes: np.ndarray, indices: tuple[str, ...], device: str = "cpu") -> None:
        # channels-last weights: oneDNN's convs use that layout natively (2x on CPU, same results;
        # docs/benchmarks/fgunet.md)
        self.net = net.to(device).eval().to(memory_format=torch.channels_last)
        self.codes = np.asarray(codes, dtype=map_dtype(codes))
        self.indices = tuple(indices)
        self.device = device
        self.precision = "fp32"

    def set_precision(self, precision: str) -> str:
        """``fp32``, ``bf16`` (autocast; 99.9 % identical classes on the demo) or ``auto`` (bf16 where
        the hardware computes it natively: AVX512-BF16/AMX CPUs, bf16-capable GPUs). Returns the
        arithmetic that will really run, for the map's PRECISION tag.

        An explicit ``bf16`` is honoured where bf16 autocast works (warned when it is emulated, so
        slower than fp32); where it does not (:func:`capability.bf16_autocast` failed), fp32 runs
        with a warning rather than the map job crashing on a missing primitive.
        """
        precision = capability.choose_precision(precision, self.device, training=False)
        self.precision = precision
        return precision

    @property
    def classes_(self) -> np.ndarray:
        return self.codes

    @property
    def spec(self) -> Any:
        return self.net.spec

    @property
    def pool_factor(self) -> int:
        return int(self.net.pool_factor)

    @property
    def receptive_radius(self) -> int:
        return int(self.net.receptive_radius())

    @classmethod
    def train_stage(
        cls,
        cfg: Any,
        gapfilled: Mapping[str, Path],
        labels: Mapping[str, Path],
        percentiles: Path,
        out_dir: Path,
        *,
        patches: Mapping[str, Path] | None = None,
        checkpoints: Path | None = None,
        **kw: Any,
    ) -> None:
        """Train on patches of every tile; one process, or this rank of several (torchrun/srun env)."""
        refuse_options(cls.name, kw)
        with process_group(world_from_env()) as world:
            train_network(
                cfg, cls.name, gapfilled, labels, percentiles, out_dir,
                patches=patches, checkpoints=checkpoints, world=world,
            )  # fmt: skip

    def map_settings(self, cfg: Any, meta: dict[str, Any], model_dir: Path) -> MapSettings:
        """Check the weights against ``model.json``, pick the arithmetic, and read each window with
        ``inference.overlap`` around it, rounded up to the pooling factor (window origins stay on
        the pooling grid, so aligned windows stitch to the whole-image result)."""
        self.check_meta(meta, model_dir)
        margin = self.window_margin(cfg, model_dir)
        return MapSettings(margin=margin, precision=self.set_precision(cfg["inference"]["precision"]))

    def window_margin(self, cfg: Any, model_dir: Path, at_least: int = 0) -> int:
        """The px read around each ``inference.window`` window: ``inference.overlap`` (or
        ``at_least``, if more) on the pooling grid; a window size off that grid is refused."""
        inf, pool = cfg["inference"], self.pool_factor
        if int(inf["window"]) % pool:
            raise PipelineError(
                model_dir, f"inference.window {inf['window']} is not a multiple of the pooling factor {pool}"
            )
        return self.spec.pool_aligned(max(int(inf["overlap"]), at_least))

    def check_meta(self, meta: dict[str, Any], model_dir: Path) -> None:
        """The weights must agree with ``model.json`` on classes and input channels (before any compute)."""
        codes = [int(c) for c in meta["classes"]["codes"]]
        if [int(c) for c in self.classes_] != codes:
            raise PipelineError(
                model_dir, f"weights' classes {list(self.classes_)} differ from model.json's {codes}"
            )
        self.check_inputs(meta, model_dir)

    def check_inputs(self, meta: dict[str, Any], model_dir: Path) -> None:
        """The weights must read the input channels ``model.json`` describes."""
        feats = meta["features"]
        spec = self.spec
        n_channels = len(feats.get("network_channels", feats["channels"]))
        if spec.in_channels * spec.groups != n_channels:
            raise PipelineError(
                model_dir,
                f"weights expect {spec.in_channels * spec.groups} input channels,"
                f" model.json describes {n_channels}",
            )
        if list(self.indices) != list(feats.get("indices", [])):
            raise PipelineError(model_dir, "weights' spectral indices differ from model.json's")

    def set_threads(self, n: int) -> None:
        torch.set_num_threads(max(1, int(n)))

    def params(self) -> dict[str, Any]:
        return self.spec.to_json()

    def weights(self) -> dict[str, Any]:
        """What ``weights.pt`` holds: tensors and plain values only (safe to load)."""
        return weights_blob(self.spec, self.codes, self.indices, self.net.state_dict())

    def save(self, directory: Path) -> None:
        save_weights(directory, self.weights())

    @classmethod
    def load(cls, directory: Path, device: str = "cpu") -> NetClassifier:
        path = Path(directory) / WEIGHTS
        blob = load_weights(path)
        if blob.get("arch") != cls.arch:
            raise PipelineError(path, f"weights are for model {blob.get('arch')!r}, not {cls.arch!r}")
        return cls.from_weights(blob, path, device)

    @classmethod
    def from_weights(cls, blob: dict[str, Any], source: Path | None = None, device: str = "cpu"):
        try:
            spec = NetSpec.from_json(blob["spec"])
            net = build(spec)
            net.load_state_dict(blob["state_dict"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise PipelineError(source, f"weights do not fit the network they name ({exc})") from exc
        return cls(net, np.asarray(blob["codes"]), tuple(blob.get("indices", ())), device)

    def classify_window(
        self, cube: np.ndarray, norm: Normalisation, probabilities: bool = False
    ) -> tuple[np.ndarray, ...]:
        """(T, C, H, W) raw cube -> (H, W) class codes and confidence (max softmax, 0-100); with
        ``probabilities``, also the (K, H, W) softmax (NaN = no data).

        The window is zero-padded bottom/right to the pooling factor, exactly as a whole-image pass
        would be, so aligned windows stitch to the whole-image result. No-data pixels get code 0 and
        confidence 255.
        """
        _, _, h, w = cube.shape
        x = self._inputs(cube, norm)
        kind = "cuda" if str(self.device).startswith("cuda") else "cpu"
        bf16 = self.precision == "bf16"
        with torch.inference_mode(), torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            logits = self.net.forward_lowmem(x)[0, :, :h, :w]
        with torch.inference_mode():
            soft = torch.softmax(logits.float(), 0)
            prob, idx = soft.max(0)
        codes = self.codes[idx.cpu().numpy()]
        conf = np.rint(prob.cpu().numpy() * 100).astype(np.uint8)
        empty = nodata_mask(cube)
        codes[empty] = 0
        conf[empty] = CONFIDENCE_NODATA
        if not probabilities:
            return codes, conf
        every = soft.cpu().numpy().astype(np.float32, copy=True)
        every[:, empty] = np.nan
        return codes, conf, every

    def _inputs(self, cube: np.ndarray, norm: Normalisation) -> torch.Tensor:
        """(T, C, H, W) raw cube -> (1, G*Cg, H', W') network input, zero-padded bottom/right to the
        pooling factor exactly as a whole-image pass would be."""
        _, _, h, w = cube.shape
        x = patch_inputs(cube, norm, self.indices)
        p = self.pool_factor
        ph, pw = -h % p, -w % p
        if ph or pw:
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)))
        return torch.from_numpy(x)[None].to(self.device)

    def penultimate_window(self, cube: np.ndarray, norm: Normalisation) -> np.ndarray:
        """(T, C, H, W) raw cube -> (F, H, W) float32 features the last layer reads (fp32 always:
        a Random Forest on them splits on exact thresholds learnt in fp32)."""
        _, _, h, w = cube.shape
        with torch.inference_mode():
            f = self.net.penultimate(self._inputs(cube, norm))[0, :, :h, :w]
        return f.float().cpu().numpy()


def _register_all() -> None:
    for arch in ARCHS:
        register(arch)(type(f"Net_{arch}", (NetClassifier,), {"arch": arch, "__module__": __name__}))


_register_all()
