"""Which hardware-specific compute paths this process may take, decided by running each one once.

The networks' inference has a faster private path (oneDNN's fused conv+ReLU primitive) and a
faster arithmetic (bf16 autocast), but whether they work depends on the CPU and on how oneDNN was
capped (``ONEDNN_MAX_CPU_ISA``), not on whether torch exposes them: on AVX2 CPUs without AVX-512 the
bf16 primitives raise at run time. CPU flags alone cannot tell, so each path is run once on a tiny
tensor, compared with the public path (``nn.Conv2d`` + ReLU; conv and ``addmm`` in fp32) and the
answer cached for the process. A path is taken only if its probe ran and agreed; otherwise the
public path computes the same values. (oneDNN's fused matmul+ReLU, ``_linear_pointwise``, was
dropped: +1-3 % over the fused convs with AVX-512, -5 % with AVX2; docs/benchmarks/fgunet.md.)

``LANDCOVER_FAST_PATHS=0`` (or ``false``/``no``/``off``) forces every private primitive off without
probing, e.g. to rule them out when a map looks wrong or a new CPU crashes. It does not change the
arithmetic: bf16 or fp32 is ``inference.precision``'s choice (see :func:`bf16_autocast`).

The nets code calls these functions at run time (never a value frozen at import), so tests can
monkeypatch them or set the variable.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FAST_PATHS_ENV = "LANDCOVER_FAST_PATHS"
_OFF = {"0", "false", "no", "off"}
# tolerance of a probe against the public path: fp32 must agree to rounding, bf16 to its 8-bit mantissa
_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
_FORMATS = (torch.contiguous_format, torch.channels_last)  # inference runs channels-last


def fast_paths_enabled() -> bool:
    """False when ``LANDCOVER_FAST_PATHS`` switches private primitives off (read on every call)."""
    return os.environ.get(FAST_PATHS_ENV, "1").strip().lower() not in _OFF


def _inputs(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Deterministic probe tensors from a private generator (the global RNG, which seeds training
    draws, is left alone)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in shapes]


def _agrees(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = _TOL[dtype]
    return got.dtype == dtype and bool(torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol))


_FAILURES: dict[str, str] = {}  # probe name -> why it said no, for the caller's warning


def _probe(name: str, run: Callable[[], bool]) -> bool:
    """Run ``run()`` (-> agreed?) without autograd or autocast; any exception means no."""
    try:
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            ok = bool(run())
        why = "" if ok else "its result disagrees with the public path"
    except Exception as exc:  # a missing primitive can raise anything (RuntimeError, NotImplementedError...)
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        ok, why = False, f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
    if not ok:
        _FAILURES[name] = why
    log.debug("probe %s: %s", name, "usable" if ok else f"not usable ({why})")
    return ok


def failure(name: str) -> str:
    """Why probe ``name`` said no (e.g. ``"bf16 autocast on cpu"``), or a generic answer if it did not
    run (switched off, or replaced in a test)."""
    return _FAILURES.get(name, "probe failed")


@functools.cache
def _fused_conv_relu_probe(dtype: torch.dtype) -> bool:
    def run() -> bool:  # everything inside: a build without the op raises AttributeError here
        op = torch.ops.mkldnn._convolution_pointwise
        x, w, b = (t.to(dtype) for t in _inputs((2, 5, 9, 7), (6, 5, 3, 3), (6,)))
        for fmt in _FORMATS:
            xf, wf = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
            got = op(xf, wf, b, [1, 1], [1, 1], [1, 1], 1, "relu", [None], "")
            if not _agrees(got, F.conv2d(xf, wf, b, padding=1).relu(), dtype):
                return False
        return True

    return torch.backends.mkldnn.is_available() and _probe(f"oneDNN conv+ReLU {dtype}", run)


def fused_conv_relu(dtype: torch.dtype) -> bool:
    """Whether oneDNN's conv with a ReLU post-op (``torch.ops.mkldnn._convolution_pointwise``) runs
    and matches ``Conv2d`` + ReLU for ``dtype`` on CPU."""
    if dtype not in _TOL or not fast_paths_enabled():  # oneDNN has no float64 primitive
        return False
    return _fused_conv_relu_probe(dtype)


@functools.cache
def _bf16_autocast_probe(kind: str) -> bool:
    bf = torch.bfloat16

    def run() -> bool:
        shapes = ((2, 5, 9, 7), (6, 5, 3, 3), (6,), (11, 5), (4, 5), (4,))
        x, w, b, m, wm, bm = (t.to(kind) for t in _inputs(*shapes))
        r16 = [t.to(bf).float() for t in (x, w, b, m, wm, bm)]  # fp32 references on bf16-rounded inputs
        ref_conv = F.conv2d(r16[0], r16[1], r16[2], padding=1).relu()
        ref_mm = torch.addmm(r16[5], r16[3], r16[4].t()).relu()
        with torch.autocast(kind, dtype=bf):  # what the U-Net convs run under
            conv = [F.conv2d(x.contiguous(memory_format=f), w, b, padding=1).relu() for f in _FORMATS]
            mm = torch.addmm(bm, m, wm.t()).relu()
        # the chunked 1x1 path's fallback: bf16 tensors, autocast off
        mm16 = torch.addmm(bm.to(bf), m.to(bf), wm.to(bf).t()).relu_()
        got = [(c, ref_conv) for c in conv] + [(mm, ref_mm), (mm16, ref_mm)]
        return all(_agrees(g, r, bf) for g, r in got)

    return _probe(f"bf16 autocast on {kind}", run)


def bf16_autocast(kind: str = "cpu") -> bool:
    """Whether bf16 autocast convs and matmuls run on device type ``kind`` and agree with fp32.

    Public ATen paths only, so not affected by ``LANDCOVER_FAST_PATHS``; they may be emulated
    (see :func:`onednn_native_bf16`)."""
    if kind == "cuda" and not torch.cuda.is_available():
        return False
    return _bf16_autocast_probe(kind)


# oneDNN ISA caps that still contain bf16 dot-product instructions (AVX512_CORE_BF16 and later)
_BF16_ISA_MARKERS = ("BF16", "AMX", "FP16", "AVX10", "ALL", "DEFAULT")


def onednn_native_bf16() -> bool:
    """Whether oneDNN will compute bf16 with native instructions: it says it supports bf16 and no
    ``ONEDNN_MAX_CPU_ISA`` (or the older ``DNNL_MAX_CPU_ISA``) cap below AVX512_CORE_BF16 is set.

    The CPU flags are read from /proc/cpuinfo, which a cap does not change; without this check a
    capped process (how CI simulates AVX2 machines) would pick bf16 and run it emulated.
    """
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return not cap or any(m in cap for m in _BF16_ISA_MARKERS)


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 runs natively here (else autocast emulates it, slower than fp32): the hardware
    has it (CPU flags avx512_bf16/amx_bf16 that oneDNN may use, or a bf16 GPU) AND the bf16 probe
    ran and agreed, since flags alone do not say the primitives exist in this build."""
    import torch

    if str(device).startswith("cuda"):
        gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return bool(gpu) and bf16_autocast("cuda")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    if not ("avx512_bf16" in flags or "amx_bf16" in flags):
        return False
    return onednn_native_bf16() and bf16_autocast("cpu")


