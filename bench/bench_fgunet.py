"""Benchmark: FG-UNET inference and one training step on CPU, next to the same run's matmul peak.

Paper sizes: 33 dates x 10 bands = G 11 groups of Cg 30 channels, K 17 classes, U-Net filters
(32, 64, 128), 1x1 path (200, 100, 50). Every figure is a rate in GFLOP/s set against the machine's
own peak measured in the same run (a best-of-N 4096³ GEMM in fp32 and in bf16 with the run's
thread count), because these machines are shared and noisy. Measurements, one JSON line each:

- ``peak``: the GEMM through ``torch.mm`` and through oneDNN (a 1x1 conv over 4096 pixels); the
  peak is the better of the two (fp32 ``torch.mm`` is MKL, which may run a narrower code path on
  AMD CPUs than oneDNN, the library every conv here uses). ``conv_ceiling``: a compute-dense 3x3
  conv (128 -> 128 channels, 256²), what oneDNN reaches on FG-UNET's largest conv shape.
- ``flops``: FLOP per pixel, counted analytically from the built network (2 x multiply-adds of every
  conv, level l at 1/4^l of the pixels, the extractor G times, the classifier once) and cross-checked
  with forward hooks and ``torch.utils.flop_counter`` on a real forward pass. Bias, ReLU, pooling,
  upsampling, concatenation and softmax are not counted (reported separately as element ops).
- ``kernel``: ``Net.forward_lowmem`` on one 544² window (512 + 2 x 16 margin) in inference mode.
  px/s counts the 512² kept pixels, so the margin's recompute is charged to the network. Variants:
  ``fp32`` (eager, contiguous), ``fp32_clw`` (weights channels-last), ``fp32_cl`` (weights
  channels-last and each group's input slice made channels-last once), ``bf16``, ``bf16_clw``,
  ``bf16_cl`` (the same under CPU bf16 autocast), ``compile`` / ``compile_bf16``
  (``torch.compile`` of the per-group extractor, inductor with freezing, i.e. oneDNN weight
  prepacking and conv+ReLU fusion), ``fp32_folded`` (the training path ``Net.forward``: all G
  groups in one batch; 11x the activation memory). A variant that fails is reported with its
  error, not skipped silently. ``--profile`` adds self CPU time per op and per conv shape (with its
  GFLOP/s) of one forward in fp32, fp32_cl and bf16_cl (``torch.profiler``).
- ``end_to_end``: ``pipeline.infer.predict_tile`` (zarr read, normalisation, overlap, network,
  softmax, stitching, both COGs) over a synthetic gapfilled store of realistic int16 reflectances in
  the real chunk/shard layout, in a subprocess so its peak RSS (``VmHWM``) is its own. The variant is
  applied by wrapping the loaded network (no pipeline change). Reported with a time breakdown (read,
  normalise/softmax, network, write, COG finalisation) and the full-tile time 10980² / px_s.
  Default variants: ``fp32`` (the pipeline today), the fastest kernel variant in fp32, without
  ``torch.compile``, and overall. A new window shape costs a one-off warm-up (oneDNN primitive
  creation, compilation): ``px_per_s_steady`` leaves it out; the full-tile time adds it once per
  shape (9 on a 10980² tile).
- ``rss`` (``--rss-sizes``): the same at several sizes, to show peak RSS does not grow with the tile;
  ``full_tile_memory`` (``--full-tile-rss``, ~20+ min): a 10980² x 33 x 10 store of which no chunk
  is written (zarr returns the fill value 1500, a valid reflectance, so the network runs on every
  pixel and no disk is used).
- ``train_step``: one Adam step (forward, ``weighted_sparse_ce``, backward, step), b = 8 patches of
  64², median after warm-up, in fp32 and bf16 autocast, weights contiguous or channels-last
  (``_clw``); FLOP counted as 3 x the forward's. With ``--profile``, ``train_profile``: the share
  of one step's self CPU time per kind of op (conv forward, conv backward, Adam, pooling/upsampling/
  concatenation, ReLU/dropout, loss) and the GFLOP/s of the convolutions forward and backward.
- ``bf16_agreement``: the demo's trained FG-UNET (``results/demo/models/fgunet``) on the demo tile
  ``results/demo/gapfilled/T31TCJ.zarr`` (whole tile in one ``classify_window``), each variant
  against fp32: share of pixels with the same class, mean and max |confidence difference|.

The machine is shared: before each timed call the script waits (up to ``--quiet-wait`` s) until
other processes use < 0.15 cores, and each timed record carries ``foreign_cores``: the cores other
processes used meanwhile (/proc/stat busy time minus this process tree's). Kernels are timed
round-robin (``--rounds``, best kept) so a burst of foreign load cannot hit only one variant.
``peak_end`` measures the peaks again at the end; every line carries ``load1``.

Goal (issue): end-to-end >= 60 % of the same-run peak, i.e. a full tile in <= 20 min on 2 cores,
peak RSS <= 3 GB for a full tile.

    python bench/bench_fgunet.py [--quick] [--threads N] [--variants fp32,bf16,...]
        [--e2e-variants fp32,best_fp32,best_eager,best] [--size PX] [--rss-sizes 1024,2048,4096]
        [--full-tile-rss] [--profile] [--skip-kernel] [--skip-e2e] [--skip-train] [--skip-agreement]
        [--rounds R] [--quiet-wait S] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BANDS = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
N_DATES, GROUPS, CG, N_CLASSES = 33, 11, 30, 17
WINDOW, OVERLAP = 512, 16
FULL_TILE = 10980
VARIANTS = (
    "fp32",
    "fp32_clw",
    "fp32_cl",
    "bf16",
    "bf16_clw",
    "bf16_cl",
    "compile",
    "compile_bf16",
    "fp32_folded",
)
DEMO_MODEL = REPO / "results/demo/models/fgunet"
DEMO_TILE = REPO / "results/demo/gapfilled/T31TCJ.zarr"


def emit(**rec: object) -> None:
    print(json.dumps({"bench": "fgunet", **rec, "load1": round(os.getloadavg()[0], 2)}), flush=True)


def _err(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def paper_spec():
    from pipeline.nets.arch import NetSpec

    return NetSpec(arch="fgunet", in_channels=CG, groups=GROUPS, n_classes=N_CLASSES)


def paper_net(seed: int = 0) -> nn.Module:
    from pipeline.nets.arch import build

    torch.manual_seed(seed)
    return build(paper_spec()).eval()


# ------------------------------------------------------------------------------------------- peaks


def peak_gflops(dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def onednn_gemm_gflops(dtype: torch.dtype, n: int, repeats: int) -> float:
    """The same n x n x n GEMM through oneDNN (a 1x1 conv over n pixels), the library the convs use.

    ``torch.mm`` in fp32 goes to MKL, which on AMD CPUs may take a narrower code path than oneDNN;
    the machine's peak is the better of the two.
    """
    # batch 16: PyTorch sends a 1x1 fp32 conv to oneDNN only with batch >= 16 or > 1 thread
    x = torch.randn(16, n, 16, n // 256).to(dtype)
    w = torch.randn(n, n, 1, 1).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        F.conv2d(x, w)
        for _ in range(repeats):
            t = time.perf_counter()
            F.conv2d(x, w)
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def conv_ceiling(dtype: torch.dtype, side: int, repeats: int, channels_last: bool = True) -> float:
    """GFLOP/s of one 3x3 conv 128 -> 128 at side², the densest conv shape FG-UNET has."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = nn.Conv2d(128, 128, 3, padding=1).eval().to(memory_format=fmt)
    x = torch.rand(1, 128, side, side).contiguous(memory_format=fmt)
    best = float("inf")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        conv(x)
        for _ in range(repeats):
            t = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t)
    return 2 * 9 * 128 * 128 * side * side / best / 1e9


