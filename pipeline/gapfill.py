"""Linear temporal gapfilling and resampling onto the run's regular date grid (seed §2.1).

Same rule as OTB ``ImageTimeSeriesGapFilling`` (linear) / iota2: for each output date, take the
nearest clear observation at or before it and the nearest at or after it and interpolate linearly in
time (days). An output date on a clear acquisition gets that value; before the first / after the
last clear observation the nearest clear value is repeated (constant extrapolation); a pixel that is
never clear gets :data:`NODATA` on every date, so nothing is invented where nothing was seen.

Rounding: ``v_n - (v_n - v_p) * num / den`` is evaluated in float32 (``num`` = days to the next
clear date, ``den`` = days between the two clear dates; integers, so the product is exact for
``|diff * num| < 2**24`` and only the one division rounds), then rounded half to even (``rint``)
to int16. For realistic gaps (< ~80 days at full int16 range, far more for reflectances) this is the
exactly rounded rational value, ties included (tested against exact fractions).

Speed: the stage is memory-bound in principle (read the cube once, write the grid once). One fused
numba kernel (:func:`_gapfill_kernel`) does everything in a single pass over the cube, in parallel
over row segments of :data:`SEGMENT` pixels. Per segment the mask alone gives, once, the days of the
last / next clear date (forward and backward fills) and from them each output date's interpolation
numerator and denominator; then band by band (so only one band's T input and T' output rows are
streamed at a time, ~70 memory streams instead of ~700): a contiguous copy of the band's rows, a
forward and a backward fill of its values (branch-free selects, in cache), and for each output date
one SIMD loop that interpolates in float32 and writes int16, streamed out with non-temporal stores
while the next band's rows are prefetched. Compiled code is cached on disk (``cache=True``; first call
in a fresh environment compiles for a few seconds, later processes load it in well under a second).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.tilestore import add_array, create_store, dates_of, for_each_window, open_store, store_grid
from pipeline.parallel import numba_region, window_executor
from pipeline.stats import HistogramTally, window_histogram

log = logging.getLogger(__name__)

NODATA = -10000
"""Reflectance no-data value, in and out."""

SEGMENT = 512
"""Pixels processed together by the kernel (part of a row, or of several rows when they are contiguous
in memory): the segment's scratch (mask rows, day fills, one band's rows and value fills, interpolation
weights: 15 B x T + 8 B x T' per pixel, ~400 KB for 33 -> 37 dates) stays in L2. 512 measured best of
128..2048 (smaller segments pay per-segment overhead, larger ones gain nothing)."""

_NO_DAY = np.float32(-(2.0**30))  # day of the "last clear date" before the first clear date
_AHEAD = 4  # input rows prefetched ahead of the one being copied
_MAX_DAYS = 32000  # day offsets stay exact and far from _NO_DAY
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _jit(**opts):
    """``numba.njit`` with an on-disk cache when one can be written, without it otherwise."""

    def deco(fn):
        try:
            return njit(cache=True, **opts)(fn)
        except RuntimeError as exc:  # no writable cache location (read-only install, no $HOME)
            log.warning("numba cache unavailable for %s (%s): compiling on every run", fn.__name__, exc)
            return njit(cache=False, **opts)(fn)

    return deco


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Software prefetch (read, keep in all cache levels) of ``arr[idx]`` (1-D array); no effect on
    results. The hardware prefetchers do not follow the many short runs a segment reads."""
    sig = types.void(arr, types.uint64)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p] + [ir.IntType(32)] * 3), "llvm.prefetch.p0"
        )
        i32 = ir.IntType(32)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _address(typingctx, arr):
    """Address of ``arr``'s first element."""

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, ir.IntType(64))

    return types.uint64(arr), codegen


