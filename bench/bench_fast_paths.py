"""Benchmark: what each private oneDNN primitive still buys FG-UNET inference on this CPU.

``NetClassifier.classify_window`` (normalisation, ``forward_lowmem``, softmax) on one window of a
random-init FG-UNET (paper filters, G groups x Cg channels, K 17), in fp32 and in bf16 autocast,
with the private oneDNN primitives in every combination:

- ``conv``: fused conv+ReLU where :func:`pipeline.nets.capability.fused_conv_relu` passes (the
  pipeline as it is);
- ``linear``: only oneDNN's fused matmul+ReLU (``torch.ops.mkldnn._linear_pointwise``) in the
  chunked 1x1 path. The pipeline dropped it after this benchmark (it added < 3 %, and lost 5 % with
  AVX2), so this script puts the removed code back itself (:func:`_chunked_fused_linear`), to
  re-measure it on another CPU;
- ``both``: the two together;
- ``none``: ``LANDCOVER_FAST_PATHS=0``, the public path (``nn.Conv2d`` + ReLU, ``addmm`` + ReLU).

Variants are timed round-robin in a shuffled order in the same process. The machines here are shared,
so before each round the script waits (up to ``--quiet-wait`` s) for other processes to go idle, and
a round during which they used more than ``--max-foreign`` cores (/proc/stat, as bench_fgunet) is
dropped, until ``--repeats`` clean rounds. The gain is the median over rounds of the same round's
``none`` time over the variant's, with its quartiles as the spread; ``best`` is reported too. A
primitive whose probe fails here is reported as unavailable and its variant equals ``none``. fp32
classes must be identical across variants (asserted); bf16's share of pixels with the class of
``none`` is reported.

    python bench/bench_fast_paths.py [--size 256] [--groups 6] [--channels 30] [--repeats 7]
        [--threads 2] [--precisions fp32,bf16] [--quiet-wait 60] [--max-foreign 0.15]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from bench_fgunet import QUIET, Foreign, wait_quiet  # noqa: E402

BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
VARIANTS = ("both", "conv", "linear", "none")


def emit(**rec: object) -> None:
    print(json.dumps({"bench": "fast_paths", **rec}), flush=True)


def lscpu() -> dict[str, object]:
    """Model name and the ISA flags that decide the paths (AVX2 / AVX-512 / bf16 / AMX)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    info = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    flags = info.get("Flags", "").split()
    isa = sorted(f for f in flags if f.startswith(("avx", "amx")))
    return {"model_name": info.get("Model name", "").strip(), "isa_flags": isa}


@functools.cache
def linear_usable(dtype: torch.dtype) -> bool:
    """The removed probe: oneDNN's matmul+ReLU runs and matches addmm + ReLU."""
    g = torch.Generator().manual_seed(0)
    y, w, b = (torch.randn(s, generator=g).to(dtype) for s in ((11, 5), (4, 5), (4,)))
    try:
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(y, w, b, "relu", [None], "")
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            return bool(
                torch.allclose(got.float(), torch.addmm(b, y, w.t()).relu().float(), rtol=tol, atol=tol)
            )
    except Exception:  # noqa: BLE001 - unavailable here
        return False


def _chunked_fused_linear(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``PixelPath._chunked`` as it was with oneDNN's fused matmul+ReLU (same values)."""
    from pipeline.models import nets

    dt = nets._compute_dtype(x)
    if x.device.type != "cpu" or dt not in (torch.float32, torch.bfloat16) or not linear_usable(dt):
        return _PLAIN_CHUNKED(self, x)
    mats = [(c.weight.reshape(c.out_channels, -1).to(dt), c.bias.to(dt)) for c in self._convs]
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, c)
    out = torch.empty(rows.shape[0], self.out_channels, dtype=dt, device=x.device)
    with torch.autocast("cpu", enabled=False):
        for s in range(0, rows.shape[0], nets.MLP_CHUNK):
            y = rows[s : s + nets.MLP_CHUNK].to(dt)
            for wm, bias in mats:
                y = torch.ops.mkldnn._linear_pointwise(y, wm, bias, "relu", [None], "")
            out[s : s + nets.MLP_CHUNK] = y
    return out.reshape(b, h, w, -1).permute(0, 3, 1, 2)


_PLAIN_CHUNKED: Any = None


