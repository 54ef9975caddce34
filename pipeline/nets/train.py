"""``landcover train`` for the network models: sparse-label patch training (seed §3.2.4, §3.3).

Each step draws ``b`` patches class-first from the precomputed patch positions of every tile
(:mod:`pipeline.nets.patches`), augments them, normalises them with the run's percentiles (eq. 2) and
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

The per-process batch ``b`` and the number of processes (``nodes`` in eq. 3) are parameters: the
multi-node training (:mod:`pipeline.nets.distributed`) runs this same loop with its batch source.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.layout import Layout
from pipeline.metrics import confusion, scores
from pipeline.models import derive_seed
from pipeline.models.features import Normalisation
from pipeline.nets import capability
from pipeline.nets.arch import BranchSupervised, NetSpec, build, count_parameters, initialise
from pipeline.nets.checkpoints import (
    check_resumable,
    clear_checkpoints,
    identity_digest,
    latest_checkpoint,
    mismatch,
    restore,
    save_checkpoint,
    superseded,
    training_identity,
)
from pipeline.nets.data import PatchData, check_drawable, code_lut, sampled_pixels
from pipeline.nets.distributed import BatchSource, World
from pipeline.nets.finetune import Start, starting_point
from pipeline.nets.history import HISTORY, PLOT, history_csv, plot_history
from pipeline.nets.loss import class_weights, weighted_sparse_ce
from pipeline.nets.patches import ClassFirstSampler, PatchRef, channels_per_date, min_pixels, patch_inputs
from pipeline.nets.settings import NetSettings, epoch_lr
from pipeline.nets.spec import BRANCHED
from pipeline.nets.weights import load_weights, save_weights, weights_blob
from pipeline.reference import SELECTION
from pipeline.train import META, base_meta

log = logging.getLogger(__name__)


# Fewer distinct patch positions than this in all tiles and the batches repeat a handful of patches
FEW_POSITIONS = 50


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
    precision = capability.choose_precision(s.precision, device, training=True)
    if world.size > 1:  # one arithmetic for every process: process 0's (auto times the hardware)
        flag = torch.tensor([precision == "bf16"], dtype=torch.int32, device=device)
        dist.broadcast(flag, 0)
        precision = "bf16" if flag.item() else "fp32"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    bf16 = precision == "bf16"

    norm = Normalisation.from_percentiles(percentiles)
    codes = cfg.class_codes
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
    init: Start | None = None
    if folder := s.init_folder(name):  # checked before any data is read or anything written
        init = starting_point(folder, spec, codes.tolist(), list(norm.bands), s.indices, cfg.named)
        log.info("%s starts from %s (nets.init_from)", name, folder)
    data = PatchData(gapfilled, labels, patches, norm, s.patch_size)
    counts = data.class_counts(codes, world)
    need = min_pixels(s.patch_size, s.min_labelled)
    sampler = ClassFirstSampler(
        list(data.train_index.values()),
        [int(c) for c in codes],
        need=need,
        min_positions=s.min_class_positions,
    )
    check_drawable(cfg, sampler, counts, s, next(iter(patches.values()), None))
    positions = sum(int(i.rows.size) for i in data.train_index.values())
    if world.is_main and positions < FEW_POSITIONS:
        log.warning(
            "%s: only %d training patch positions of %d px in all tiles: every batch of %d draws from "
            "the same few patches, and the network will learn them rather than the classes (larger "
            "tiles, denser labels, or a smaller nets.patch_size / nets.patch_stride)",
            name, positions, s.patch_size, s.batch_size,
        )  # fmt: skip
    relaxed = {c: t for c, t in sampler.thresholds.items() if t < need}
    if relaxed:
        log.info(
            "classes without %d positions at >= %d px of a %d-px patch, drawn from their best-stocked"
            " positions instead (threshold in px): %s",
            s.min_class_positions, need, s.patch_size, cfg.named(relaxed),
        )  # fmt: skip
    empty = [int(c) for c, n in zip(codes, counts, strict=True) if n == 0]
    if s.class_weights == "sampled":
        seen = sampled_pixels(data, sampler, codes, derive_seed(cfg.seed, f"{name}/weights"))
        weight_counts = np.where(counts > 0, np.maximum(seen, 1), 0)  # drawable: > 0 anyway
    else:
        weight_counts = counts if s.class_weights == "paper" else (counts > 0).astype(np.int64)
    class_w = class_weights(weight_counts, s.max_class_weight)

    torch.manual_seed(derive_seed(cfg.seed, f"{name}/init"))  # same initial weights on every process
    net = initialise(build(spec), s.weight_init)
    if init is not None:
        net.load_state_dict(init.state_dict)
    # deep supervision of the U-Net branch: a training-only classifier on its features alone
    supervised = BranchSupervised(net) if s.unet_aux_loss > 0 and name in BRANCHED else None
    branch = None if supervised is None else initialise(supervised.branch, s.weight_init)
    trained: torch.nn.Module = net if supervised is None else supervised
    trained = trained.to(device).to(memory_format=torch.channels_last)  # oneDNN's native conv layout
    if s.patch_size % net.pool_factor:
        raise PipelineError(None, f"nets.patch_size {s.patch_size} is not a multiple of {net.pool_factor}")
    opt = torch.optim.Adam(trained.parameters(), lr=s.learning_rate)
    sel_margin = spec.pool_aligned(spec.receptive_radius)
    weights = torch.from_numpy(class_w).to(device)
    lut = code_lut(codes)
    channels = [f"{d}/{b}" for d in norm.dates for b in (*norm.bands, *s.indices)]
    identity = {
        "arch": name,
        "codes": [int(c) for c in codes],
        "channels": channels,
        "normalisation": {"low": norm.low.tolist(), "high": norm.high.tolist()},
        "spec": spec.to_json(),
        "training": training_identity(s, cfg.seed, nodes),
        # the labels behind the checkpoint: resuming after the references changed would be wrong
        "data": {"pixels_per_class": [int(n) for n in counts], "patches": data.digest()},
        "init": init.provenance["weights_sha256"] if init else None,
    }

    history: list[dict[str, Any]] = []
    start = 0
    best: dict[str, Any] | None = None  # the epoch kept: best selection kappa so far, and its weights
    if latest := latest_checkpoint(ckdir):
        blob = load_weights(latest)
        if superseded(blob, identity, out_dir):
            # the config changed after this training finished: a deliberate retrain, not a resume
            log.warning(
                "%s was trained with other settings (%s); training afresh and removing its checkpoints",
                out_dir, mismatch(blob, identity),
            )  # fmt: skip
            if world.size > 1:
                dist.barrier()  # every process has looked at the checkpoint before it goes
            if world.is_main:
                clear_checkpoints(ckdir)
            if world.size > 1:
                dist.barrier()
        else:
            check_resumable(blob, identity, latest, ckdir)
            history, start, best = restore(blob, net, opt, latest, ckdir, branch)
            log.info("resuming %s from %s (epoch %d of %d)", name, latest.name, start, s.epochs)

    sel_refs: list[PatchRef] = []
    if world.is_main:
        sel_refs = data.selection_refs(s.selection_patches, derive_seed(cfg.seed, f"{name}/selection"))
        if not sel_refs:
            log.warning("no model-selection patches (reference.selection_ratio): the last epoch is kept")
    batches = BatchSource(data, sampler, world, s.batch_size, s.augment)
    model_fwd = trained
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model_fwd = DistributedDataParallel(
            trained, device_ids=None if device == "cpu" else [torch.device(device)]
        )
    t_start = time.perf_counter()
    for epoch in range(start, s.epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        lr = epoch_lr(s.learning_rate, nodes, s.warmup_epochs, epoch, s.epochs, s.lr_schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng(derive_seed(cfg.seed, f"{name}/epoch/{epoch}"))  # used by process 0
        torch.manual_seed(derive_seed(cfg.seed, f"{name}/dropout/{epoch}/{world.rank}"))
        trained.train()
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
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):  # fp32 weights, bf16 maths
                out = model_fwd(xt)
            if supervised is None:
                loss = weighted_sparse_ce(out, yt, weights)  # in fp32 (log-softmax of float logits)
            else:  # the model's loss plus the U-Net branch's own
                loss = weighted_sparse_ce(out[0], yt, weights)
                loss = loss + s.unet_aux_loss * weighted_sparse_ce(out[1], yt, weights)
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
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": total / s.steps_per_epoch, "precision": precision}
        if sel_refs:
            # each patch read with the context the map has around it (re-read per epoch: no copy held)
            windows = (data.read_in_context(r, SELECTION, sel_margin) for r in sel_refs)
            row |= evaluate(net, windows, norm, s.indices, codes, lut, weights, device)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        row["cpu_seconds"] = round(time.process_time() - c0, 3)  # this process, all its threads
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
        save_checkpoint(ckdir, epoch + 1, net, opt, history, identity, s.keep_checkpoints, best, branch)

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
    net = net.cpu()
    refit = None
    if s.head_refit:  # the kept epoch's last layer, refitted on the balanced pixel sample
        from pipeline.nets.headfit import refit_head

        refit = refit_head(cfg, name, net, norm, s.indices, gapfilled, labels)
    meta = _meta(
        cfg, name, net, norm, empty, percentiles, s, spec, channels, counts, data, nodes, history,
        class_w, sampler,
    )  # fmt: skip
    meta["training"]["identity_sha256"] = identity_digest(identity)  # these checkpoints made it
    meta["training"]["kept_epoch"] = best["epoch"] if best is not None else s.epochs
    meta["training"]["precision_used"] = precision
    meta["training"]["init_from"] = init.provenance if init else None
    meta["training"]["head_refit"] = refit
    meta["timing_s"] = {"training": round(time.perf_counter() - t_start, 3)}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_weights(tmp, weights_blob(spec, codes, s.indices, net.state_dict()))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
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


@torch.no_grad()
def evaluate(
    net: Any,
    windows: Iterable[tuple[np.ndarray, np.ndarray, tuple[int, int]]],
    norm: Normalisation,
    indices: tuple[str, ...],
    codes: np.ndarray,
    lut: np.ndarray,
    weights: torch.Tensor,
    device: str,
) -> dict[str, float | None]:
    """Loss (eq. 1), OA, kappa and mean F-score on the fixed selection patches (labelled pixels only).

    Each patch comes with its context (:meth:`PatchData.read_in_context`, margin >= the receptive
    radius) and is scored on its own N x N pixels only: the same predictions as the map's there.
    Scored without context, a U-Net's 64-px patch is mostly border, and on the demo the epoch kept
    then disagreed with the map's validation scores (docs/networks.md).
    """
    net.eval()
    loss_sum, n_px = 0.0, 0
    cm = np.zeros((len(codes), len(codes)), np.int64)
    pool = net.pool_factor
    for raw, labels, (r, c) in windows:
        _, _, h, w = raw.shape
        x = patch_inputs(raw, norm, indices)
        x = np.pad(x, ((0, 0), (0, -h % pool), (0, -w % pool)))  # as a whole-image pass pads
        n = labels.shape[0]
        logits = net(torch.from_numpy(x)[None].to(device))[:, :, r : r + n, c : c + n]
        yt = torch.from_numpy(lut[labels][None]).to(device)
        loss_sum += weighted_sparse_ce(logits, yt, weights).item() * yt.numel()
        n_px += yt.numel()
        pred = np.asarray(codes)[logits[0].argmax(0).cpu().numpy()]
        cm += confusion(labels, pred.astype(np.int64), np.asarray(codes))
    sc = scores(cm)
    f1 = [f for f in sc["f1"] if f is not None]
    return {
        "sel_loss": loss_sum / max(n_px, 1),
        "sel_oa": sc["oa"],
        "sel_kappa": sc["kappa"],
        "sel_mean_f1": float(np.mean(f1)) if f1 else None,
    }


def _meta(
    cfg: Config,
    name: str,
    net: torch.nn.Module,
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
    meta = base_meta(cfg, name, cfg.class_codes, norm, empty, percentiles)
    meta["features"] |= {
        "indices": list(s.indices),
        "network_channels": channels,
        "groups": s.groups,
        "channels_per_group": spec.in_channels,
    }
    meta["params"] = spec.to_json() | {"parameters": count_parameters(net)}
    meta["training"] = training_identity(s, cfg.seed, nodes) | {
        "epochs": s.epochs,
        "pixels_per_class": {str(int(c)): int(n) for c, n in zip(cfg.class_codes, counts, strict=True)},
        "class_weights": [float(w) for w in class_w],
        "class_weighting": s.class_weights,
        "draw_thresholds_px": {str(c): int(t) for c, t in sampler.thresholds.items()},
        "patch_positions": {t: int(i.rows.size) for t, i in data.train_index.items()},
        "history": history,
    }
    return meta