def measure_peaks(n: int, reps: int) -> tuple[dict[str, float], float]:
    """GEMM GFLOP/s by library and precision, and the cores other processes used meanwhile."""
    out = {}
    wait_quiet()
    with Foreign() as f:
        for k, d in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            out[f"torch_mm_{k}"] = peak_gflops(d, n, reps)
            out[f"onednn_{k}"] = onednn_gemm_gflops(d, n, reps)
    return out, round(f.cores, 2)


# ------------------------------------------------------------------------------------------- FLOPs


def _conv_macs(m: nn.Conv2d) -> int:
    """Multiply-adds per output pixel of a conv (all output channels)."""
    kh, kw = m.kernel_size
    return m.in_channels // m.groups * m.out_channels * kh * kw


def analytic_flops(net: nn.Module) -> dict[str, Any]:
    """FLOP per input pixel from the built modules: 2 x MACs, level l at 1/4^l, extractor x G."""
    spec, feats = net.spec, net.features
    parts: dict[str, float] = defaultdict(float)
    elem = 0.0  # output elements of every conv per pixel (a bias add + ReLU each)
    if feats.unet is not None:
        levels = len(feats.unet.down)
        for lv, block in enumerate(feats.unet.down):
            for m in block.modules():
                if isinstance(m, nn.Conv2d):
                    parts[f"unet_level{lv}"] += 2 * _conv_macs(m) / 4**lv
                    elem += m.out_channels / 4**lv
        for i, block in enumerate(feats.unet.up):  # deepest first: block i runs at level L-2-i
            lv = levels - 2 - i
            for m in block.modules():
                if isinstance(m, nn.Conv2d):
                    parts[f"unet_level{lv}"] += 2 * _conv_macs(m) / 4**lv
                    elem += m.out_channels / 4**lv
    if feats.pixel is not None:
        for m in feats.pixel.modules():
            if isinstance(m, nn.Conv2d):
                parts["pixel_path"] += 2 * _conv_macs(m)
                elem += m.out_channels
    per_group = sum(parts.values())
    out = {k: round(v * spec.groups) for k, v in sorted(parts.items())}
    head = 2 * _conv_macs(net.head.classifier)  # once per pixel, over the G*F concatenation
    out["classifier"] = head
    total = per_group * spec.groups + head
    return {
        "flop_per_px": round(total),
        "per_group_extractor": round(per_group),
        "parts": out,
        "element_ops_per_px": round(2 * elem * spec.groups),  # bias + ReLU per conv output element
    }


