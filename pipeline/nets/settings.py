"""The config's ``nets`` section, typed, and the network rules a JSON schema cannot state.

Torch-free, so :func:`check_config` runs when the config is validated: a ``patch_size`` that the
U-Net cannot pool, or temporal groups that do not divide the date grid, fail before the first rule
instead of after the ``patches`` stage has run on every tile.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.config import Config


@dataclass(frozen=True)
class NetSettings:
    """The config's ``nets`` section, typed (schema defaults already applied)."""

    groups: int
    unet_filters: tuple[int, ...]
    mlp_filters: tuple[int, ...]
    dropout: float
    lstm_hidden: int
    indices: tuple[str, ...]
    patch_size: int
    patch_stride: int
    min_labelled: float
    min_class_positions: int
    allow_undrawn_classes: bool
    class_weights: str
    max_class_weight: float
    batch_size: int
    epochs: int
    steps_per_epoch: int
    warmup_epochs: int
    learning_rate: float
    lr_schedule: str
    augment: bool
    selection_patches: int
    device: str
    precision: str
    keep_checkpoints: int
    head_refit: bool
    weight_init: str
    unet_aux_loss: float
    init_from: Any  # None, one model folder, or {classifier: folder}: see init_folder

    @classmethod
    def from_config(cls, cfg: Config) -> NetSettings:
        n = cfg["nets"]
        return cls(
            groups=int(n["groups"]),
            unet_filters=tuple(int(f) for f in n["unet_filters"]),
            mlp_filters=tuple(int(f) for f in n["mlp_filters"]),
            dropout=float(n["dropout"]),
            lstm_hidden=int(n["lstm_hidden"]),
            indices=tuple(n["indices"]),
            patch_size=int(n["patch_size"]),
            patch_stride=int(n["patch_stride"]),
            min_labelled=float(n["min_labelled"]),
            min_class_positions=int(n["min_class_positions"]),
            allow_undrawn_classes=bool(n["allow_undrawn_classes"]),
            class_weights=str(n["class_weights"]),
            max_class_weight=float(n["max_class_weight"]),
            batch_size=int(n["batch_size"]),
            epochs=int(n["epochs"]),
            steps_per_epoch=int(n["steps_per_epoch"]),
            warmup_epochs=int(n["warmup_epochs"]),
            learning_rate=float(n["learning_rate"]),
            lr_schedule=str(n["lr_schedule"]),
            augment=bool(n["augment"]),
            selection_patches=int(n["selection_patches"]),
            device=str(n["device"]),
            precision=str(n["precision"]),
            keep_checkpoints=int(n["keep_checkpoints"]),
            head_refit=bool(n.get("head_refit", False)),
            weight_init=str(n.get("weight_init", "torch")),
            unet_aux_loss=float(n.get("unet_aux_loss", 0.0)),
            init_from=n.get("init_from"),
        )

    def init_folder(self, name: str) -> Path | None:
        """The model folder network ``name`` starts from (``nets.init_from``), or None: from scratch."""
        return init_folder(self.init_from, name)

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise PipelineError(None, "nets.device is 'cuda' but torch sees no GPU on this machine")
        return self.device


