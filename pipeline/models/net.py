"""The network models (FG-UNET and the seed's baselines) as registry entries, like the Random Forest.

One wrapper class serves every architecture of :mod:`pipeline.models.nets`; the registry holds one
subclass per name (``fgunet``, ``unet3``, ``mlp3``, ``lstm3``, ``tsfgunet``) so the config picks a
model by name and every stage dispatches on it. Training lives in :mod:`pipeline.nettrain`; here is
what prediction needs: loading the weights safely (``torch.load(weights_only=True)``: a weights file
holds tensors and plain values, never pickled code) and classifying one window of the raw cube.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.errors import PipelineError
from pipeline.models import capability, register
from pipeline.models.features import Normalisation, nodata_mask

log = logging.getLogger(__name__)

WEIGHTS = "weights.pt"
CONFIDENCE_NODATA = 255


class NetClassifier:
    """A trained network plus what maps its output to the run: class codes, channel recipe, device."""

    name: ClassVar[str]
    arch: ClassVar[str]
    pixelwise: ClassVar[bool] = False

    def __init__(self, net: Any, codes: np.ndarray, indices: tuple[str, ...], device: str = "cpu") -> None:
        import torch

        # channels-last weights: oneDNN's convs use that layout natively (2x on CPU, same results;
        # docs/benchmarks/fgunet.md)
        self.net = net.to(device).eval().to(memory_format=torch.channels_last)
        self.codes = np.asarray(codes, dtype=np.uint8)
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
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}")
        kind = "cuda" if str(self.device).startswith("cuda") else "cpu"
        if precision == "auto":
            precision = "bf16" if native_bf16(self.device) else "fp32"
        elif precision == "bf16" and not capability.bf16_autocast(kind):
            log.warning(
                "inference.precision bf16 asked for, but bf16 autocast does not work on this %s (%s): "
                "mapping in fp32 instead",
                "CPU" if kind == "cpu" else "GPU",
                capability.failure(f"bf16 autocast on {kind}"),
            )
            precision = "fp32"
        elif precision == "bf16" and not native_bf16(self.device):
            log.warning(
                "inference.precision bf16 on a %s without native bf16 (no AVX512-BF16/AMX that oneDNN "
                "may use, or a GPU without bf16): bf16 runs emulated, several to tens of times slower "
                "than fp32 (docs/benchmarks/fgunet.md); precision auto would pick fp32 here",
                "CPU" if kind == "cpu" else "GPU",
            )
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
    def from_config(cls, cfg: Any) -> NetClassifier:
        raise NotImplementedError(f"{cls.name} is trained by train_stage (patch sampling), not from_config")

    @classmethod
    def train_stage(cls, cfg: Any, gapfilled: Any, labels: Any, percentiles: Path, out_dir: Path, **kw: Any):
        from pipeline.nettrain import train_network

        train_network(cfg, cls.name, gapfilled, labels, percentiles, out_dir, **kw)

    def set_threads(self, n: int) -> None:
        import torch

        torch.set_num_threads(max(1, int(n)))

    def params(self) -> dict[str, Any]:
        return self.spec.to_json()

    def weights(self) -> dict[str, Any]:
        """What ``weights.pt`` holds: tensors and plain values only (safe to load)."""
        return {
            "format": 1,
            "arch": self.arch,
            "spec": self.spec.to_json(),
            "codes": [int(c) for c in self.codes],
            "indices": list(self.indices),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
        }

    def save(self, directory: Path) -> None:
        import torch

        torch.save(self.weights(), Path(directory) / WEIGHTS)

    @classmethod
    def load(cls, directory: Path, device: str = "cpu") -> NetClassifier:
        path = Path(directory) / WEIGHTS
        blob = load_weights(path)
        if blob.get("arch") != cls.arch:
            raise PipelineError(path, f"weights are for model {blob.get('arch')!r}, not {cls.arch!r}")
        return cls.from_weights(blob, path, device)

    @classmethod
    def from_weights(cls, blob: dict[str, Any], source: Path | None = None, device: str = "cpu"):
        from pipeline.models.nets import NetSpec, build

        try:
            spec = NetSpec.from_json(blob["spec"])
            net = build(spec)
            net.load_state_dict(blob["state_dict"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise PipelineError(source, f"weights do not fit the network they name ({exc})") from exc
        return cls(net, np.asarray(blob["codes"]), tuple(blob.get("indices", ())), device)

    def classify_window(self, cube: np.ndarray, norm: Normalisation) -> tuple[np.ndarray, np.ndarray]:
        """(T, C, H, W) raw cube -> (H, W) class codes and confidence (max softmax, 0-100).

        The window is zero-padded bottom/right to the pooling factor, exactly as a whole-image pass
        would be, so aligned windows stitch to the whole-image result. No-data pixels get code 0 and
        confidence 255.
        """
        import torch

        from pipeline.patches import patch_inputs

        _, _, h, w = cube.shape
        x = patch_inputs(cube, norm, self.indices)
        p = self.pool_factor
        ph, pw = -h % p, -w % p
        if ph or pw:
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)))
        kind = "cuda" if str(self.device).startswith("cuda") else "cpu"
        bf16 = self.precision == "bf16"
        with torch.inference_mode(), torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            logits = self.net.forward_lowmem(torch.from_numpy(x)[None].to(self.device))[0, :, :h, :w]
        with torch.inference_mode():
            prob, idx = torch.softmax(logits.float(), 0).max(0)
        codes = self.codes[idx.cpu().numpy()]
        conf = np.rint(prob.cpu().numpy() * 100).astype(np.uint8)
        empty = nodata_mask(cube)
        codes[empty] = 0
        conf[empty] = CONFIDENCE_NODATA
        return codes, conf


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 runs natively here (else autocast emulates it, slower than fp32): the hardware
    has it (CPU flags avx512_bf16/amx_bf16 that oneDNN may use, or a bf16 GPU) AND the bf16 probe
    ran and agreed, since flags alone do not say the primitives exist in this build."""
    import torch

    if str(device).startswith("cuda"):
        gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return bool(gpu) and capability.bf16_autocast("cuda")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    if not ("avx512_bf16" in flags or "amx_bf16" in flags):
        return False
    return capability.onednn_native_bf16() and capability.bf16_autocast("cpu")


def load_weights(path: Path) -> dict[str, Any]:
    """Read a weights/checkpoint file with ``weights_only=True``; anything else is a one-line error."""
    import pickle

    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(path, "weights file not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(path, f"not a loadable weights file ({msg})") from exc
    if not isinstance(blob, dict):
        raise PipelineError(path, "not a weights file of this pipeline (no dict inside)")
    return blob


def _register_all() -> None:
    from pipeline.models.nets import ARCHS

    for arch in ARCHS:
        register(arch)(type(f"Net_{arch}", (NetClassifier,), {"arch": arch, "__module__": __name__}))


_register_all()