AUTO_BF16_SPEEDUP = 1.2  # auto takes bf16 only this much faster: well clear of timing noise


@functools.cache
def bf16_speedup(kind: str = "cpu", training: bool = False) -> float:
    """fp32 time / bf16 autocast time of a U-Net-like block (two 3x3 conv+ReLU, 30 -> 32 -> 32
    channels, 8 x 64 x 64 px; forward and, for ``training``, backward), best of 5, once a process.

    Why a timing and not the flags: with the same AVX512-BF16 flags, bf16 ran 2.1-2.4x fp32 on a
    Zen 5 machine and 0.7-1.0x on an Intel Xeon VM without AMX (docs/benchmarks/fgunet.md), so
    ``auto`` would have made that Xeon slower. Takes ~0.1-0.5 s; 0.0 when the timing fails.
    """
    import time

    def block(dtype_on: bool) -> float:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 30, 64, 64, generator=g).to(kind).contiguous(memory_format=torch.channels_last)
        w1 = torch.randn(32, 30, 3, 3, generator=g).to(kind).requires_grad_(training)
        w2 = torch.randn(32, 32, 3, 3, generator=g).to(kind).requires_grad_(training)

        def run() -> None:
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype_on):
                y = F.conv2d(F.conv2d(x, w1, padding=1).relu(), w2, padding=1).relu()
            if training:
                y.float().sum().backward()
            if kind == "cuda":
                torch.cuda.synchronize()

        with torch.set_grad_enabled(training):
            for _ in range(2):
                run()
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t0)
        return best

    try:
        return block(False) / block(True)
    except (RuntimeError, ValueError) as exc:  # a primitive missing after all: never bf16 by auto
        log.info("bf16 timing failed (%s): auto takes fp32", exc)
        return 0.0


def choose_precision(asked: str, device: str, *, training: bool) -> str:
    """The arithmetic that will really run for ``asked`` (``auto``, ``fp32`` or ``bf16``), shared by
    training (``nets.precision``) and mapping (``inference.precision``).

    ``auto`` is bf16 where the hardware computes it natively (:func:`native_bf16`) and it is
    measurably faster there (:func:`bf16_speedup` >= :data:`AUTO_BF16_SPEEDUP`), else fp32. An
    explicit ``bf16`` is honoured where bf16 autocast works (warned when it is emulated, so slower
    than fp32); where it does not (:func:`bf16_autocast` failed), fp32 runs with a warning rather
    than the job crashing on a missing primitive. ``training``: ``nets.precision`` (the timing
    then includes the backward pass), else ``inference.precision``.
    """
    setting, doing = ("nets.precision", "training") if training else ("inference.precision", "mapping")
    if asked not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown precision {asked!r}")
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    where = "CPU" if kind == "cpu" else "GPU"
    if asked == "auto":
        if not native_bf16(device):
            return "fp32"
        ratio = bf16_speedup(kind, training=training)
        log.info("%s auto: bf16 runs %.2fx the fp32 speed on this %s", setting, ratio, where)
        return "bf16" if ratio >= AUTO_BF16_SPEEDUP else "fp32"
    if asked == "bf16" and not bf16_autocast(kind):
        log.warning(
            "%s bf16 asked for, but bf16 autocast does not work on this %s (%s): %s in fp32 instead",
            setting, where, failure(f"bf16 autocast on {kind}"), doing,
        )  # fmt: skip
        return "fp32"
    if asked == "bf16" and not native_bf16(device):
        log.warning(
            "%s bf16 on a %s without native bf16 (no AVX512-BF16/AMX that oneDNN may use, or a GPU"
            " without bf16): bf16 runs emulated, several to tens of times slower than fp32"
            " (docs/benchmarks/fgunet.md); precision auto would pick fp32 here",
            setting, where,
        )  # fmt: skip
    return asked