def warmup_lr(base: float, nodes: int, warmup_epochs: int, epoch: int) -> float:
    """Eq. 3: ``lr / nodes * ((nodes - 1) / w * i + 1)`` in epoch ``i < w``, then ``lr``.

    It rises linearly from ``lr / nodes`` to ``lr`` (reached at ``i = w``), and is ``lr`` throughout
    on a single process.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return base
    return base / nodes * ((nodes - 1) / warmup_epochs * epoch + 1)


COSINE_FLOOR = 0.05  # the cosine schedule ends at this share of the base learning rate


def epoch_lr(base: float, nodes: int, warmup_epochs: int, epoch: int, epochs: int, schedule: str) -> float:
    """Learning rate of ``epoch`` (0-based) of ``epochs``: eq. 3's warm-up, then ``constant`` (the
    paper: Adam at ``lr`` to the end) or ``cosine`` (half a cosine from ``lr`` after the warm-up down
    towards ``COSINE_FLOOR * lr`` at the end).

    Why cosine is offered: at a constant rate the demo's FG-UNET keeps swinging between the urban
    classes from one epoch to the next (docs/networks.md, the paper profile); decaying the rate
    lets it settle.
    """
    lr = warmup_lr(base, nodes, warmup_epochs, epoch)
    if schedule == "constant" or epoch < warmup_epochs:
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown nets.lr_schedule {schedule!r}")
    p = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
    return base * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * p)))


def init_folder(init_from: Any, name: str) -> Path | None:
    """``nets.init_from`` for network ``name``: one folder for every network, or a per-classifier
    mapping (a network missing from it starts from scratch)."""
    if init_from is None:
        return None
    if isinstance(init_from, str):
        return Path(init_from)
    folder = init_from.get(name)
    return None if folder is None else Path(folder)


def check_config(data: dict[str, Any], source: str) -> None:
    """The ``nets`` settings against the date grid and each network of ``classifiers``."""
    from pipeline.models import HYBRIDS, is_network
    from pipeline.nets.spec import BRANCHED, LINEAR_HEADS, NetSpec

    nets = data.get("nets", {})
    networks = [c for c in data["classifiers"] if is_network(c)]
    for hybrid in data["classifiers"]:
        if hybrid in HYBRIDS and HYBRIDS[hybrid] not in networks:
            raise PipelineError(
                source,
                f"invalid config at 'classifiers': {hybrid} reads the trained {HYBRIDS[hybrid]}'s"
                f" features; add {HYBRIDS[hybrid]} to classifiers",
            )
    if not networks:
        return
    grid = data["date_grid"]
    start, end = (dt.date.fromisoformat(grid[k]) for k in ("start", "end"))
    n_dates = (end - start).days // grid["step_days"] + 1
    if n_dates % nets["groups"]:
        raise PipelineError(
            source,
            f"invalid config at 'nets/groups': the date grid's {n_dates} dates do not split into"
            f" {nets['groups']} equal temporal groups",
        )
    init = nets.get("init_from")
    if isinstance(init, dict) and (stray := sorted(set(init) - set(networks))):
        raise PipelineError(
            source,
            f"invalid config at 'nets/init_from': {', '.join(stray)} not among the networks of"
            f" classifiers ({', '.join(networks)})",
        )
    if nets.get("head_refit") and (other := [a for a in networks if a not in LINEAR_HEADS]):
        raise PipelineError(
            source,
            f"invalid config at 'nets/head_refit': {', '.join(other)} in classifiers has no linear last"
            f" layer to refit (only {', '.join(LINEAR_HEADS)})",
        )
    if nets.get("unet_aux_loss", 0) > 0 and not any(a in BRANCHED for a in networks):
        raise PipelineError(
            source,
            f"invalid config at 'nets/unet_aux_loss': no network of classifiers ({', '.join(networks)})"
            f" has a U-Net branch beside a 1x1 path (only {', '.join(BRANCHED)})",
        )
    if nets["patch_stride"] > nets["patch_size"]:
        raise PipelineError(source, "invalid config at 'nets/patch_stride': larger than patch_size")
    for arch in networks:  # (inference.window is a multiple of 64 by the schema: any pooling fits)
        pool = NetSpec(arch, 1, 1, 2, unet_filters=tuple(nets["unet_filters"])).pool_factor
        if nets["patch_size"] % pool:
            raise PipelineError(
                source,
                f"invalid config at 'nets/patch_size': {nets['patch_size']} is not a multiple of {arch}'s"
                f" pooling factor {pool} (x2 per U-Net level after the first; {len(nets['unet_filters'])}"
                " levels in nets.unet_filters)",
            )
