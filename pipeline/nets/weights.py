"""The ``weights.pt`` file of a network model folder: tensors and plain values, never pickled code.

Read with ``torch.load(weights_only=True)``; anything that is not such a file of this pipeline is a
one-line error naming the file. Written by training (and by fine-tuning's starting point, read back).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

WEIGHTS = "weights.pt"
FORMAT = 1


def weights_blob(
    spec: Any, codes: Any, indices: tuple[str, ...], state_dict: Mapping[str, Any]
) -> dict[str, Any]:
    """What ``weights.pt`` holds: the network's spec, its class codes and spectral indices, its tensors."""
    return {
        "format": FORMAT,
        "arch": spec.arch,
        "spec": spec.to_json(),
        "codes": [int(c) for c in np.asarray(codes)],
        "indices": list(indices),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }


def save_weights(directory: Path, blob: dict[str, Any]) -> None:
    import torch

    torch.save(blob, Path(directory) / WEIGHTS)


def load_weights(path: Path) -> dict[str, Any]:
    """Read a weights/checkpoint file with ``weights_only=True``; anything else is a one-line error."""
    import pickle

    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(path, "weights file not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, OSError):  # torch's zip reader on a file cut short (a copy, a full disk)
            msg = f"truncated or damaged: {msg}"
        raise PipelineError(path, f"not a loadable weights file ({msg})") from exc
    if not isinstance(blob, dict):
        raise PipelineError(path, "not a weights file of this pipeline (no dict inside)")
    return blob


def weights_digest(path: Path) -> str:
    """Short SHA-256 of a weights file, for provenance (which weights a model started from or used)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