def _select(variant: str, conv_probe: Any) -> None:
    from pipeline.nets import capability
    from pipeline.nets.arch import PixelPath

    os.environ[capability.FAST_PATHS_ENV] = "0" if variant in ("none", "linear") else "1"
    capability.fused_conv_relu = conv_probe
    PixelPath._chunked = _chunked_fused_linear if variant in ("both", "linear") else _PLAIN_CHUNKED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--channels", type=int, default=30, help="per group: a multiple of the 10 bands")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--quiet-wait", type=float, default=60, help="before each round wait up to this many s")
    ap.add_argument(
        "--max-foreign", type=float, default=0.15, help="drop rounds where other processes used more cores"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.models import get
    from pipeline.models.features import Normalisation
    from pipeline.nets import capability
    from pipeline.nets.arch import NetSpec, PixelPath, build

    global _PLAIN_CHUNKED
    _PLAIN_CHUNKED = PixelPath._chunked
    conv_probe = capability.fused_conv_relu
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    usable = {f"conv_{k}": conv_probe(dt) for k, dt in dtypes.items()}
    usable |= {f"linear_{k}": linear_usable(dt) for k, dt in dtypes.items()}
    emit(
        kind="machine",
        **machine(),
        **lscpu(),
        torch=torch.__version__,
        threads=args.threads,
        onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        usable=usable,
        bf16_autocast=capability.bf16_autocast("cpu"),
        onednn_native_bf16=capability.onednn_native_bf16(),
    )

    n_dates = args.groups * args.channels // len(BANDS)
    torch.manual_seed(0)
    net = build(NetSpec("fgunet", args.channels, args.groups, 17))
    model = get("fgunet")(net, np.arange(1, 18), ())
    f, dates = n_dates * len(BANDS), tuple(f"d{i:02d}" for i in range(n_dates))
    norm = Normalisation(BANDS, dates, np.zeros(f), np.full(f, 6000.0), 3, 97)
    rng = np.random.default_rng(0)
    cube = rng.integers(0, 6000, (n_dates, len(BANDS), args.size, args.size), dtype=np.int16)

    precisions = args.precisions.split(",")
    QUIET["limit_s"] = args.quiet_wait
    order = np.random.default_rng(1)
    times: dict[tuple[str, str], list[float]] = {}
    out: dict[tuple[str, str], np.ndarray] = {}
    clean = dropped = 0
    for rnd in range(3 * args.repeats + 1):  # round 0 warms up every (precision, variant)
        if clean == args.repeats:
            break
        waited = wait_quiet() if rnd else 0.0
        got: dict[tuple[str, str], float] = {}
        with Foreign() as fg:
            for prec in precisions:
                model.precision = prec  # what set_precision would pick, without its native/emulated policy
                for variant in order.permutation(VARIANTS):  # no variant always first after a switch
                    _select(variant, conv_probe)
                    t0 = time.perf_counter()
                    codes, _ = model.classify_window(cube, norm)
                    got[prec, variant] = time.perf_counter() - t0
                    out[prec, variant] = codes
        if not rnd:
            continue
        if fg.cores > args.max_foreign:  # another process took CPU during this round: not comparable
            dropped += 1
            continue
        clean += 1
        for k, dt in got.items():
            times.setdefault(k, []).append(dt)
        emit(kind="round", round=rnd, foreign_cores=round(fg.cores, 2), waited_s=waited)
    emit(kind="rounds", clean=clean, dropped=dropped, max_foreign=args.max_foreign)
    if not clean:
        raise SystemExit("no round ran without foreign load; raise --max-foreign or --quiet-wait")
    _select("conv", conv_probe)  # the pipeline as it is

    for prec in precisions:
        none = times[prec, "none"]
        for variant in VARIANTS:
            t = times[prec, variant]
            # per round, none's time over this variant's (same round, so slow drift of the shared
            # machine cancels); the median over rounds is the gain estimate, the quartiles its spread
            q1, med, q3 = np.percentile([a / b - 1 for a, b in zip(none, t, strict=True)], [25, 50, 75])
            same = float((out[prec, variant] == out[prec, "none"]).mean())
            if prec == "fp32":
                assert same == 1.0, f"fp32 {variant} differs from the public path on {1 - same:.2%} px"
            emit(
                kind="classify_window",
                precision=prec,
                variant=variant,
                window=args.size,
                groups=args.groups,
                channels=args.channels,
                rounds=len(t),
                best_s=round(min(t), 4),
                median_s=round(statistics.median(t), 4),
                px_per_s_best=round(args.size**2 / min(t)),
                gain_vs_none_best=round(min(none) / min(t) - 1, 4),
                gain_vs_none_paired_median=round(float(med), 4),
                gain_vs_none_paired_iqr=[round(float(q1), 4), round(float(q3), 4)],
                same_class_as_none=same,
                load1=round(os.getloadavg()[0], 2),
            )


if __name__ == "__main__":
    main()
