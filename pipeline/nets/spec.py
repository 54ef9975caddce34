"""A network's shape as plain data, without torch: what the config check, the registry and the
weights file need to know about an architecture (pooling factor, receptive radius) before, or
without, building it. :mod:`pipeline.nets.arch` builds the modules from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.models import NETWORKS as ARCHS  # one list of names: the registry's

KERNEL = 3  # spatial kernel of the U-Net convolutions (the 1x1 path uses 1)


@dataclass(frozen=True)
class _Layout:
    """What an architecture is made of; the single table :func:`build` reads."""

    unet: bool  # 3x3 U-Net part in the per-group extractor
    pixel: bool  # 1x1 pixel-wise path in the per-group extractor
    recurrent: bool  # every convolution is a ConvLSTM over the group sequence
    fusion: str  # "concat" | "lstm" | "last"


_LAYOUTS: dict[str, _Layout] = {
    "fgunet": _Layout(unet=True, pixel=True, recurrent=False, fusion="concat"),
    "unet3": _Layout(unet=True, pixel=False, recurrent=False, fusion="concat"),
    "mlp3": _Layout(unet=False, pixel=True, recurrent=False, fusion="concat"),
    "lstm3": _Layout(unet=False, pixel=True, recurrent=False, fusion="lstm"),
    "tsfgunet": _Layout(unet=True, pixel=True, recurrent=True, fusion="last"),
}
assert tuple(_LAYOUTS) == ARCHS
# Derived from the table, so a new architecture gets the settings that fit its layout for free:
# a last layer that is one 1x1 conv over the G groups' features side by side, the penultimate
# map (what ``nets.head_refit`` refits; tsfgunet's 1x1 conv reads only its last step),
# and a U-Net branch beside a 1x1 path into that layer (what ``nets.unet_aux_loss`` supervises).
LINEAR_HEADS = tuple(a for a, lay in _LAYOUTS.items() if lay.fusion == "concat")
BRANCHED = tuple(a for a, lay in _LAYOUTS.items() if lay.unet and lay.pixel and lay.fusion == "concat")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"NetSpec.{name} must be a positive integer, got {value!r}")


def _filters(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"NetSpec.{name} must be a list of positive integers, got {value!r}")
    out = tuple(value)
    if not out:
        raise ValueError(f"NetSpec.{name} must not be empty")
    for i, v in enumerate(out):
        _positive_int(f"{name}[{i}]", v)
    return out


@dataclass(frozen=True)
class NetSpec:
    """Everything needed to rebuild a network (stored next to its weights as JSON).

    ``in_channels`` is the per-group channel count Cg (not G*Cg), so one spec describes both the
    input layout and the shared sub-network. Validated on construction: a spec that exists builds.
    """

    arch: str
    in_channels: int
    groups: int
    n_classes: int
    unet_filters: tuple[int, ...] = (32, 64, 128)  # one entry per U-Net level (3 levels -> 2 poolings)
    mlp_filters: tuple[int, ...] = (200, 100, 50)  # the 1x1 pixel-wise path
    dropout: float = 0.2
    lstm_hidden: int = 128

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"NetSpec.arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        for name in ("in_channels", "groups", "n_classes", "lstm_hidden"):
            _positive_int(name, getattr(self, name))
        # lists (from JSON) become tuples so the spec stays hashable and compares equal
        object.__setattr__(self, "unet_filters", _filters("unet_filters", self.unet_filters))
        object.__setattr__(self, "mlp_filters", _filters("mlp_filters", self.mlp_filters))
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"NetSpec.dropout must be a number in [0, 1), got {d!r}")
        object.__setattr__(self, "dropout", float(d))

    @property
    def pool_factor(self) -> int:
        """Input height and width must be multiples of this (2 per U-Net pooling; 1 without a U-Net)."""
        return 2 ** (len(self.unet_filters) - 1) if _LAYOUTS[self.arch].unet else 1

    def pool_aligned(self, px: int) -> int:
        """``px`` rounded up to a multiple of the pooling factor: a margin that keeps window origins
        on the pooling grid, so aligned windows compute what a whole-image pass computes."""
        return -(-int(px) // self.pool_factor) * self.pool_factor

    @property
    def receptive_radius(self) -> int:
        """Output pixels depend only on input pixels within this Chebyshev radius (pool-aligned
        windows): 0 without a U-Net (1x1 path, per-pixel LSTM), else :func:`unet_receptive_radius`.
        Sizes the inference margin, so it is a bound, and tested to be attained."""
        lay = _LAYOUTS[self.arch]
        if not lay.unet:
            return 0
        return unet_receptive_radius(len(self.unet_filters), self.groups if lay.recurrent else 1)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NetSpec:
        """Inverse of :meth:`to_json`; unknown or missing keys and bad values raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"a NetSpec is a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown NetSpec key(s): {', '.join(unknown)}")
        missing = [n for n in ("arch", "in_channels", "groups", "n_classes") if n not in d]
        if missing:
            raise ValueError(f"NetSpec is missing required key(s): {', '.join(missing)}")
        return cls(**d)


def unet_receptive_radius(levels: int, steps: int = 1, kernel: int = KERNEL) -> int:
    """Chebyshev radius of the U-Net's dependence on its input, for pool-aligned windows.

    Count per layer in input pixels, at level l (one feature cell = 2**l px): a k x k conv adds
    (k//2) * 2**l; a 2x2 max-pool adds nothing beyond the cell it pools into; 2x nearest upsampling
    to level l makes output cell i read coarse cell i//2, which reaches 2**l px past cell i on one
    side (which side depends on the parity of i, so both sides are reached by some pixel). Hence
    encoder sum_l 2 k' 2**l, decoder sum_{l<L-1} (2**l + 2 k' 2**l): 23 px for 3 levels, 3x3 convs
    (a 47 px wide field; the paper quotes "23 pixels"). The bound is attained: along one axis,
    pixels at 1 (mod 4) reach 23 px to the left, 2 (mod 4) 23 px to the right, the others 22.

    A 3x3 ConvLSTM also convolves its previous hidden state, so each step can move a dependency one
    more cell; the farthest route spends all ``steps - 1`` moves at the coarsest level:
    + (steps - 1) k' 2**(L-1).
    """
    kr = kernel // 2
    enc = sum(2 * kr * 2**lv for lv in range(levels))
    dec = sum(2**lv + 2 * kr * 2**lv for lv in range(levels - 1))
    return enc + dec + (steps - 1) * kr * 2 ** (levels - 1)
