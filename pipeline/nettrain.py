"""``landcover train`` for the network models: sparse-label patch training (seed §3.2.4, §3.3).

Each step draws ``b`` patches class-first from the precomputed patch positions of every tile
(:mod:`pipeline.patches`), augments them, normalises them with the run's percentiles (eq. 2) and
minimises the weighted cross-entropy of eq. 1 with class weights of eq. 4, unlabelled pixels
contributing exactly zero. Adam runs at the eq.-3 warm-up rate for the first ``w`` epochs.

Every epoch ends with a model-selection pass on a fixed set of patches of the selection polygons
(training polygons held out of training, :func:`pipeline.reference.training_labels`; loss, OA,
kappa, mean F-score; logged, written to ``history.csv`` and plotted) and a checkpoint. The model
kept is the epoch with the best selection kappa, not the last one; the validation polygons behind
the final metrics are never looked at during training. All randomness of epoch
``e`` (patch draws, augmentation, dropout) is seeded from ``(run seed, model, e)``, so a training
killed at any point and started again with the same command resumes from its last checkpoint and
ends with bit-identical weights. Checkpoints hold tensors and plain values only and are read with
``torch.load(weights_only=True)``; one that does not match the run (classes, channels,
normalisation, network, training settings) stops the run before any compute.

The per-process batch ``b`` and the number of processes (``nodes`` in eq. 3) are parameters, so the
multi-node training of issue 4 reuses this loop with a different batch source.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import Config
from pipeline.distributed import BatchSource, World, tile_holders
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.tilestore import iter_windows, open_store, store_grid, win_slices
from pipeline.layout import Layout
from pipeline.metrics import confusion, scores
from pipeline.models import derive_seed, get
from pipeline.models.features import NODATA, Normalisation, schema_mismatch
from pipeline.models.net import NetClassifier, load_weights
from pipeline.models.nets import NetSpec, build
from pipeline.patches import (
    ClassFirstSampler,
    PatchIndex,
    PatchRef,
    channels_per_date,
    min_pixels,
    patch_inputs,
    read_patches,
)
from pipeline.reference import SELECTION, training_labels

log = logging.getLogger(__name__)

HISTORY = "history.csv"
PLOT = "training.png"


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
    augment: bool
    selection_patches: int
    device: str
    keep_checkpoints: int

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
            augment=bool(n["augment"]),
            selection_patches=int(n["selection_patches"]),
            device=str(n["device"]),
            keep_checkpoints=int(n["keep_checkpoints"]),
        )

    def torch_device(self) -> str:
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


def class_weights(counts: np.ndarray, cap: float | None = None) -> np.ndarray:
    """Eq. 4: ``n_tot / n_k`` per class; 0 for a class without training pixels (it is never a target).

    ``cap``: no weight above ``cap`` times the smallest positive one, so a class with a handful of
    pixels (2 pixels gave a weight of ~3,200 on real data) cannot dominate the loss.
    """
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, counts.sum() / counts, 0.0)
    if cap is not None and (w > 0).any():
        w = np.minimum(w, cap * w[w > 0].min())
    return w.astype(np.float32)


def weighted_sparse_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 1 averaged over all pixels: ``-sum w_k y_k log p_k``, ``target`` -1 = unlabelled.

    Unlabelled pixels are an all-zero one-hot vector in the paper, so their term and its gradient are
    exactly zero (``where``, not multiplication, so even an infinite log-probability stays out).
    """
    logp = F.log_softmax(logits.float(), dim=1)
    labelled = target >= 0
    idx = target.clamp(min=0)
    nll = -logp.gather(1, idx.unsqueeze(1)).squeeze(1)
    per_pixel = torch.where(labelled, weights[idx] * nll, torch.zeros((), device=nll.device))
    return per_pixel.sum() / target.numel()