def hook_flops(net: nn.Module, side: int = 64) -> float:
    """The same count from forward hooks on a real forward pass (``Net.forward``)."""
    total = 0.0

    def hook(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += 2 * _conv_macs(m) * out.shape[-2] * out.shape[-1] * out.shape[0]
        elif isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features * out.numel() / m.out_features

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        # autograd on: the plain Conv2d modules run (without it, inference takes fused oneDNN
        # primitives and a chunked matmul path that neither hooks nor the counter see)
        with torch.enable_grad():
            net(torch.rand(1, net.spec.groups * net.spec.in_channels, side, side))
    finally:
        for h in handles:
            h.remove()
    return total / side**2


def counter_flops(net: nn.Module, side: int = 64) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), FlopCounterMode(display=False) as fc:  # plain modules, see hook_flops
        net.forward_lowmem(torch.rand(1, net.spec.groups * net.spec.in_channels, side, side))
    return fc.get_total_flops() / side**2


# ------------------------------------------------------------------------------------------- variants


class _ChannelsLastInput(nn.Module):
    """Wraps ``Net.features`` (a ``GroupFeatures``): both of its entry points get a channels-last input
    (``forward_lowmem`` calls ``parts``, ``Net.forward`` calls ``forward``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out_channels = inner.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous(memory_format=torch.channels_last))

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.inner.parts(x.contiguous(memory_format=torch.channels_last))


def configure(net: nn.Module, variant: str) -> nn.Module:
    """Put ``variant`` on ``net`` in place: ``net.forward_lowmem(x)`` then runs it (same output dtype)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    bf16 = "bf16" in variant
    if variant.endswith(("_cl", "_clw")):
        net.to(memory_format=torch.channels_last)
    if variant.endswith("_cl"):  # and each group's input slice converted once, not by each first conv
        net.features = _ChannelsLastInput(net.features)
    if variant.startswith("compile"):
        import torch._inductor.config as ind

        ind.freezing = True  # constant weights: oneDNN prepacking, conv+ReLU fusion (inference only)
        import torch._dynamo.config as dyn

        for knob in ("recompile_limit", "cache_size_limit"):  # one compile per window shape (<= 9 a tile)
            if hasattr(dyn, knob):
                setattr(dyn, knob, max(32, getattr(dyn, knob)))
        net.features = torch.compile(net.features, dynamic=False)
    base = net.forward if variant == "fp32_folded" else net.forward_lowmem

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return base(x)

    net.forward_lowmem = run  # type: ignore[method-assign]
    return net


class Foreign:
    """Cores used by other processes during a block: machine busy time minus this process's (and
    its reaped children's), from /proc/stat. The machine is shared; this says how much it was."""

    cores = 0.0

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> Foreign:
        self.t0, self.b0, self.o0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        dt = time.perf_counter() - self.t0
        self.cores = max(0.0, (self._busy() - self.b0 - (self._own() - self.o0)) / max(dt, 1e-3))


QUIET = {"limit_s": 0.0}  # --quiet-wait


