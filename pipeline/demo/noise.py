"""Counter-based randomness: every random number of the demo country is a hash of integer keys.

Why hashes and not a seeded ``numpy.random.Generator``: the country must be renderable window by
window, tile by tile, in any order, and give the same value for the same ground pixel and date
every time (the overlap strip of two neighbouring tiles must be identical, and a full 10980 px
tile must be renderable in bounded memory). A stateful generator would make each value depend on
what was drawn before; a hash of (seed, world pixel, date, purpose) does not.

Noise fields are *separable* in their inputs: callers pass the 1-D world column indices ``gx`` and
row indices ``gy`` of an axis-aligned window and get an ``(len(gy), len(gx))`` field, so the
lattice work is done on the small coarse lattice only.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)


def _u64(k) -> np.ndarray:
    """Any integer (array, negative allowed) as uint64 bits, always an ndarray."""
    a = np.asarray(k)
    if a.dtype == np.uint64:
        return a
    return np.asarray(a, dtype=np.int64).view(np.uint64)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-avalanching scramble of 64-bit words."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _S30)
        x = x * _M1
        x = x ^ (x >> _S27)
        x = x * _M2
        return x ^ (x >> _S31)


def hash_keys(*keys) -> np.ndarray:
    """Hash integer keys (broadcast together) into uint64 words."""
    h = np.zeros((), dtype=np.uint64) + _GOLDEN
    with np.errstate(over="ignore"):
        for k in keys:
            h = mix(h ^ (_u64(k) + _GOLDEN))
    return np.asarray(h)


def uniform(*keys) -> np.ndarray:
    """Uniform floats in [0, 1) from integer keys (53 bits of a hash)."""
    return (hash_keys(*keys) >> _S11).astype(np.float64) * (1.0 / 9007199254740992.0)


def name_key(name: str) -> int:
    """A stable integer for a string (tile names, purposes); Python's ``hash`` is salted per process."""
    h = 1469598103934665603
    for b in name.encode():
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h - (1 << 64) if h >= (1 << 63) else h


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def value_noise(gy: np.ndarray, gx: np.ndarray, scale: float, *keys) -> np.ndarray:
    """Smooth value noise in [0, 1) with lattice spacing ``scale`` px, on the grid ``gy x gx``.

    ``gy``, ``gx`` are 1-D world pixel coordinates (floats allowed). Lattice values are hashed
    from the lattice indices, so the field is the same whichever window asks for it.
    """
    fy = np.asarray(gy, dtype=np.float64) / scale
    fx = np.asarray(gx, dtype=np.float64) / scale
    iy = np.floor(fy).astype(np.int64)
    ix = np.floor(fx).astype(np.int64)
    ty = _smooth(fy - iy).astype(np.float32)
    tx = _smooth(fx - ix).astype(np.float32)
    y0, x0 = iy.min(), ix.min()
    ly = np.arange(y0, iy.max() + 2)
    lx = np.arange(x0, ix.max() + 2)
    lat = uniform(*keys, ly[:, None], lx[None, :]).astype(np.float32)
    ry = iy - y0
    rx = ix - x0
    rows = lat[ry] * (1 - ty)[:, None] + lat[ry + 1] * ty[:, None]
    return rows[:, rx] * (1 - tx)[None, :] + rows[:, rx + 1] * tx[None, :]


def fbm(gy: np.ndarray, gx: np.ndarray, scale: float, octaves: int, *keys, gain: float = 0.5) -> np.ndarray:
    """Fractal sum of value-noise octaves (scale halves, amplitude x ``gain``), normalised to ~[0, 1)."""
    total = None
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        n = value_noise(gy, gx, scale / (2**o), *keys, o)
        total = n * amp if total is None else total + n * amp
        norm += amp
        amp *= gain
    return total / norm


def value_noise_1d(t: np.ndarray, scale: float, *keys) -> np.ndarray:
    """Smooth 1-D value noise in [0, 1) (coast lines, river courses)."""
    f = np.asarray(t, dtype=np.float64) / scale
    i = np.floor(f).astype(np.int64)
    s = _smooth(f - i)
    return uniform(*keys, i) * (1 - s) + uniform(*keys, i + 1) * s


def sig(x):
    """Logistic function, the building block of the phenology curves."""
    return 1.0 / (1.0 + np.exp(-x))