class PatchData:
    """Every tile's gapfilled cube, labels and patch positions, opened lazily (zarr reads per patch)."""

    def __init__(
        self,
        gapfilled: Mapping[str, Path],
        labels: Mapping[str, Path],
        patches: Mapping[str, Path],
        norm: Normalisation,
        size: int,
    ) -> None:
        self.norm, self.size = norm, size
        self.refl: dict[str, Any] = {}
        self.labels: dict[str, Any] = {}
        self.train_index: dict[str, PatchIndex] = {}
        self.select_index: dict[str, PatchIndex] = {}
        for tile, path in gapfilled.items():
            group = open_store(path, "gapfilled", ("reflectance",))
            if why := schema_mismatch(dict(group.attrs), norm.bands, norm.dates, against="the percentiles'"):
                raise PipelineError(path, why)
            ref = open_store(labels[tile], "reference", ("train", SELECTION))
            if not store_grid(ref).same_as(store_grid(group)):
                raise PipelineError(labels[tile], f"label grid differs from the gapfilled store {path}")
            self.refl[tile] = group["reflectance"]
            self.labels[tile] = {"train": training_labels(ref), SELECTION: ref[SELECTION]}
            self.train_index[tile] = _load_index(patches[tile], size)
            self.select_index[tile] = _load_index(selection_index_path(patches[tile]), size)

    def digest(self) -> str:
        """A fingerprint of every tile's train/selection patch positions (changes with the labels)."""
        h = hashlib.sha256()
        for tile in sorted(self.train_index):
            h.update(tile.encode())
            for idx in (self.train_index[tile], self.select_index[tile]):
                for arr in (idx.rows, idx.cols, idx.class_codes, idx.class_offsets, idx.class_members):
                    h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def class_counts(self, codes: np.ndarray, world: World | None = None) -> np.ndarray:
        """Training pixels per class over all tiles (streamed by window), for the eq.-4 weights.

        With several processes each counts the tiles it holds and the counts are summed.
        """
        world = world or World()
        holders = tile_holders(list(self.labels), world.size)
        counts = np.zeros(256, np.int64)
        for tile, ref in self.labels.items():
            if holders[tile][0] != world.rank:
                continue
            arr = ref["train"]
            for win in iter_windows(*arr.shape):
                counts += np.bincount(np.asarray(arr[win_slices(win)]).ravel(), minlength=256)
        if world.size > 1:
            total = torch.from_numpy(counts)
            dist.all_reduce(total)
            counts = total.numpy()
        return counts[np.asarray(codes, dtype=np.int64)]

    def read(self, refs: Sequence[PatchRef], split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(n, T, C, N, N) raw patches and (n, N, N) label codes, in the order of ``refs``."""
        t, c = self.refl[refs[0].tile].shape[:2]
        x = np.empty((len(refs), t, c, self.size, self.size), np.int16)
        y = np.empty((len(refs), self.size, self.size), np.uint8)
        for tile in dict.fromkeys(r.tile for r in refs):
            at = [i for i, r in enumerate(refs) if r.tile == tile]
            x[at], y[at] = read_patches(
                self.refl[tile], self.labels[tile][split], [refs[i] for i in at], self.size
            )
        # a labelled pixel without any observation has nothing to learn from (as in the RF sample)
        empty = x[:, 0, 0] == NODATA
        if empty.any():
            empty[empty] = np.all(x.transpose(0, 3, 4, 1, 2)[empty] == NODATA, axis=(1, 2))
            y[empty] = 0
        return x, y

    def read_labels(self, refs: Sequence[PatchRef], split: str = "train") -> np.ndarray:
        """(n, N, N) label codes of ``refs`` without their reflectance (for pixel statistics)."""
        y = np.empty((len(refs), self.size, self.size), np.uint8)
        for i, r in enumerate(refs):
            y[i] = self.labels[r.tile][split][r.row : r.row + self.size, r.col : r.col + self.size]
        return y

    def selection_refs(self, n: int, seed: int) -> list[PatchRef]:
        """Up to ``n`` fixed model-selection patches, uniform over every tile's selection positions."""
        pool = [
            PatchRef(tile, int(r), int(c), 0)
            for tile, idx in self.select_index.items()
            for r, c in zip(idx.rows, idx.cols, strict=True)
        ]
        if len(pool) <= n:
            return pool
        pick = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
        return [pool[i] for i in pick]


def selection_index_path(train_index: Path) -> Path:
    """The selection index beside a train index (``T.train.npz`` -> ``T.selection.npz``)."""
    name = Path(train_index).name
    stem = name[: -len(".train.npz")] if name.endswith(".train.npz") else Path(name).stem
    return Path(train_index).with_name(f"{stem}.{SELECTION}.npz")


def _load_index(path: Path, size: int) -> PatchIndex:
    index = PatchIndex.load(path)
    if index.size != size:
        raise PipelineError(
            path, f"patch positions are for {index.size}-px patches, nets.patch_size is {size}"
        )
    return index


def index_patches(cfg: Config, tile: str, labels: Path, out: Path) -> None:
    """``landcover patches``: a tile's train positions (class-first lists) and model-selection patches."""
    from pipeline.patches import index_tile

    s = NetSettings.from_config(cfg)
    codes = [int(c) for c in cfg.class_codes]
    index_tile(
        labels,
        tile,
        out,
        s.patch_size,
        s.patch_stride,
        s.min_labelled,
        codes,
        split="train",
        min_positions=s.min_class_positions,
        held_out=SELECTION,
    )
    # model selection: non-overlapping patches holding at least one selection pixel
    one_px = 0.5 / (s.patch_size * s.patch_size)
    index_tile(
        labels,
        tile,
        selection_index_path(out),
        s.patch_size,
        s.patch_size,
        one_px,
        codes,
        split=SELECTION,
    )


def check_drawable(
    cfg: Config, sampler: ClassFirstSampler, counts: np.ndarray, s: NetSettings, where: Path | None
) -> None:
    """Stop when a class with training pixels can never be drawn, unless the config accepts it.

    Such a class reaches the network only as a bystander in other classes' patches, or not at all,
    and the map lacks it without any sign but a log line. A class without any training pixel is
    left out as by every classifier (a warning): no sampler can help there.
    """
    drawn = set(sampler.classes.tolist())
    codes = [int(c) for c in cfg.class_codes]
    no_px = [c for c, n in zip(codes, counts, strict=True) if n == 0]
    if no_px:
        log.warning("classes without training pixels (never a target): %s", _named(no_px, cfg))
    undrawn = [c for c, n in zip(codes, counts, strict=True) if n > 0 and c not in drawn]
    if not undrawn:
        return
    msg = (
        f"classes with training pixels in no {s.patch_size}x{s.patch_size}-px patch position of any tile,"
        f" so never drawn for training: {_named(undrawn, cfg)}"
    )
    if not s.allow_undrawn_classes:
        raise PipelineError(
            where, msg + " (lower nets.patch_size, add reference polygons, or set nets.allow_undrawn_classes)"
        )
    log.warning("%s; trained anyway (nets.allow_undrawn_classes)", msg)


def _named(codes: Any, cfg: Config) -> str:
    names = {c.code: c.name for c in cfg.classes}
    if isinstance(codes, dict):
        return ", ".join(f"{c} {names.get(c, '?')} ({v})" for c, v in codes.items())
    return ", ".join(f"{c} {names.get(c, '?')}" for c in codes)


def sampled_pixels(
    data: PatchData, sampler: ClassFirstSampler, codes: np.ndarray, seed: int, n: int = 2048
) -> np.ndarray:
    """Labelled training pixels per class in ``n`` patches drawn as training draws them.

    The class-first sampler already shows rare classes far more often than their share of the
    tiles; eq. 4 on these counts corrects only what the sampler leaves (one rebalancing, not two).
    Every process draws the same patches from ``seed``, so all get the same weights.
    """
    refs = sampler.draw(n, np.random.default_rng(seed))
    seen = np.bincount(data.read_labels(refs).ravel(), minlength=256)
    return seen[np.asarray(codes, dtype=np.int64)]


def _lut(codes: np.ndarray) -> np.ndarray:
    lut = np.full(256, -1, np.int64)
    lut[np.asarray(codes, dtype=np.int64)] = np.arange(len(codes))
    return lut


def train_network(
    cfg: Config,
    name: str,
    gapfilled: Mapping[str, Path],
    labels: Mapping[str, Path],
    percentiles: Path,
    out_dir: Path,
    *,
    patches: Mapping[str, Path] | None = None,
    checkpoints: Path | None = None,
    world: World | None = None,
) -> None:
    """Train network ``name`` on every tile's training labels into the model folder ``out_dir``.

    ``world``: this process's rank among the training processes (default: a single process);
    with several, each reads its own tiles' patches, process 0 plans batches, validates and writes.
    """
    world = world or World()
    nodes = world.size
    s = NetSettings.from_config(cfg)
    out_dir = Path(out_dir)
    lay = Layout(cfg.workdir)
    patches = patches or {t: lay.patches(t) for t in gapfilled}
    ckdir = Path(checkpoints) if checkpoints else out_dir.with_name(f"{out_dir.name}.checkpoints")
    device = s.torch_device()
    if device == "cuda":  # one GPU per process on a multi-GPU node
        device = f"cuda:{world.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    torch.set_num_threads(cfg.threads())

    norm = Normalisation.from_percentiles(percentiles)
    data = PatchData(gapfilled, labels, patches, norm, s.patch_size)
    codes = cfg.class_codes
    counts = data.class_counts(codes, world)
    need = min_pixels(s.patch_size, s.min_labelled)
    sampler = ClassFirstSampler(
        list(data.train_index.values()),
        [int(c) for c in codes],
        need=need,
        min_positions=s.min_class_positions,
    )
    check_drawable(cfg, sampler, counts, s, next(iter(patches.values()), None))
    relaxed = {c: t for c, t in sampler.thresholds.items() if t < need}
    if relaxed:
        log.info(
            "classes without %d positions at >= %d px of a %d-px patch, drawn from their best-stocked"
            " positions instead (threshold in px): %s",
            s.min_class_positions, need, s.patch_size, _named(relaxed, cfg),
        )  # fmt: skip
    empty = [int(c) for c, n in zip(codes, counts, strict=True) if n == 0]
    if s.class_weights == "sampled":
        seen = sampled_pixels(data, sampler, codes, derive_seed(cfg.seed, f"{name}/weights"))
        weight_counts = np.where(counts > 0, np.maximum(seen, 1), 0)  # drawable: > 0 anyway
    else:
        weight_counts = counts if s.class_weights == "paper" else (counts > 0).astype(np.int64)
    class_w = class_weights(weight_counts, s.max_class_weight)

    n_dates = len(norm.dates)
    if n_dates % s.groups:
        raise PipelineError(percentiles, f"{n_dates} dates do not split into {s.groups} temporal groups")
    per_date = channels_per_date(norm.bands, s.indices)
    spec = NetSpec(
        arch=name,
        in_channels=n_dates // s.groups * per_date,
        groups=s.groups,
        n_classes=len(codes),
        unet_filters=s.unet_filters,
        mlp_filters=s.mlp_filters,
        dropout=s.dropout,
        lstm_hidden=s.lstm_hidden,
    )
    torch.manual_seed(derive_seed(cfg.seed, f"{name}/init"))  # same initial weights on every process
    net = build(spec).to(device).to(memory_format=torch.channels_last)  # oneDNN's native conv layout
    if s.patch_size % net.pool_factor:
        raise PipelineError(None, f"nets.patch_size {s.patch_size} is not a multiple of {net.pool_factor}")
    opt = torch.optim.Adam(net.parameters(), lr=s.learning_rate)
    weights = torch.from_numpy(class_w).to(device)
    lut = _lut(codes)
    channels = [f"{d}/{b}" for d in norm.dates for b in (*norm.bands, *s.indices)]
    identity = {
        "arch": name,
        "codes": [int(c) for c in codes],
        "channels": channels,
        "normalisation": {"low": norm.low.tolist(), "high": norm.high.tolist()},
        "spec": spec.to_json(),
        "training": _training_identity(s, cfg.seed, nodes),
        # the labels behind the checkpoint: resuming after the references changed would be wrong
        "data": {"pixels_per_class": [int(n) for n in counts], "patches": data.digest()},
    }

    history: list[dict[str, Any]] = []
    start = 0
    best: dict[str, Any] | None = None  # the epoch kept: best selection kappa so far, and its weights
    if latest := latest_checkpoint(ckdir):
        blob = load_weights(latest)
        check_resumable(blob, identity, latest, ckdir)
        net.load_state_dict(blob["state_dict"])
        opt.load_state_dict(blob["optimizer"])
        history = list(blob["history"])
        start = int(blob["epoch"])
        best = blob.get("best")
        log.info("resuming %s from %s (epoch %d of %d)", name, latest.name, start, s.epochs)

    sel_refs: list[PatchRef] = []
    if world.is_main:
        sel_refs = data.selection_refs(s.selection_patches, derive_seed(cfg.seed, f"{name}/selection"))
        if sel_refs:
            sel_x, sel_y = data.read(sel_refs, split=SELECTION)
        else:
            log.warning("no model-selection patches (reference.selection_ratio): the last epoch is kept")
    batches = BatchSource(data, sampler, world, s.batch_size, s.augment)
    model_fwd: torch.nn.Module = net
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model_fwd = DistributedDataParallel(
            net, device_ids=None if device == "cpu" else [torch.device(device)]
        )
    t_start = time.perf_counter()
    for epoch in range(start, s.epochs):
        t0 = time.perf_counter()
        lr = warmup_lr(s.learning_rate, nodes, s.warmup_epochs, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng(derive_seed(cfg.seed, f"{name}/epoch/{epoch}"))  # used by process 0
        torch.manual_seed(derive_seed(cfg.seed, f"{name}/dropout/{epoch}/{world.rank}"))
        net.train()
        total = 0.0
        bar = tqdm(
            range(s.steps_per_epoch),
            desc=f"{name} epoch {epoch + 1}/{s.epochs}",
            unit="batch",
            disable=None if world.is_main else True,
        )
        for step in bar:
            x, y = batches(rng)
            xt = torch.from_numpy(patch_inputs(x, norm, s.indices)).to(device)
            yt = torch.from_numpy(lut[y]).to(device)
            loss = weighted_sparse_ce(model_fwd(xt), yt, weights)
            seen = loss.detach().clone()
            if world.size > 1:  # every process must see a NaN anywhere, or the others would hang
                dist.all_reduce(seen)
                seen /= world.size
            if not torch.isfinite(seen):
                kept = latest_checkpoint(ckdir)
                raise PipelineError(
                    ckdir,
                    f"loss is {seen.item()} at epoch {epoch + 1}, batch {step + 1}; training stopped, "
                    + (f"last good checkpoint {kept.name} kept" if kept else "no checkpoint written yet"),
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += seen.item()
            bar.set_postfix(loss=f"{total / (step + 1):.4f}")
        bar.close()
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": total / s.steps_per_epoch}
        if sel_refs:
            row |= evaluate(net, sel_x, sel_y, norm, s.indices, codes, lut, weights, s.batch_size, device)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        if not world.is_main:
            continue  # process 0 logs, validates and checkpoints; the weights are the same everywhere
        if best is None or _better(row.get("sel_kappa"), best["sel_kappa"]):
            state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            best = {"epoch": epoch + 1, "sel_kappa": row.get("sel_kappa"), "state_dict": state}
        log.info(
            "%s epoch %d/%d: lr %.2e, loss %.4f, selection loss %s, OA %s, kappa %s, mean F1 %s",
            name, epoch + 1, s.epochs, lr, row["train_loss"],
            _fmt(row.get("sel_loss")), _fmt(row.get("sel_oa")), _fmt(row.get("sel_kappa")),
            _fmt(row.get("sel_mean_f1")),
        )  # fmt: skip
        save_checkpoint(ckdir, epoch + 1, net, opt, history, identity, s.keep_checkpoints, best)

    if world.size > 1:
        dist.barrier()
    if not world.is_main:
        return
    if best is not None:  # the model kept: the epoch that scored best on the selection polygons
        net.load_state_dict(best["state_dict"])
        log.info(
            "%s: keeping epoch %d of %d (selection kappa %s)", name, best["epoch"], s.epochs,
            _fmt(best["sel_kappa"]),
        )  # fmt: skip
    model: NetClassifier = get(name)(net.cpu(), codes, s.indices)  # type: ignore[call-arg]
    meta = _meta(
        cfg, name, model, norm, empty, percentiles, s, spec, channels, counts, data, nodes, history,
        class_w, sampler,
    )  # fmt: skip
    meta["training"]["kept_epoch"] = best["epoch"] if best is not None else s.epochs
    meta["timing_s"] = {"training": round(time.perf_counter() - t_start, 3)}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save(tmp)
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / HISTORY).write_text(history_csv(history))
        plot_history(history, tmp / PLOT, title=name)
    log.info("trained %s: %d epochs -> %s", name, s.epochs, out_dir)


def _better(score: float | None, best: float | None) -> bool:
    """Whether this epoch replaces the kept one: a strictly higher selection score; an unscored
    epoch never replaces a scored one, and without any score (no selection patches) the latest wins."""
    if score is None:
        return best is None
    return best is None or score > best


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _training_identity(s: NetSettings, seed: int, nodes: int) -> dict[str, Any]:
    """Settings a resumed run must share with the checkpoint (``epochs`` may grow, others may not)."""
    d = asdict(s)
    for k in ("epochs", "device", "keep_checkpoints", "selection_patches"):
        d.pop(k)
    return json.loads(json.dumps(d | {"seed": seed, "nodes": nodes}))


@torch.no_grad()
def evaluate(
    net: torch.nn.Module,
    raw: np.ndarray,
    labels: np.ndarray,
    norm: Normalisation,
    indices: tuple[str, ...],
    codes: np.ndarray,
    lut: np.ndarray,
    weights: torch.Tensor,
    batch: int,
    device: str,
) -> dict[str, float | None]:
    """Loss (eq. 1), OA, kappa and mean F-score on the fixed selection patches (labelled pixels only)."""
    net.eval()
    loss_sum, n_px = 0.0, 0
    cm = np.zeros((len(codes), len(codes)), np.int64)
    for i in range(0, len(raw), batch):
        x = torch.from_numpy(patch_inputs(raw[i : i + batch], norm, indices)).to(device)
        y = lut[labels[i : i + batch]]
        logits = net(x)
        yt = torch.from_numpy(y).to(device)
        loss_sum += weighted_sparse_ce(logits, yt, weights).item() * yt.numel()
        n_px += yt.numel()
        pred = np.asarray(codes)[logits.argmax(1).cpu().numpy()]
        cm += confusion(labels[i : i + batch], pred.astype(np.uint8), np.asarray(codes))
    sc = scores(cm)
    f1 = [f for f in sc["f1"] if f is not None]
    return {
        "sel_loss": loss_sum / max(n_px, 1),
        "sel_oa": sc["oa"],
        "sel_kappa": sc["kappa"],
        "sel_mean_f1": float(np.mean(f1)) if f1 else None,
    }


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
) -> Path:
    """Write ``epoch_NNN.pt`` atomically, then drop all but the ``keep`` newest (never the new one).

    ``best`` (epoch, selection kappa, weights of the epoch to keep) travels in every checkpoint, so
    a resumed run keeps the same epoch as an uninterrupted one."""
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
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    (ckdir / HISTORY).write_text(history_csv(history))
    plot_history(history, ckdir / PLOT, title=identity["arch"])
    for old in sorted(ckdir.glob("epoch_*.pt"))[:-keep]:
        old.unlink()
    return path


def check_resumable(blob: dict[str, Any], identity: dict[str, Any], path: Path, ckdir: Path) -> None:
    """Refuse a checkpoint that belongs to a different run, naming what differs."""
    got = blob.get("identity", {})
    what = {
        "arch": "network",
        "codes": "class list",
        "channels": "input channels",
        "normalisation": "normalisation (percentiles)",
        "spec": "network shape",
        "training": "training settings",
        "data": "training labels (pixels per class or patch positions)",
    }
    for key, label in what.items():
        if got.get(key) != identity[key]:
            detail = _diff(got.get(key), identity[key])
            raise PipelineError(
                path,
                f"checkpoint does not match this run: {label} differ{detail}; delete {ckdir} to start afresh",
            )


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f" ({', '.join(f'{k}: {a.get(k)!r} vs {b.get(k)!r}' for k in keys[:3])})" if keys else ""
    if isinstance(a, list) and isinstance(b, list):
        return f" ({len(a)} in the checkpoint vs {len(b)} in the run)" if len(a) != len(b) else " (values)"
    return f" ({a!r} vs {b!r})"


def history_csv(history: list[dict[str, Any]]) -> str:
    keys = ["epoch", "lr", "train_loss", "sel_loss", "sel_oa", "sel_kappa", "sel_mean_f1", "seconds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def plot_history(history: list[dict[str, Any]], out: Path, title: str = "") -> None:
    """Loss, selection OA/kappa/F1 and learning rate per epoch, one PNG people look at instead of logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if any(h.get("sel_loss") is not None for h in history):
        axes[0].plot(ep, [h.get("sel_loss") for h in history], "s-", label="model selection")
    axes[0].set(title="loss (eq. 1)", xlabel="epoch")
    axes[0].legend()
    for key, label in (("sel_oa", "OA"), ("sel_kappa", "kappa"), ("sel_mean_f1", "mean F1")):
        axes[1].plot(ep, [h.get(key) for h in history], "o-", label=label)
    axes[1].set(title="model selection (held-out training polygons)", xlabel="epoch", ylim=(0, 1))
    axes[1].legend()
    axes[2].plot(ep, [h["lr"] for h in history], "o-")
    axes[2].set(title="learning rate (eq. 3)", xlabel="epoch")
    fig.suptitle(title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _meta(
    cfg: Config,
    name: str,
    model: NetClassifier,
    norm: Normalisation,
    empty: list[int],
    percentiles: Path,
    s: NetSettings,
    spec: NetSpec,
    channels: list[str],
    counts: np.ndarray,
    data: PatchData,
    nodes: int,
    history: list[dict[str, Any]],
    class_w: np.ndarray,
    sampler: ClassFirstSampler,
) -> dict[str, Any]:
    from pipeline.train import base_meta

    meta = base_meta(cfg, name, model, norm, empty, percentiles)
    meta["features"] |= {
        "indices": list(s.indices),
        "network_channels": channels,
        "groups": s.groups,
        "channels_per_group": spec.in_channels,
    }
    meta["params"] = spec.to_json() | {"parameters": sum(p.numel() for p in model.net.parameters())}
    meta["training"] = _training_identity(s, cfg.seed, nodes) | {
        "epochs": s.epochs,
        "pixels_per_class": {str(int(c)): int(n) for c, n in zip(cfg.class_codes, counts, strict=True)},
        "class_weights": [float(w) for w in class_w],
        "class_weighting": s.class_weights,
        "draw_thresholds_px": {str(c): int(t) for c, t in sampler.thresholds.items()},
        "patch_positions": {t: int(i.rows.size) for t, i in data.train_index.items()},
        "history": history,
    }
    return meta