@intrinsic
def _stream32(typingctx, dst, doff, src, soff):
    """``dst[doff:doff + 32] = src[soff:soff + 32]`` (1-D int16) as one non-temporal 64-byte store
    (``dst + doff`` must be 64-byte aligned): the output goes to memory without being read first."""
    sig = types.void(dst, types.uint64, src, types.uint64)

    def codegen(context, builder, signature, args):
        d = context.make_array(signature.args[0])(context, builder, args[0])
        sa = context.make_array(signature.args[2])(context, builder, args[2])
        vp = ir.VectorType(ir.IntType(16), 32).as_pointer()
        val = builder.load(builder.bitcast(builder.gep(sa.data, [args[3]]), vp), align=2)
        st = builder.store(val, builder.bitcast(builder.gep(d.data, [args[1]]), vp), align=64)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _sfence(typingctx):
    """Orders this thread's non-temporal stores before whatever follows (the end of the parallel loop)."""

    def codegen(context, builder, signature, args):
        if _X86:
            fnty = ir.FunctionType(ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.sfence"), [])
        else:  # elsewhere the non-temporal hint is only a hint: a full fence is enough
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@_jit(nogil=True, inline="always")
def _store_row(of, off, row, n):  # pragma: no cover - jitted
    """``of[off:off + n] = row[:n]``: non-temporal 64-byte stores where aligned, plain ones at the ends."""
    line = np.uint64(64)
    head = min((line - (_address(of) + off * np.uint64(2)) % line) % line // np.uint64(2), n)
    for i in range(head):
        of[off + i] = row[i]
    i = head
    while i + np.uint64(32) <= n:
        _stream32(of, off + i, row, i)
        i += np.uint64(32)
    while i < n:
        of[off + i] = row[i]
        i += np.uint64(1)


# error_model="numpy": no ZeroDivisionError check per division (den >= 1 anyway), so the loop vectorises
@_jit(parallel=True, nogil=True, error_model="numpy")
def _gapfill_kernel(
    v, vst, m, mst, days, dst_days, k_prev, k_next, out, seg, groups, work
):  # pragma: no cover - jitted
    """``v`` (T, C, R, W) int16, ``m`` (T, R, W) bool -> ``out`` (T', C, R, W) int16 (C-contiguous).

    ``v`` and ``m`` come flat with their element strides ``vst`` (3 ints: T, C, R; W is 1) and
    ``mst`` (2 ints: T, R), so windows cut from a bigger cube need no copy and the inner loops still
    see unit strides (numba's generic strided arrays do not vectorise).

    ``days`` (T,) / ``dst_days`` (T',) float32 day offsets; ``k_prev`` / ``k_next`` (T',) the last
    source index on or before / first on or after each output date (-1 / T when none). Work is split
    into ``groups`` contiguous runs of row segments of ``seg`` px, each with its own scratch.

    Per segment, first from the mask alone: ``fd`` forward fill of days (day of the last clear date at
    or before each source date, ``_NO_DAY`` before the first), ``bd`` backward fill carrying on from
    the forward fill's last row (so after the last clear date it repeats it). For an output date ``d``
    between source dates ``kp`` <= ``kn``: ``p = fd[kp]``, ``q = bd[kn]``; with a clear date before
    and ``q > p``: ``num = q - d``, ``den = q - p``, otherwise (no clear date before, or an exact hit /
    nothing after, where ``q == p``) ``num = 0``, ``den = 1``. Then band by band (so a band's T input
    and T' output planes are the only streams, not all T x C + T' x C): ``vb`` a contiguous copy of the
    band's T input rows, ``fv`` forward fill of values (NODATA before the first clear date) made from
    it, ``bv`` backward fill carrying on from it, and ``vn - (vn - vp) * num / den`` in float32
    with ``vp = fv[kp]``, ``vn = bv[kn]``, made in ``ob`` and written with non-temporal stores
    (:func:`_store_row`) while the next band's (or segment's) rows are prefetched.
    """
    tn, c, rows, cols = out.shape
    t = days.shape[0]
    s0, s1, s2 = vst
    m0, m1 = mst
    nseg = (cols + seg - 1) // seg
    total = rows * nseg
    per = (total + groups - 1) // groups
    nodata = np.int16(NODATA)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    of = out.reshape(-1)
    for g in prange(groups):
        vb, fv, bv, mb = work[0][g], work[1][g], work[2][g], work[3][g]  # per-run scratch (_workspace)
        fd, bd, num, den, cd, cv = work[4][g], work[5][g], work[6][g], work[7][g], work[8][g], work[9][g]
        ob = work[10][g]
        for k in range(g * per, min(total, (g + 1) * per)):
            r = k // nseg
            c0 = (k - r * nseg) * seg
            n = min(seg, cols - c0)
            # unsigned offsets: no negative-index wraparound in the inner loops, so they vectorise
            c0 = np.uint64(c0)
            n = np.uint64(n)
            # days, from the mask alone (its rows first copied next to each other into mb): forward
            # fill, then backward fill carrying on from the forward fill's last row
            for i in range(n):
                cd[i] = _NO_DAY
            # (copies in loops of their own: a loop touching more arrays needs too many run-time overlap
            # checks and LLVM leaves it scalar; every load unconditional, selects only)
            for s in range(t):
                if s + _AHEAD < t:
                    mo = np.uint64((s + _AHEAD) * m0 + r * m1) + c0
                    for i in range(0, n, 64):
                        _prefetch(m, mo + i)
                mo = np.uint64(s * m0 + r * m1) + c0
                for i in range(n):
                    mb[s, i] = m[mo + i]
            for s in range(t):
                ds = days[s]
                for i in range(n):
                    x = cd[i]
                    y = ds if mb[s, i] else x
                    cd[i] = y
                    fd[s, i] = y
            for s in range(t - 1, -1, -1):
                ds = days[s]
                for i in range(n):
                    x = cd[i]
                    y = ds if mb[s, i] else x
                    cd[i] = y
                    bd[s, i] = y
            for j in range(tn):
                kp = k_prev[j]
                kn = k_next[j]
                if kp < 0 or kn >= t:
                    continue
                d = dst_days[j]
                for i in range(n):
                    p = fd[kp, i]
                    q = bd[kn, i]
                    gap = q - p
                    use = (p != _NO_DAY) & (gap > zero)
                    num[j, i] = (q - d) if use else zero
                    den[j, i] = gap if use else one
            for b in range(c):
                # this band's rows copied next to each other into vb (_AHEAD rows prefetched ahead),
                # then forward and backward fill of its values
                for i in range(n):
                    cv[i] = nodata
                for s in range(t):
                    if s + _AHEAD < t:
                        vo = np.uint64((s + _AHEAD) * s0 + b * s1 + r * s2) + c0
                        for i in range(0, n, 32):
                            _prefetch(v, vo + i)
                    vo = np.uint64(s * s0 + b * s1 + r * s2) + c0
                    for i in range(n):
                        vb[s, i] = v[vo + i]
                for s in range(t):
                    for i in range(n):
                        x = vb[s, i]
                        y = cv[i]
                        z = x if mb[s, i] else y
                        cv[i] = z
                        fv[s, i] = z
                for s in range(t - 1, -1, -1):
                    for i in range(n):
                        x = vb[s, i]
                        y = cv[i]
                        z = x if mb[s, i] else y
                        cv[i] = z
                        bv[s, i] = z
                # prefetch the first _AHEAD rows of what comes next (this segment's next band, else the
                # next segment's mask and band 0) while this band's outputs are computed; the copies
                # then keep _AHEAD rows in flight (more would evict each other: rows of one band lie in
                # the same cache sets)
                if b + 1 < c:
                    for s in range(min(t, _AHEAD)):
                        vo = np.uint64(s * s0 + (b + 1) * s1 + r * s2) + c0
                        for i in range(0, n, 32):
                            _prefetch(v, vo + i)
                elif k + 1 < min(total, (g + 1) * per):
                    r2 = (k + 1) // nseg
                    c2 = np.uint64((k + 1 - r2 * nseg) * seg)
                    n2 = np.uint64(min(seg, cols - c2))
                    for s in range(min(t, _AHEAD)):
                        mo = np.uint64(s * m0 + r2 * m1) + c2
                        for i in range(0, n2, 64):
                            _prefetch(m, mo + i)
                        vo = np.uint64(s * s0 + r2 * s2) + c2
                        for i in range(0, n2, 32):
                            _prefetch(v, vo + i)
                # each output row is made in ob (L1) and streamed out with non-temporal stores
                for j in range(tn):
                    kp = k_prev[j]
                    kn = k_next[j]
                    if kp < 0:  # before the acquisitions: first clear value, no arithmetic
                        for i in range(n):
                            ob[i] = bv[0, i]
                    elif kn >= t:  # after them: last clear value
                        for i in range(n):
                            ob[i] = fv[t - 1, i]
                    else:
                        for i in range(n):
                            vn = np.float32(bv[kn, i])
                            a = (vn - np.float32(fv[kp, i])) * num[j, i]
                            ob[i] = np.int16(np.rint(vn - a / den[j, i]))
                    _store_row(of, np.uint64(((j * c + b) * rows + r) * cols) + c0, ob, n)
        _sfence()


def _check_dates(dates: np.ndarray, what: str) -> np.ndarray:
    dates = np.asarray(dates)
    if dates.ndim != 1 or not np.issubdtype(dates.dtype, np.datetime64):
        raise ValueError(f"{what} must be a 1-D datetime64 array, got {dates.dtype} with shape {dates.shape}")
    dates = dates.astype("datetime64[D]")
    if np.isnat(dates).any():
        raise ValueError(f"{what} contains NaT")
    return dates


_WORK: list = []  # the last scratch tuple, reused by the next call of the same shape (under the lock)


def _workspace(groups: int, t: int, tn: int, seg: int) -> tuple[np.ndarray, ...]:
    """Kernel scratch, per run: band rows and value fills, mask rows, day fills, interpolation
    numerators / denominators and carries. Kept between calls because fresh pages cost as much as the
    work; only touched inside ``numba_region``."""
    key = (groups, t, tn, seg)
    if not _WORK or _WORK[0][0] != key:
        i16 = [np.empty((groups, t, seg), np.int16) for _ in range(3)]
        mask = [np.empty((groups, t, seg), np.bool_)]
        f32 = [np.empty((groups, t, seg), np.float32) for _ in range(2)]
        f32 += [np.empty((groups, max(tn, 1), seg), np.float32) for _ in range(2)]
        carry = [np.empty((groups, seg), np.float32), np.empty((groups, seg), np.int16)]
        carry.append(np.empty((groups, seg), np.int16))  # one output row
        _WORK[:] = [(key, tuple(i16 + mask + f32 + carry))]
    return _WORK[0][1]


def _flat(a: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """``a`` as a flat array from its first element plus its strides in elements, without a copy
    when the last axis is contiguous and no stride is negative (a window cut from a bigger cube)."""
    item = a.itemsize
    if a.strides[-1] == item and all(st >= 0 and st % item == 0 for st in a.strides):
        span = 1 + sum((n - 1) * st // item for n, st in zip(a.shape, a.strides, strict=True))
        return np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(item,)), tuple(
            st // item for st in a.strides
        )
    a = np.ascontiguousarray(a)
    return a.reshape(-1), tuple(st // item for st in a.strides)


def gapfill(
    values: np.ndarray,
    valid: np.ndarray,
    src_dates: np.ndarray,
    dst_dates: np.ndarray,
    block: int = SEGMENT,
    out: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Gapfill ``values`` (T, C, *spatial) int16 onto ``dst_dates``; returns (T', C, *spatial) int16.

    ``valid`` (T, *spatial) bool marks clear observations; the values of the others are never read
    into the result, whatever they hold. ``src_dates`` must be strictly increasing (a duplicate date
    would make the interpolation ambiguous); ``dst_dates`` may be any dates. ``out`` (T', C,
    *spatial) int16 C-contiguous may be passed to reuse a buffer (fresh pages cost as much as the work).
    ``block``: pixels per kernel row segment (any value >= 1 gives the same result). ``threads``:
    numba threads for this call (default: all). Calls from several Python threads are serialised (each
    call is itself parallel), so callers need no thread pool of their own for the arithmetic.
    """
    src = _check_dates(src_dates, "src_dates")
    dst = _check_dates(dst_dates, "dst_dates")
    values = np.asarray(values)
    valid = np.asarray(valid)
    if values.dtype != np.int16:
        raise ValueError(f"values must be int16, got {values.dtype}")
    if values.ndim < 2:
        raise ValueError(f"values must be (T, C, ...), got shape {values.shape}")
    if valid.dtype != np.bool_:
        raise ValueError(f"valid must be bool, got {valid.dtype}")
    t, c = values.shape[:2]
    spatial = values.shape[2:]
    if valid.shape != (t, *spatial):
        raise ValueError(f"valid shape {valid.shape} does not match values shape {values.shape}")
    if src.shape[0] != t:
        raise ValueError(f"{src.shape[0]} src_dates for {t} observations")
    if t > 1 and not (np.diff(src.astype(np.int64)) > 0).all():
        raise ValueError("src_dates must be strictly increasing (sorted, no duplicates)")
    if block < 1:
        raise ValueError("block must be >= 1")

    shape = (dst.shape[0], c, *spatial)
    if out is None:
        out = np.empty(shape, dtype=np.int16)
    elif out.shape != shape or out.dtype != np.int16 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous int16 array of shape {shape}")
    if t == 0:
        out.fill(NODATA)
        return out
    if out.size == 0:
        return out
    # spatial axes as (rows, cols): a view for 2-D windows, even strided ones cut from a bigger cube
    rows, cols = (int(np.prod(spatial[:-1], dtype=np.int64)), spatial[-1]) if spatial else (1, 1)
    span = np.abs(np.concatenate([(src - src[0]), (dst - src[0])]).astype(np.int64))
    if span.max(initial=0) > _MAX_DAYS:
        raise ValueError(f"dates span more than {_MAX_DAYS} days")
    v, vst = _flat(values.reshape(t, c, rows, cols))
    m, mst = _flat(valid.reshape(t, rows, cols))
    if vst[2] == cols and mst[1] == cols:  # rows follow each other: segments may run across rows
        rows, cols = 1, rows * cols
    o = out.reshape(dst.shape[0], c, rows, cols)
    days = (src - src[0]).astype(np.float32)
    dst_days = (dst - src[0]).astype(np.float32)
    # per output date: last source index on or before it, first source index on or after it
    k_prev = (np.searchsorted(days, dst_days, side="right") - 1).astype(np.int64)
    k_next = np.searchsorted(days, dst_days, side="left").astype(np.int64)
    seg = min(cols, block)
    nseg = rows * -(-cols // seg)
    with numba_region(threads) as n:
        groups = min(nseg, 4 * n)  # a few runs per thread: some balance, scratch allocated once per run
        work = _workspace(groups, t, dst.shape[0], seg)
        _gapfill_kernel(v, vst[:3], m, mst[:2], days, dst_days, k_prev, k_next, o, seg, groups, work)
    return out


def clear_count(valid: np.ndarray) -> np.ndarray:
    """Number of clear observations per pixel, (T, *spatial) bool -> (*spatial) uint16.

    Users read it as the map's confidence layer; 0 marks pixels that are no-data after gapfilling.
    """
    valid = np.asarray(valid)
    if valid.shape[0] > np.iinfo(np.uint16).max:
        raise ValueError("more than 65535 dates")
    return np.count_nonzero(valid, axis=0).astype(np.uint16)


# Acquisitions may lie this far outside the date grid (they interpolate its first and last dates,
# and a growing-season grid may be fed a whole year's products); beyond it a date is a mistake:
# another year's product in the folder, or a damaged metadata date.
PERIOD_MARGIN_DAYS = 183


def _check_period(src: Path, group: Any, src_dates: np.ndarray, dst_dates: np.ndarray) -> None:
    margin = np.timedelta64(PERIOD_MARGIN_DAYS, "D")
    outside = (src_dates < dst_dates[0] - margin) | (src_dates > dst_dates[-1] + margin)
    if outside.any():
        i = int(np.argmax(outside))
        names = list(group.attrs.get("product_dirs") or group.attrs.get("products") or [])
        product = f" (product {names[i]})" if i < len(names) else ""
        raise PipelineError(
            src,
            f"acquisition {src_dates[i]}{product} lies outside the run's period: date grid "
            f"{dst_dates[0]}..{dst_dates[-1]} +- {PERIOD_MARGIN_DAYS} days; remove it from the tile's "
            "products folder, or move the date grid",
        )


def gapfill_tile(
    src: Path,
    dst: Path,
    date_grid: np.ndarray,
    threads: int = 1,
    dask: Mapping[str, Any] | None = None,
    histogram: Path | None = None,
) -> None:
    """Gapfill one ingest store onto ``date_grid`` and write the 'gapfilled' store at ``dst``.

    Streams 512 px shard windows through a pool of ``threads`` workers, so memory stays at a few
    windows whatever the tile size: while one worker runs the (serialised, ``threads``-way parallel)
    numba kernel, the others decode / encode their windows (the codec releases the GIL). The output
    appears only when complete. An observation counts as clear when ``valid == 1`` and none of its
    bands holds the no-data value.

    ``histogram``: also write the cube's exact per-channel histograms there (the file
    :func:`pipeline.stats.tile_histogram` would make from the finished store), counted on each
    window while it is in memory, so that no stage reads the cube again for the percentiles. Written
    before the store is renamed into place: a store never appears without its histogram.
    """
    src, dst = Path(src), Path(dst)
    group = open_store(src, "ingest", ("reflectance", "valid"))
    refl, valid = group["reflectance"], group["valid"]
    grid = store_grid(group)
    src_dates = dates_of(group)
    try:
        dst_dates = _check_dates(date_grid, "date_grid")
    except ValueError as exc:
        raise PipelineError(None, f"date grid: {exc}") from exc
    t, c, h, w = refl.shape
    if valid.shape != (t, h, w) or len(src_dates) != t or (grid.height, grid.width) != (h, w):
        raise PipelineError(
            src, f"inconsistent store: reflectance {refl.shape}, valid {valid.shape}, {len(src_dates)} dates"
        )
    if t > 1 and not (np.diff(src_dates.astype(np.int64)) > 0).all():
        raise PipelineError(src, "acquisition dates are not strictly increasing")
    if t and dst_dates.size:
        _check_period(src, group, src_dates, dst_dates)
    if t == 0:
        log.warning("%s: no acquisitions: every pixel will be no-data", src)
    elif dst_dates.size and (dst_dates[0] < src_dates[0] or dst_dates[-1] > src_dates[-1]):
        log.warning(
            "%s: date grid %s..%s extends beyond the acquisitions %s..%s: edge dates repeat the nearest "
            "clear observation (constant extrapolation)",
            src, dst_dates[0], dst_dates[-1], src_dates[0], src_dates[-1],
        )  # fmt: skip
    bands = list(group.attrs.get("bands", []))
    if len(bands) != c:
        raise PipelineError(src, f"{len(bands)} band names for {c} bands")

    with atomic_path(dst) as tmp:
        out = create_store(
            tmp,
            "gapfilled",
            grid,
            tile=group.attrs.get("tile"),
            bands=bands,
            dates=[str(d) for d in dst_dates],
            source_dates=[str(d) for d in src_dates],
            products=group.attrs.get("products", []),
            format=group.attrs.get("format"),
            gapfill={"method": "linear", "extrapolation": "nearest", "nodata": NODATA},
        )
        o_refl = add_array(out, "reflectance", (len(dst_dates), c, h, w), np.int16, NODATA)
        o_count = add_array(out, "clear_count", (h, w), np.uint16, 0)

        tally = None
        if histogram is not None:
            tile = str(group.attrs.get("tile") or Path(dst).stem)
            tally = HistogramTally([str(d) for d in dst_dates], [str(b) for b in bands], tile)
        k = len(dst_dates) * c
        counting = histogram is not None  # not the tally: `one` may be shipped to a dask worker

        def one(win) -> tuple[int, Any]:
            rs = slice(win.row_off, win.row_off + win.height)
            cs = slice(win.col_off, win.col_off + win.width)
            vals = np.asarray(refl[:, :, rs, cs])
            clear = np.asarray(valid[:, rs, cs]) == 1
            clear &= (vals != NODATA).all(axis=1)
            filled = gapfill(vals, clear, src_dates, dst_dates, threads=threads)
            o_refl[:, :, rs, cs] = filled
            count = clear_count(clear)
            o_count[rs, cs] = count
            n = int(np.count_nonzero(count))
            # no mask needed: a pixel without a clear observation is NODATA on every channel
            part = window_histogram(filled.reshape(k, -1), None, n, threads) if counting and n else None
            return n, part

        observed = [0]

        def add(result: tuple[int, Any]) -> None:
            observed[0] += result[0]
            if tally is not None:
                tally.add(result[1])

        with window_executor(dask, threads) as pool:
            for_each_window(one, h, w, threads, f"gapfill {src.stem}", executor=pool, on_result=add)
        if tally is not None:
            assert histogram is not None
            tally.write(histogram)
    if t and observed[0] == 0:
        log.warning(
            "%s: no clear observation on any of the %d dates (all cloudy or no-data): every pixel of "
            "tile %s is no-data, and so will be its maps",
            src, t, group.attrs.get("tile", src.stem),
        )  # fmt: skip
    elif observed[0] < h * w:
        log.info("%s: %.1f %% of the pixels have no clear observation (no-data in the maps)", src,
                 100 * (1 - observed[0] / (h * w)))  # fmt: skip