def wait_quiet(threshold: float = 0.15) -> float:
    """Wait (up to --quiet-wait s) until other processes use < ``threshold`` cores; seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < QUIET["limit_s"]:
        with Foreign() as f:
            time.sleep(1.0)
        if f.cores < threshold:
            break
        time.sleep(4.0)
    return round(time.perf_counter() - t0, 1)


def bench_kernels(
    variants: list[str], side: int, margin: int, rounds: int, flop: float, peaks: dict
) -> list[dict[str, Any]]:
    """All variants built and warmed up first, then timed round-robin ``rounds`` times, so a burst
    of foreign load hits one call of several variants rather than every call of one."""
    full = side + 2 * margin
    x = torch.rand(1, GROUPS * CG, full, full)
    nets, first, errors = {}, {}, {}
    with torch.inference_mode():
        for v in variants:
            try:
                net = configure(paper_net(), v)
                wait_quiet()
                t = time.perf_counter()
                net.forward_lowmem(x)
                first[v] = time.perf_counter() - t
                nets[v] = net
            except Exception as exc:  # noqa: BLE001 - a failing variant is a result
                errors[v] = (_err(exc), traceback.format_exc()[-800:])
        times: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for _ in range(rounds):
            for v, net in nets.items():
                wait_quiet()
                with Foreign() as f:
                    t = time.perf_counter()
                    net.forward_lowmem(x)
                    dt = time.perf_counter() - t
                times[v].append((dt, f.cores))
    out = []
    for v in variants:
        if v in errors:
            out.append({"variant": v, "error": errors[v][0], "trace": errors[v][1]})
            continue
        best, foreign = min(times[v])
        px_s = side * side / best
        peak = peaks["bf16" if "bf16" in v else "fp32"]
        out.append(
            {
                "variant": v,
                "window": full,
                "kept": side,
                "first_call_s": round(first[v], 2),
                "best_s": round(best, 3),
                "median_s": round(statistics.median(t for t, _ in times[v]), 3),
                "foreign_cores_at_best": round(foreign, 2),
                "foreign_cores_max": round(max(c for _, c in times[v]), 2),
                "px_per_s": round(px_s),
                "gflop_s_kept": round(px_s * flop / 1e9, 1),  # useful work (kept pixels)
                "gflop_s_computed": round(full * full / best * flop / 1e9, 1),  # incl. the margin
                "peak_gflop_s": round(peak, 1),
                "ratio_to_peak": round(px_s * flop / 1e9 / peak, 3),
                "full_tile_min_kernel_only": round(FULL_TILE**2 / px_s / 60, 1),
            }
        )
    return out


def profile_ops(variant: str, side: int, top: int = 8) -> dict[str, Any]:
    """Self CPU time per op of one forward, and per conv shape with its GFLOP/s."""
    from torch.profiler import ProfilerActivity, profile

    net = configure(paper_net(), variant)
    x = torch.rand(1, GROUPS * CG, side, side)
    with torch.inference_mode():
        net.forward_lowmem(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            net.forward_lowmem(x)
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in rows)
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    ops = [
        {
            "op": e.key,
            "share": round(e.self_cpu_time_total / total, 3),
            "ms": round(e.self_cpu_time_total / 1e3),
        }
        for e in rows[:top]
    ]
    convs = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key != "aten::mkldnn_convolution" or not e.input_shapes or len(e.input_shapes) < 2:
            continue
        (n, cin, h, w), (cout, _, kh, kw) = e.input_shapes[0], e.input_shapes[1]
        flop = 2 * n * h * w * cout * cin * kh * kw * e.count
        convs.append(
            {
                "conv": f"{cin}->{cout} {kh}x{kw} at {h}x{w}",
                "calls": e.count,
                "share": round(e.self_cpu_time_total / total, 3),
                "gflop_s": round(flop / e.self_cpu_time_total / 1e3, 1),
            }
        )
    convs.sort(key=lambda c: -c["share"])
    return {"total_ms": round(total / 1e3), "top_ops": ops, "convs": convs}


# ------------------------------------------------------------------------------------------- fixtures


def dates() -> list[str]:
    return [str(np.datetime64("2018-01-05") + 11 * i) for i in range(N_DATES)]


def grid_of(side: int):
    from affine import Affine
    from rasterio.crs import CRS

    from pipeline.io.tilestore import Grid

    return Grid(CRS.from_epsg(32631), Affine(10.0, 0.0, 399960.0, 0.0, -10.0, 4800000.0), side, side)


def make_config(workdir: Path, threads: int):
    import yaml

    from pipeline.config import Config, validate

    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw.pop("demo", None)
    raw["run"].update(workdir=str(workdir / "run"), seed=42, threads=threads)
    raw["classifiers"] = ["fgunet"]
    raw["inference"] = {"window": WINDOW, "overlap": OVERLAP, "regularisation_radius": 0}
    return Config(validate(raw))


def make_store(path: Path, side: int, seed: int = 0) -> float:
    """Synthetic gapfilled store: 16 px fields of 17 class spectra (33 x 10) + noise, int16 0..6000.

    Written shard by shard (the real layout: 64 px chunks in 512 px shards, Blosc lz4). Returns s.
    """
    from pipeline.io.tilestore import SHARD, add_array, create_store, iter_windows, win_slices

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    spectra = rng.uniform(300, 4500, (N_CLASSES, N_DATES, len(BANDS))).astype(np.float32)
    g = create_store(path, "gapfilled", grid_of(side), tile="T31TCJ", bands=BANDS, dates=dates())
    refl = add_array(g, "reflectance", (N_DATES, len(BANDS), side, side), "int16", -10000)
    add_array(g, "clear_count", (side, side), "uint16", 0)[...] = np.full((side, side), N_DATES, np.uint16)
    for win in iter_windows(side, side, SHARD):
        h, w = int(win.height), int(win.width)
        cls = rng.integers(0, N_CLASSES, (-(-h // 16), -(-w // 16)))
        field = np.kron(cls, np.ones((16, 16), np.int64))[:h, :w]
        cube = spectra[field].transpose(2, 3, 0, 1)  # (T, C, h, w)
        cube += rng.normal(0, 150, cube.shape).astype(np.float32)
        refl[(slice(None), slice(None), *win_slices(win))] = np.clip(cube, 0, 6000).astype(np.int16)
    return time.perf_counter() - t0


def make_empty_store(path: Path, side: int, fill: int = 1500) -> None:
    """A store of which no chunk is ever written: every read returns ``fill`` (no disk used)."""
    from pipeline.io.tilestore import add_array, create_store

    g = create_store(path, "gapfilled", grid_of(side), tile="T31TCJ", bands=BANDS, dates=dates())
    add_array(g, "reflectance", (N_DATES, len(BANDS), side, side), "int16", fill)


def make_model_dir(path: Path, cfg: Any) -> None:
    """A random-init paper-size FG-UNET with a minimal valid ``model.json`` (as nets.train._meta writes)."""
    from pipeline.models import get
    from pipeline.models.features import Normalisation
    from pipeline.train import base_meta

    path.mkdir(parents=True, exist_ok=True)
    model = get("fgunet")(paper_net(), cfg.class_codes, ())
    model.save(path)
    n = N_DATES * len(BANDS)
    norm = Normalisation(tuple(BANDS), tuple(dates()), np.full(n, 200.0), np.full(n, 4500.0), 3.0, 97.0)
    meta = base_meta(cfg, "fgunet", model.classes_, norm, [], path / "percentiles.json")
    meta["features"] |= {
        "indices": [],
        "network_channels": norm.channels,
        "groups": GROUPS,
        "channels_per_group": CG,
    }
    meta["params"] = model.spec.to_json() | {"parameters": sum(p.numel() for p in model.net.parameters())}
    (path / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- end to end


class _Timer:
    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.first: dict[str, float] = {}

    def wrap(self, key: str, fn: Any) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                self.s[key] += dt
                self.first.setdefault(key, dt)

        return timed


class _ArrayProxy:
    def __init__(self, arr: Any, timer: _Timer) -> None:
        self._arr, self.shape = arr, arr.shape
        self._get = timer.wrap("read", arr.__getitem__)

    def __getitem__(self, key: Any) -> Any:
        return self._get(key)


class _GroupProxy:
    def __init__(self, group: Any, timer: _Timer) -> None:
        self._g, self._t, self.attrs = group, timer, group.attrs

    def __getitem__(self, name: str) -> Any:
        a = self._g[name]
        return _ArrayProxy(a, self._t) if name == "reflectance" else a

    def __contains__(self, name: str) -> bool:
        return name in self._g


def child_predict(job: dict[str, Any]) -> None:
    """In a fresh process: predict_tile with the variant put on the loaded net; one JSON line out."""
    import pipeline.infer as infer
    import pipeline.io.cog as cog
    import pipeline.nets.classifier as netmod
    from pipeline.nets.classifier import NetClassifier

    timer = _Timer()
    calls: dict[tuple[int, ...], list[float]] = defaultdict(list)  # window shape -> forward seconds
    threads, variant = int(job["threads"]), job["variant"]
    cfg = make_config(Path(job["workdir"]), threads)
    orig_load = NetClassifier.load.__func__

    def load(cls: Any, directory: Path, device: str = "cpu") -> Any:
        model = orig_load(cls, directory, device)
        configure(model.net, variant)
        fwd = timer.wrap("network", model.net.forward_lowmem)

        def per_shape(x: torch.Tensor) -> torch.Tensor:
            t = time.perf_counter()
            y = fwd(x)
            calls[tuple(x.shape[-2:])].append(time.perf_counter() - t)
            return y

        model.net.forward_lowmem = per_shape
        return model

    NetClassifier.load = classmethod(load)  # type: ignore[method-assign]
    orig_open = infer.open_store
    infer.open_store = lambda *a, **k: _GroupProxy(orig_open(*a, **k), timer)
    NetClassifier.classify_window = timer.wrap("classify", NetClassifier.classify_window)
    netmod.patch_inputs = timer.wrap("normalise", netmod.patch_inputs)
    cog.RasterSink.write = timer.wrap("write", cog.RasterSink.write)
    out = Path(job["out"])
    t = time.perf_counter()
    infer.predict_tile(cfg, Path(job["model"]), Path(job["store"]), out / "map.tif", out / "conf.tif")
    total = time.perf_counter() - t
    with open("/proc/self/status") as f:
        hwm = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM"))
    s = timer.s
    print(
        "RESULT "
        + json.dumps(
            {
                "total_s": total,
                "read_s": s["read"],
                "normalise_s": s["normalise"],
                "network_s": s["network"],
                "network_first_window_s": timer.first.get("network", 0.0),
                # one-off cost of a new window shape (oneDNN primitives, compilation): its first
                # call minus the median of its later ones
                "warmup_s": sum(
                    max(0.0, v[0] - statistics.median(v[1:])) for v in calls.values() if len(v) > 1
                ),
                "window_shapes": len(calls),
                "softmax_nodata_pad_s": s["classify"] - s["network"] - s["normalise"],
                "write_s": s["write"],
                # reads run on predict_tile's read-ahead thread, overlapped with the network: only
                # the waits for them are serial, and they fall in this remainder
                "read_wait_cog_finalise_and_setup_s": total - s["classify"] - s["write"],
                "peak_rss_mib": hwm / 1024,
            }
        ),
        flush=True,
    )


def run_child(store: Path, model: Path, workdir: Path, variant: str, threads: int, timeout: float) -> dict:
    out = Path(tempfile.mkdtemp(prefix="out_", dir=workdir))
    job = {"store": str(store), "model": str(model), "workdir": str(workdir), "variant": variant}
    job |= {"threads": threads, "out": str(out)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(job)]
    waited = wait_quiet()
    with Foreign() as f:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    shutil.rmtree(out, ignore_errors=True)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode or line is None:
        raise RuntimeError(f"child failed (rc {res.returncode}): {res.stderr.strip()[-1500:]}")
    return json.loads(line[len("RESULT ") :]) | {"foreign_cores": f.cores, "quiet_waited": waited}


def e2e_record(r: dict, side: int, variant: str, flop: float, peaks: dict) -> dict:
    """px/s as run, and steady: without the one-off warm-up of each window shape, which a full tile
    pays once per shape (9 of them), not per window. Full-tile time = steady rate + 9 warm-ups."""
    px_s = side * side / r["total_s"]
    steady = side * side / (r["total_s"] - r["warmup_s"])
    per_shape = r["warmup_s"] / max(1, r["window_shapes"])
    peak = peaks["bf16" if "bf16" in variant else "fp32"]
    rec = {"variant": variant, "side": side, "seconds": round(r["total_s"], 1), "px_per_s": round(px_s)}
    rec |= {
        "px_per_s_steady": round(steady),
        "gflop_s_steady": round(steady * flop / 1e9, 1),
        "peak_gflop_s": round(peak, 1),
        "peak_fp32_gflop_s": round(peaks["fp32"], 1),
        "ratio_to_peak": round(px_s * flop / 1e9 / peak, 3),
        "ratio_to_peak_steady": round(steady * flop / 1e9 / peak, 3),
        "ratio_to_fp32_peak_steady": round(steady * flop / 1e9 / peaks["fp32"], 3),
        "full_tile_min": round((FULL_TILE**2 / steady + 9 * per_shape) / 60, 1),
        "peak_rss_mib": round(r["peak_rss_mib"]),
        "window_shapes": r["window_shapes"],
        "foreign_cores": round(r["foreign_cores"], 2),
        "breakdown_s": {k[:-2]: round(v, 2) for k, v in r.items() if k.endswith("_s") and k != "total_s"},
    }
    return rec


# ------------------------------------------------------------------------------------------- training


def train_step_fn(variant: str, batch: int, side: int) -> Callable[[], None]:
    """One Adam step (forward, ``weighted_sparse_ce``, backward, step) of a fresh paper-size FG-UNET
    on b random patches, in the variant's arithmetic and weight layout: what is timed and profiled."""
    from pipeline.nets.loss import weighted_sparse_ce

    torch.manual_seed(0)
    net = paper_net().train()
    if variant.endswith(("_cl", "_clw")):  # weights; Net.forward reshapes the input, so it stays NCHW
        net.to(memory_format=torch.channels_last)
    bf16 = "bf16" in variant
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.rand(batch, GROUPS * CG, side, side)
    y = torch.randint(-1, N_CLASSES, (batch, side, side))  # -1 = unlabelled, as in sparse labels
    w = torch.rand(N_CLASSES) + 0.5

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = weighted_sparse_ce(net(x), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_train(
    variant: str, batch: int, side: int, warmup: int, steps: int, flop: float, peaks: dict
) -> dict:
    step = train_step_fn(variant, batch, side)
    bf16 = "bf16" in variant
    for _ in range(warmup):
        step()
    times, foreign = [], []
    for _ in range(steps):
        wait_quiet()
        with Foreign() as f:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        foreign.append(f.cores)
    med = statistics.median(times)
    peak = peaks["bf16" if bf16 else "fp32"]
    gf = 3 * flop * batch * side * side / med / 1e9
    return {
        "variant": variant,
        "batch": batch,
        "patch": side,
        "median_s": round(med, 3),
        "min_s": round(min(times), 3),
        "steps_timed": steps,
        "foreign_cores_max": round(max(foreign), 2),
        "gflop_s_3x_forward": round(gf, 1),
        "peak_gflop_s": round(peak, 1),
        "ratio_to_peak": round(gf / peak, 3),
    }


_TRAIN_KINDS = (  # (category, op names; a trailing * matches a prefix): where a step's CPU time goes
    ("conv backward", ("aten::convolution_backward", "aten::mkldnn_convolution_backward*")),
    ("conv forward", ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution")),
    ("optimizer (Adam)", ("aten::_foreach_*", "Optimizer.step*", "aten::addcmul_", "aten::addcdiv_",
                          "aten::lerp_")),
    ("pool / upsample / concat", ("aten::max_pool2d*", "aten::upsample*", "aten::cat", "aten::narrow",
                                  "aten::slice")),
    ("relu / dropout", ("aten::relu*", "aten::threshold*", "aten::dropout", "aten::native_dropout*",
                        "aten::bernoulli_")),
    ("loss", ("aten::log_softmax", "aten::_log_softmax*", "aten::nll_loss*", "aten::gather")),
)  # fmt: skip


def _train_kind(op: str) -> str:
    for kind, names in _TRAIN_KINDS:
        if any(op.startswith(n[:-1]) if n.endswith("*") else op == n for n in names):
            return kind
    return "other"


def profile_train(variant: str, batch: int, side: int, peaks: dict) -> dict[str, Any]:
    """Where one Adam step's time goes (torch.profiler, self CPU time) and what each conv shape's
    forward and backward reach in GFLOP/s: the account of the gap to the GEMM peak."""
    from torch.profiler import ProfilerActivity, profile

    step = train_step_fn(variant, batch, side)
    bf16 = "bf16" in variant
    for _ in range(2):
        step()
    wait_quiet()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    wall = time.perf_counter() - t
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in rows)
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    top = [
        {"op": e.key, "kind": _train_kind(e.key), "share": round(e.self_cpu_time_total / total, 3)}
        for e in rows[:12]
    ]
    kinds: dict[str, float] = {}
    for e in rows:
        k = _train_kind(e.key)
        kinds[k] = kinds.get(k, 0.0) + e.self_cpu_time_total
    # conv shapes: forward FLOP from the input and weight shapes; backward = 2x (data and weight
    # gradients), 1x for the first conv of a group, whose input needs no gradient
    fwd: dict[str, list[float]] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key != "aten::mkldnn_convolution" or not e.input_shapes or len(e.input_shapes) < 2:
            continue
        (n, cin, h, w_), (cout, _, kh, kw) = e.input_shapes[0], e.input_shapes[1]
        fl = 2 * n * h * w_ * cout * cin * kh * kw * e.count
        fwd[f"{cin}->{cout} {kh}x{kw} at {h}x{w_} (n={n})"] = [fl, e.self_cpu_time_total]
    conv_flop = sum(v[0] for v in fwd.values())
    peak = peaks["bf16" if bf16 else "fp32"]
    cpu_threads = torch.get_num_threads()
    return {
        "variant": variant,
        "wall_s": round(wall, 3),
        "self_cpu_s": round(total / 1e6, 3),
        "threads": cpu_threads,
        "share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "conv_forward_gflop_s": round(conv_flop / max(kinds.get("conv forward", 1), 1) / 1e3, 1),
        "conv_backward_gflop_s_2x": round(2 * conv_flop / max(kinds.get("conv backward", 1), 1) / 1e3, 1),
        "peak_gflop_s": round(peak, 1),
        "top_ops": top,
        "forward_convs": sorted(
            (
                {"conv": k, "gflop_s": round(f / t / 1e3, 1), "ms": round(t / 1e3)}
                for k, (f, t) in fwd.items()
            ),
            key=lambda r: -r["ms"],
        ),
    }


# ------------------------------------------------------------------------------------------- agreement


def bench_agreement(variants: list[str]) -> None:
    if not (DEMO_MODEL / "weights.pt").exists() or not DEMO_TILE.exists():
        emit(
            event="bf16_agreement",
            skipped=True,
            reason=f"{DEMO_MODEL} or {DEMO_TILE} not found (demo not run?)",
        )
        return
    from pipeline.io.tilestore import open_store
    from pipeline.models import get
    from pipeline.models.features import Normalisation
    from pipeline.train import load_meta

    meta = load_meta(DEMO_MODEL)
    norm = Normalisation.from_json(
        meta["normalisation"], meta["features"]["bands"], meta["features"]["dates"]
    )
    cube = np.asarray(open_store(DEMO_TILE, "gapfilled", ("reflectance",))["reflectance"][...])
    ref = get("fgunet").load(DEMO_MODEL)
    codes0, conf0 = ref.classify_window(cube, norm)
    valid = codes0 > 0
    for variant in variants:
        if variant in ("fp32", "fp32_folded"):
            continue
        try:
            model = get("fgunet").load(DEMO_MODEL)
            configure(model.net, variant)
            codes, conf = model.classify_window(cube, norm)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            emit(event="bf16_agreement", variant=variant, error=_err(exc))
            continue
        d = np.abs(conf[valid].astype(int) - conf0[valid].astype(int))
        emit(
            event="bf16_agreement",
            variant=variant,
            model=str(DEMO_MODEL.relative_to(REPO)),
            tile=str(DEMO_TILE.relative_to(REPO)),
            spec=ref.spec.to_json(),
            pixels=int(valid.sum()),
            same_class=round(float((codes[valid] == codes0[valid]).mean()), 5),
            conf_abs_diff_mean=round(float(d.mean()), 3),
            conf_abs_diff_max=int(d.max()),
            mean_conf_fp32=round(float(conf0[valid].mean()), 1),
        )


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="kernel variants")
    ap.add_argument(
        "--e2e-variants",
        default="fp32,best_fp32,best_eager,best",
        help="best / best_fp32 / best_eager: the fastest working kernel variant (overall / in fp32 / "
        "without torch.compile)",
    )
    ap.add_argument("--size", type=int, default=0, help="end-to-end tile side (default 2048, quick 1024)")
    ap.add_argument("--rss-sizes", default="", help="e.g. 1024,2048,4096: end-to-end RSS per size")
    ap.add_argument("--full-tile-rss", action="store_true", help="RSS over a 10980² fill-value store")
    ap.add_argument("--profile", action="store_true", help="top ops of one fp32 and one bf16 forward")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--rounds", type=int, default=4, help="timed round-robin rounds of the kernels")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        help="before each timed call wait up to this many s for other processes to go idle (0: never)",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        job = json.loads(args._child)
        torch.set_num_threads(int(job["threads"]))
        child_predict(job)
        return

    torch.set_num_threads(args.threads)
    QUIET["limit_s"] = args.quiet_wait
    q = args.quick
    side = args.size or (1024 if q else 2048)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_fgunet_"))
    work.mkdir(parents=True, exist_ok=True)
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1] for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    isa = sorted(
        f for f in flags.split() if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma")
    )
    emit(
        event="setup",
        **machine(),
        torch=torch.__version__,
        threads=args.threads,
        isa=isa,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        onednn_bf16_supported=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        quick=q,
        spec=paper_spec().to_json(),
    )

    n, reps = (2048, 3) if q else (4096, 5)
    raw, foreign = measure_peaks(n, reps)
    peaks = {k: max(raw[f"torch_mm_{k}"], raw[f"onednn_{k}"]) for k in ("fp32", "bf16")}
    emit(
        event="peak",
        op=f"{n}x{n}x{n} GEMM, best of {reps}",
        **{f"{k}_gflop_s": round(v, 1) for k, v in raw.items()},
        **{f"{k}_gflop_s": round(v, 1) for k, v in peaks.items()},
        foreign_cores=foreign,
        note="peak = the better of torch.mm and the oneDNN GEMM; every ratio below divides by it",
    )
    cs = 128 if q else 256
    emit(
        event="conv_ceiling",
        op=f"conv3x3 128->128 at {cs}x{cs}",
        fp32_gflop_s=round(conv_ceiling(torch.float32, cs, reps), 1),
        bf16_gflop_s=round(conv_ceiling(torch.bfloat16, cs, reps), 1),
        fp32_nchw_gflop_s=round(conv_ceiling(torch.float32, cs, reps, channels_last=False), 1),
        bf16_nchw_gflop_s=round(conv_ceiling(torch.bfloat16, cs, reps, channels_last=False), 1),
        note="channels-last unless _nchw",
    )

    net = paper_net()
    fl = analytic_flops(net)
    flop = float(fl["flop_per_px"])
    emit(
        event="flops",
        **fl,
        hooks_flop_per_px=round(hook_flops(net)),
        flop_counter_flop_per_px=round(counter_flops(net)),
        parameters=sum(p.numel() for p in net.parameters()),
        counted="2 x MACs of every conv; U-Net level l at 1/4^l of the pixels; extractor x G; "
        "classifier once",
    )

    best: dict[str, tuple[str, float]] = {"best": ("fp32", 0.0), "best_fp32": ("fp32", 0.0)}
    best["best_eager"] = ("fp32", 0.0)
    ok_variants: list[str] = []
    if not args.skip_kernel:
        kside, rounds = (256, 1) if q else (WINDOW, args.rounds)
        variants = [v for v in args.variants.split(",") if v]
        for rec in bench_kernels(variants, kside, OVERLAP, rounds, flop, peaks):
            emit(event="kernel", **rec)
            variant = rec["variant"]
            if "error" in rec:
                continue
            ok_variants.append(variant)
            if variant == "fp32_folded":  # 11x the activation memory: not an inference option
                continue
            for key, fits in (
                ("best", True),
                ("best_fp32", "bf16" not in variant),
                ("best_eager", "compile" not in variant),
            ):
                if fits and rec["px_per_s"] > best[key][1]:
                    best[key] = (variant, rec["px_per_s"])
        emit(event="kernel_best", **{k: v for k, (v, _) in best.items()})
    if args.profile:
        pside = (128 if q else WINDOW) + 2 * OVERLAP
        for variant in ("fp32", "fp32_cl", "bf16_cl"):
            emit(event="profile", variant=variant, window=pside, **profile_ops(variant, pside))

    cfg = make_config(work, args.threads)
    model_dir = work / "model"
    make_model_dir(model_dir, cfg)
    alias = {k: v for k, (v, _) in best.items()}
    e2e_variants = list(dict.fromkeys(alias.get(v, v) for v in args.e2e_variants.split(",") if v))
    timeout = 7200
    if not args.skip_e2e:
        store = work / f"g_{side}.zarr"
        t_store = make_store(store, side)
        nbytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        emit(event="store", side=side, seconds=round(t_store, 1), bytes=nbytes)
        for variant in e2e_variants:
            try:
                r = run_child(store, model_dir, work, variant, args.threads, timeout)
            except Exception as exc:  # noqa: BLE001
                emit(event="end_to_end", variant=variant, side=side, error=_err(exc))
                continue
            emit(event="end_to_end", **e2e_record(r, side, variant, flop, peaks))
        shutil.rmtree(store, ignore_errors=True)

    rss_variant = e2e_variants[-1] if e2e_variants else "fp32"
    for s in [int(v) for v in args.rss_sizes.split(",") if v]:
        store = work / f"g_{s}.zarr"
        make_store(store, s)
        try:
            r = run_child(store, model_dir, work, rss_variant, args.threads, timeout)
            emit(event="rss", **e2e_record(r, s, rss_variant, flop, peaks))
        except Exception as exc:  # noqa: BLE001
            emit(event="rss", side=s, variant=rss_variant, error=_err(exc))
        shutil.rmtree(store, ignore_errors=True)
    if args.full_tile_rss:
        store = work / "g_full.zarr"
        make_empty_store(store, FULL_TILE)
        try:
            r = run_child(store, model_dir, work, rss_variant, args.threads, 4 * 3600)
            rec = e2e_record(r, FULL_TILE, rss_variant, flop, peaks)
            emit(event="full_tile_memory", fill_value=1500, **rec)
        except Exception as exc:  # noqa: BLE001
            emit(event="full_tile_memory", variant=rss_variant, error=_err(exc))
        shutil.rmtree(store, ignore_errors=True)

    if not args.skip_train:
        warm, steps = (1, 2) if q else (2, 5)
        for variant in ("fp32", "fp32_clw", "bf16", "bf16_clw"):
            emit(event="train_step", **bench_train(variant, 8, 64, warm, steps, flop, peaks))
        if args.profile:
            for variant in ("fp32_clw", "bf16_clw"):
                emit(event="train_profile", **profile_train(variant, 8, 64, peaks))

    if not args.skip_agreement:
        bench_agreement(ok_variants or ["bf16"])
    end, foreign = measure_peaks(n, reps)
    emit(
        event="peak_end",
        **{f"{k}_gflop_s": round(v, 1) for k, v in end.items()},
        foreign_cores=foreign,
        note="the peak again after everything: how much the machine drifted during the run",
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
