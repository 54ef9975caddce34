"""Per-epoch checkpoints: written atomically, refused when they belong to another run.

A checkpoint holds tensors and plain values only (read with ``torch.load(weights_only=True)``),
plus the run's identity (classes, channels, normalisation, network, training settings, labels), so
a resumed run that would mix two trainings stops before any compute and names what differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.nets.history import HISTORY, PLOT, history_csv, plot_history
from pipeline.nets.settings import NetSettings

# settings added after checkpoints were first written: at their default they are not part of the
# identity, so an older checkpoint (which could only have been trained at the default) still resumes
OMITTED_AT_DEFAULT: dict[str, Any] = {"weight_init": "torch", "unet_aux_loss": 0.0}


def training_identity(s: NetSettings, seed: int, nodes: int) -> dict[str, Any]:
    """Settings a resumed run must share with the checkpoint (``epochs`` may grow, others may not)."""
    d = asdict(s)
    # head_refit acts after the last epoch: a finished training is refitted, not retrained
    for k in ("epochs", "device", "keep_checkpoints", "selection_patches", "init_from", "head_refit"):
        d.pop(k)
    for k, default in OMITTED_AT_DEFAULT.items():  # checkpoints written before these existed resume
        if d[k] == default:
            d.pop(k)
    return json.loads(json.dumps(d | {"seed": seed, "nodes": nodes}))


def latest_checkpoint(ckdir: Path) -> Path | None:
    found = sorted(Path(ckdir).glob("epoch_*.pt")) if Path(ckdir).is_dir() else []
    return found[-1] if found else None


def save_checkpoint(
    ckdir: Path,
    epoch: int,
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    history: list[dict[str, Any]],
    identity: dict[str, Any],
    keep: int,
    best: dict[str, Any] | None = None,
    branch: torch.nn.Module | None = None,
) -> Path:
    """Write ``epoch_NNN.pt`` atomically, then drop all but the ``keep`` newest (never the new one).

    ``best`` (epoch, selection kappa, weights of the epoch to keep) travels in every checkpoint, so
    a resumed run keeps the same epoch as an uninterrupted one. ``branch``: the training-only
    classifier of ``nets.unet_aux_loss``, which a resumed run needs too (it is not in the model)."""
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"epoch_{epoch:04d}.pt"
    blob = {
        "format": 1,
        "epoch": epoch,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": opt.state_dict(),
        "history": history,
        "identity": identity,
    }
    if best is not None:
        blob["best"] = best
    if branch is not None:
        blob["branch_state_dict"] = {k: v.detach().cpu() for k, v in branch.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    with atomic_path(ckdir / HISTORY) as tmp:
        tmp.write_text(history_csv(history))
    plot_history(history, ckdir / PLOT, title=identity["arch"])
    for old in sorted(ckdir.glob("epoch_*.pt"))[:-keep]:
        old.unlink()
    return path


def restore(
    blob: dict[str, Any],
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    path: Path,
    ckdir: Path,
    branch: torch.nn.Module | None = None,
) -> tuple[list[dict[str, Any]], int, dict[str, Any] | None]:
    """Load a checkpoint that :func:`check_resumable` accepted into ``net``, ``opt`` (and ``branch``,
    see :func:`save_checkpoint`); returns its
    history, epoch and kept epoch. A damaged one (keys missing, tensors of the wrong shape) is one
    line naming the file, never a traceback."""
    try:
        net.load_state_dict(blob["state_dict"])
        if branch is not None:
            branch.load_state_dict(blob["branch_state_dict"])
        opt.load_state_dict(blob["optimizer"])
        history, epoch = list(blob["history"]), int(blob["epoch"])
        best = blob.get("best")
        if best is not None:
            net.load_state_dict(best["state_dict"])  # loadable too (it becomes the model)...
            net.load_state_dict(blob["state_dict"])  # ...and the training goes on from the latest
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())[:300]
        raise PipelineError(path, f"damaged checkpoint ({what}); delete {ckdir} to start afresh") from exc
    return history, epoch, best


IDENTITY = {
    "arch": "network",
    "codes": "class list",
    "channels": "input channels",
    "normalisation": "normalisation (percentiles)",
    "spec": "network shape",
    "training": "training settings",
    "data": "training labels (pixels per class or patch positions)",
    "init": "starting weights (nets.init_from)",
}


def mismatch(blob: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """What differs between a checkpoint's run and this one (None: the same run)."""
    got = blob.get("identity", {})
    for key, label in IDENTITY.items():
        if got.get(key) != identity.get(key):
            return f"{label} differ{diff(got.get(key), identity[key])}"
    return None


def check_resumable(blob: dict[str, Any], identity: dict[str, Any], path: Path, ckdir: Path) -> None:
    """Refuse a checkpoint that belongs to a different, unfinished run, naming what differs."""
    if what := mismatch(blob, identity):
        raise PipelineError(
            path,
            f"checkpoint of an unfinished training that does not match this run: {what}; "
            f"delete {ckdir} to start afresh",
        )


def identity_digest(identity: dict[str, Any]) -> str:
    """Recorded in ``model.json``: which checkpoints made the model (:func:`superseded`)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def superseded(blob: dict[str, Any], identity: dict[str, Any], model_dir: Path) -> bool:
    """Whether a mismatching checkpoint is the last one of the training that made ``model_dir``.

    Then the config changed after that training finished, and Snakemake reruns it on purpose: the
    checkpoints have served (the model is the product) and a fresh training may replace them. An
    unfinished training's checkpoints are refused instead (:func:`check_resumable`): hours of
    compute are not thrown away over a setting changed by mistake."""
    if mismatch(blob, identity) is None:
        return False
    try:
        done = json.loads((Path(model_dir) / "model.json").read_text())["training"]
        return bool(
            done["identity_sha256"] == identity_digest(blob["identity"]) and done["epochs"] == blob["epoch"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def clear_checkpoints(ckdir: Path) -> None:
    for old in Path(ckdir).glob("epoch_*.pt"):
        old.unlink()
    for extra in (HISTORY, PLOT):
        (Path(ckdir) / extra).unlink(missing_ok=True)


def diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f" ({', '.join(f'{k}: {a.get(k)!r} vs {b.get(k)!r}' for k in keys[:3])})" if keys else ""
    if isinstance(a, list) and isinstance(b, list):
        return f" ({len(a)} in the checkpoint vs {len(b)} in the run)" if len(a) != len(b) else " (values)"
    return f" ({a!r} vs {b!r})"
