"""The seed's network family (Stoian et al. 2019, §3.2 and the §4.2 baselines), built from one typed spec.

Every architecture is the same three pieces, so one builder (:func:`build`) serves them all:

1. a per-group feature extractor whose weights are shared by the G temporal groups (the paper's
   "network duplicated G times with parameter sharing"): a 3-level U-Net, a pixel-wise 1x1 path, or
   both side by side, made of plain conv+ReLU units or, for ``tsfgunet``, of ConvLSTM units that
   run over the group sequence;
2. a fusion head: concatenation + one linear 1x1 classifier (``fgunet``, ``unet3``, ``mlp3``), an
   LSTM over the per-pixel group sequence (``lstm3``), or the last step of the ConvLSTMs (``tsfgunet``);
3. :class:`Net`, which folds the groups into the batch for training (:meth:`Net.forward`) or streams
   them one at a time so only one group's activations are alive (:meth:`Net.forward_lowmem`, used for
   inference on large windows). Both compute the same function.

Input convention: ``x`` is (B, G*Cg, H, W) float32 with date-major channels, i.e. temporal group g is
the channel slice ``[g*Cg:(g+1)*Cg]``; the output is logits (B, K, H, W), no softmax.

Parameter counts with the paper's sizes (Cg=30, G=11, K=17, default filters), cf. Table 2:
fgunet 525,997, unet3 485,297 and mlp3 40,717 match exactly; lstm3 gives 125,703 (paper 324,024,
not reproducible from its description) and tsfgunet 4,170,923 = 3,834,112 (ConvLSTM U-Net) +
335,400 (1x1 ConvLSTM path) + 1,411 (classifier, 83*17); the paper's 4,137,272 is 33,651 fewer and
its layer sizes are not given. Formulas in :class:`_LSTMHead` and :class:`ConvLSTM2d`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.nets import capability
from pipeline.nets.spec import _LAYOUTS, ARCHS, KERNEL, NetSpec, unet_receptive_radius

__all__ = [
    "ARCHS",
    "KERNEL",
    "WEIGHT_INITS",
    "BranchSupervised",
    "Net",
    "NetSpec",
    "build",
    "count_parameters",
    "initialise",
    "unet_receptive_radius",
]

# ---------------------------------------------------------------------------------------------------
# units: the thing every "convolution" of the paper's diagrams is


Unit = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, kernel) -> module


def _conv_relu(in_ch: int, out_ch: int, k: int) -> nn.Module:
    """Zero-padded conv + ReLU: 'same' output size, so the whole window is kept (§3.2.1)."""
    return _ConvReLU(nn.Conv2d(in_ch, out_ch, k, padding=k // 2), nn.ReLU(inplace=True))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a layer computes ``x`` in: autocast's where it is on for ``x``'s device."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _ConvReLU(nn.Sequential):
    """Conv2d then ReLU (an ``nn.Sequential``, so weights keep their names). Without autograd on
    CPU both run as one oneDNN primitive where :func:`capability.fused_conv_relu` found it working
    for the compute dtype: the ReLU is applied while the output is still in cache instead of in a
    second pass over it; identical values (tested); FG-UNET ``classify_window`` 4-9 % faster in
    fp32 (AVX2, AVX-512), 0.5-6 % in bf16 (docs/benchmarks/fgunet.md). Elsewhere (AVX2 CPUs in
    bf16, ``LANDCOVER_FAST_PATHS=0``, autograd, float64, GPU) the two modules run."""

    def forward(self, x: Tensor) -> Tensor:
        conv = self[0]
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x)
        dt = _compute_dtype(x)
        if not capability.fused_conv_relu(dt):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return torch.ops.mkldnn._convolution_pointwise(
                x.to(dt), conv.weight.to(dt), conv.bias.to(dt), list(conv.padding), list(conv.stride),
                list(conv.dilation), conv.groups, "relu", [None], "",
            )  # fmt: skip


class ConvLSTM2d(nn.Module):
    """ConvLSTM layer (Shi et al. 2015) over the G groups, returning the whole hidden sequence.

    Gates come from ONE conv over concat(input, hidden): i, f, o = sigmoid, g = tanh;
    c' = f*c + i*g, h' = o*tanh(c'). Parameters: (C_in + C_h) * k^2 * 4*C_h + 4*C_h, the same count
    as Keras' ConvLSTM2D (separate input and recurrent kernels, one bias).

    The sequence is carried folded into the batch, (B*T, C, H, W) with T = ``steps``, so pooling,
    upsampling, dropout and concatenation around it are applied per step by ordinary layers. In
    streaming mode (see :meth:`Net.forward_lowmem`) each call is ONE step of shape (B, C, H, W) and
    the (h, c) state is carried between calls instead.
    """

    def __init__(self, in_ch: int, hidden: int, k: int, steps: int) -> None:
        super().__init__()
        self.in_ch, self.hidden, self.steps = in_ch, hidden, steps
        self.conv = nn.Conv2d(in_ch + hidden, 4 * hidden, k, padding=k // 2)
        with torch.no_grad():  # forget-gate bias 1 (Keras' unit_forget_bias): remember by default
            self.conv.bias[hidden : 2 * hidden].fill_(1.0)
        self._streaming = False
        self._state: tuple[Tensor, Tensor] | None = None

    def _update(self, gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        i, f, o, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, x: Tensor) -> Tensor:
        return self._step(x) if self._streaming else self._sequence(x)

    def _sequence(self, x: Tensor) -> Tensor:
        # The input half of the gate conv does not depend on the recurrence: one batched conv for
        # all steps, then only the hidden half runs step by step (same maths as _step, faster).
        n, _, hh, ww = x.shape
        b = n // self.steps
        w = self.conv.weight
        pad = w.shape[-1] // 2
        xg = F.conv2d(x, w[:, : self.in_ch], self.conv.bias, padding=pad).reshape(b, self.steps, -1, hh, ww)
        h = x.new_zeros(b, self.hidden, hh, ww)
        c = torch.zeros_like(h)
        out = []
        for t in range(self.steps):
            gates = xg[:, t] if t == 0 else xg[:, t] + F.conv2d(h, w[:, self.in_ch :], padding=pad)
            h, c = self._update(gates, c)
            out.append(h)
        return torch.stack(out, 1).reshape(n, self.hidden, hh, ww)

    def _step(self, x: Tensor) -> Tensor:
        if self._state is None:
            h = x.new_zeros(x.shape[0], self.hidden, *x.shape[2:])
            self._state = (h, torch.zeros_like(h))
        h, c = self._state
        h, c = self._update(self.conv(torch.cat([x, h], 1)), c)
        self._state = (h, c)
        return h

    def stream(self, on: bool) -> None:
        """Enter/leave one-step-per-call mode; both directions drop any carried state."""
        self._streaming, self._state = on, None


def _conv_lstm(steps: int) -> Unit:
    return lambda in_ch, out_ch, k: ConvLSTM2d(in_ch, out_ch, k, steps)


# ---------------------------------------------------------------------------------------------------
# the shared per-group extractor


class _Block(nn.Module):
    """Two 3x3 units with Dropout between them: the only dropout of the network (§3.1)."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, unit: Unit) -> None:
        super().__init__()
        self.conv1 = unit(in_ch, out_ch, KERNEL)
        self.drop = nn.Dropout(dropout)
        self.conv2 = unit(out_ch, out_ch, KERNEL)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.drop(self.conv1(x)))


class UNet(nn.Module):
    """The FG-UNET's U-Net part: one block per level, 2x2 max-pool down, 2x nearest upsampling up.

    Nearest upsampling has no parameters, which is what makes the Table 2 counts come out exactly.
    Output: ``filters[0]`` channels at full resolution.
    """

    def __init__(self, in_ch: int, filters: tuple[int, ...], dropout: float, unit: Unit) -> None:
        super().__init__()
        chans = (in_ch, *filters)
        self.down = nn.ModuleList(_Block(chans[i], f, dropout, unit) for i, f in enumerate(filters))
        # deepest first; input = upsampled level l+1 concatenated with the level-l skip
        self.up = nn.ModuleList(
            _Block(filters[lv + 1] + filters[lv], filters[lv], dropout, unit)
            for lv in reversed(range(len(filters) - 1))
        )
        self.out_channels = filters[0]

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for lv, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if lv else x)
            skips.append(x)
        skips.pop()  # the bottleneck is not a skip
        for block in self.up:
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skips.pop()], 1))
        return x


MLP_CHUNK = 16_384  # pixels per chunk of the inference 1x1 path: its activations stay in L2/L3


class PixelPath(nn.Module):
    """The 1x1 pixel-wise path (200-100-50 filters): sharp class boundaries (§3.2.2).

    Without autograd (inference) a conv+ReLU path runs as a per-pixel MLP over chunks of pixels:
    the same matmuls (identical results, tested), but each chunk's 200- and 100-channel activations
    stay in cache instead of making full-window round trips through memory; 2.6x faster for the
    path on a 544² window in bf16 (docs/benchmarks/fgunet.md). Plain ``addmm`` + ReLU: oneDNN's
    fused matmul+ReLU added < 3 % to the fused convs with AVX-512 and lost 5 % with AVX2: not used.
    """

    def __init__(self, in_ch: int, filters: tuple[int, ...], unit: Unit) -> None:
        super().__init__()
        chans = (in_ch, *filters)
        self.layers = nn.Sequential(*(unit(chans[i], f, 1) for i, f in enumerate(filters)))
        self.out_channels = filters[-1]
        self._convs = [
            m[0] for m in self.layers if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d)
        ]
        self._mlp = len(self._convs) == len(self.layers)  # ConvLSTM units keep the layer path

    def forward(self, x: Tensor) -> Tensor:
        if self._mlp and not torch.is_grad_enabled() and x.ndim == 4:
            return self._chunked(x)
        return self.layers(x)

    def _chunked(self, x: Tensor) -> Tensor:
        kind = x.device.type
        dt = _compute_dtype(x)
        mats = [(c.weight.reshape(c.out_channels, -1).to(dt), c.bias.to(dt)) for c in self._convs]
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view when x is channels-last
        out = torch.empty(rows.shape[0], self.out_channels, dtype=dt, device=x.device)
        with torch.autocast(kind, enabled=False):
            for s in range(0, rows.shape[0], MLP_CHUNK):
                y = rows[s : s + MLP_CHUNK].to(dt)
                for wm, bias in mats:
                    y = torch.addmm(bias, y, wm.t()).relu_()
                out[s : s + MLP_CHUNK] = y
        return out.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # channels-last (B, F, H, W)


class GroupFeatures(nn.Module):
    """The sub-network applied to each temporal group with shared weights: concat(U-Net, 1x1 path)."""

    def __init__(self, unet: UNet | None, pixel: PixelPath | None) -> None:
        super().__init__()
        self.unet, self.pixel = unet, pixel
        self.out_channels = sum(m.out_channels for m in (unet, pixel) if m is not None)

    def forward(self, x: Tensor) -> Tensor:
        return _cat(self.parts(x))

    def parts(self, x: Tensor) -> list[Tensor]:
        """The extractor's outputs before concatenation (the streaming head skips the copy)."""
        return [m(x) for m in (self.unet, self.pixel) if m is not None]


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


# ---------------------------------------------------------------------------------------------------
# fusion heads: forward(f, batch) on folded features, or step/finish one group at a time


class _FusionHead(nn.Module):
    """How the G per-group features become logits, on folded features or streamed group by group."""

    def forward(self, f: Tensor, batch: int) -> Tensor:
        """``f``: (batch*G, F, H, W), groups folded into the batch -> (batch, K, H, W)."""
        raise NotImplementedError

    def step(self, state: Any, parts: list[Tensor], g: int) -> Any:
        """Fold group ``g``'s features (the extractor's parts, (B, F_i, H, W) each, to be read as
        their channel concatenation) into ``state`` (None before the first group)."""
        raise NotImplementedError

    def finish(self, state: Any) -> Tensor:
        raise NotImplementedError


class _ConcatHead(_FusionHead):
    """Concatenate the G group features and classify with one 1x1 conv (late fusion, §3.2.3).

    Linear in the concatenation, so logits = bias + sum_g W_g f_g: streaming accumulates the group
    terms and never holds more than one group's features.
    """

    def __init__(self, feat: int, groups: int, n_classes: int) -> None:
        super().__init__()
        self.feat = feat
        self.classifier = nn.Conv2d(groups * feat, n_classes, 1)

    def forward(self, f: Tensor, batch: int) -> Tensor:
        return self.classifier(f.reshape(batch, -1, *f.shape[-2:]))

    def step(self, state: Tensor | None, parts: list[Tensor], g: int) -> Tensor:
        # W_g f_g split by part: the same sum without copying the parts into one tensor
        start = g * self.feat
        for f in parts:
            y = F.conv2d(f, self.classifier.weight[:, start : start + f.shape[1]])
            state = y if state is None else state.add_(y)
            start += f.shape[1]
        assert state is not None
        return state

    def finish(self, state: Tensor) -> Tensor:
        return state + self.classifier.bias.view(1, -1, 1, 1)


class _LSTMHead(_FusionHead):
    """``lstm3``: an LSTM over each pixel's G group features, last hidden state -> linear to K.

    Parameters of the whole lstm3 net: 1x1 path sum_l (c_{l-1}+1) c_l, plus the LSTM
    4 (F h + h^2 + 2 h) (PyTorch keeps two bias vectors; Keras has one, 4 h fewer), plus (h+1) K,
    with F = mlp_filters[-1], h = lstm_hidden. Paper sizes: 31,350 + 92,160 + 2,193 = 125,703; the
    paper's 324,024 is not reached by any h with this structure.
    """

    def __init__(self, feat: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(feat, hidden, batch_first=True)
        self.classifier = nn.Linear(hidden, n_classes)

    def _logits(self, h: Tensor, b: int, hh: int, ww: int) -> Tensor:
        return self.classifier(h).reshape(b, hh, ww, -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, f: Tensor, batch: int) -> Tensor:
        _, c, hh, ww = f.shape
        seq = f.reshape(batch, -1, c, hh, ww).permute(0, 3, 4, 1, 2).reshape(batch * hh * ww, -1, c)
        _, (h, _) = self.lstm(seq)
        return self._logits(h[-1], batch, hh, ww)

    def step(self, state: Any, parts: list[Tensor], g: int) -> Any:
        f = _cat(parts)
        b, c, hh, ww = f.shape
        _, hc = self.lstm(f.permute(0, 2, 3, 1).reshape(-1, 1, c), None if state is None else state[0])
        return hc, (b, hh, ww)

    def finish(self, state: Any) -> Tensor:
        (h, _), shape = state
        return self._logits(h[-1], *shape)


class _LastStepHead(_FusionHead):
    """``tsfgunet``: the ConvLSTMs have already fused the sequence; classify their last step."""

    def __init__(self, feat: int, groups: int, n_classes: int) -> None:
        super().__init__()
        self.groups = groups
        self.classifier = nn.Conv2d(feat, n_classes, 1)

    def forward(self, f: Tensor, batch: int) -> Tensor:
        return self.classifier(f.reshape(batch, self.groups, *f.shape[1:])[:, -1])

    def step(self, state: Tensor | None, parts: list[Tensor], g: int) -> Tensor:
        return _cat(parts)

    def finish(self, state: Tensor) -> Tensor:
        return self.classifier(state)


# ---------------------------------------------------------------------------------------------------


class Net(nn.Module):
    """A network of the family: shared per-group extractor + fusion head (see the module docstring)."""

    def __init__(self, spec: NetSpec, features: GroupFeatures, head: _FusionHead) -> None:
        super().__init__()
        self.spec = spec
        self.features = features
        self.head = head
        self._layout = _LAYOUTS[spec.arch]
        self.pool_factor = spec.pool_factor

    def _check(self, x: Tensor) -> tuple[int, int, int]:
        s = self.spec
        if x.ndim != 4 or x.shape[1] != s.groups * s.in_channels:
            raise ValueError(
                f"expected input (B, {s.groups * s.in_channels}, H, W) = {s.groups} groups x "
                f"{s.in_channels} channels, got {tuple(x.shape)}"
            )
        b, _, h, w = x.shape
        if h % self.pool_factor or w % self.pool_factor:
            raise ValueError(f"H and W must be multiples of {self.pool_factor} (pad the input), got {h}x{w}")
        return b, h, w

    def forward(self, x: Tensor) -> Tensor:
        """Training path: the G groups are folded into the batch so the extractor runs once."""
        b, h, w = self._check(x)
        f = self.features(x.reshape(b * self.spec.groups, self.spec.in_channels, h, w))
        return self.head(f, b)

    def forward_lowmem(self, x: Tensor) -> Tensor:
        """Same function as :meth:`forward`, one group at a time: ~1/G of the activation memory."""
        self._check(x)
        cg = self.spec.in_channels
        state = None
        with self._streaming():
            for g in range(self.spec.groups):
                state = self.head.step(state, self.features.parts(x[:, g * cg : (g + 1) * cg]), g)
        return self.head.finish(state)

    @property
    def has_penultimate(self) -> bool:
        """Whether the last layer is a linear map of a per-pixel feature map (the concat head)."""
        return isinstance(self.head, _ConcatHead)

    def penultimate(self, x: Tensor) -> Tensor:
        """The activations the last layer reads: the G group features side by side, (B, G*Fo, H, W).

        For the concat head (fgunet, unet3, mlp3) the logits are ``head.classifier`` (a 1x1 conv) of
        this map. Computed one group at a time into one preallocated map (no second copy). The
        recurrent heads (lstm3, tsfgunet) have no such map and raise ``ValueError``.
        """
        if not self.has_penultimate:
            raise ValueError(f"{self.spec.arch} has a recurrent head: no per-pixel penultimate feature map")
        b, h, w = self._check(x)
        cg, fo = self.spec.in_channels, self.features.out_channels
        out = x.new_empty((b, self.spec.groups * fo, h, w))
        for g in range(self.spec.groups):
            start = g * fo
            for part in self.features.parts(x[:, g * cg : (g + 1) * cg]):
                out[:, start : start + part.shape[1]] = part
                start += part.shape[1]
        return out

    @contextlib.contextmanager
    def _streaming(self) -> Iterator[None]:
        cells = [m for m in self.modules() if isinstance(m, ConvLSTM2d)]
        for m in cells:
            m.stream(True)
        try:
            yield
        finally:
            for m in cells:
                m.stream(False)

    def receptive_radius(self) -> int:
        """:attr:`NetSpec.receptive_radius` (kept as a method: the stitching tests probe it)."""
        return self.spec.receptive_radius


class BranchSupervised(nn.Module):
    """Training-only wrapper: ``net``'s logits plus those of a 1x1 classifier that sees the U-Net
    branch's features alone (deep supervision of the branch, ``nets.unet_aux_loss``).

    Why: in FG-UNET the 1x1 path fits the spectra first, the loss is then low through it alone and
    the U-Net branch gets little gradient; on the demo its channels end nearly constant and RF on
    them alone reaches kappa 0.57 (docs/networks.md, "The U-Net branch"). A loss that only the
    U-Net's features can lower makes it learn the context. The extra classifier is not part of the
    model kept: the map, its speed and the parameter counts are those of ``net``.
    """

    def __init__(self, net: Net) -> None:
        super().__init__()
        unet = net.features.unet
        if unet is None or net.features.pixel is None or not isinstance(net.head, _ConcatHead):
            raise ValueError(f"{net.spec.arch} has no U-Net branch beside a 1x1 path to supervise")
        self.net = net
        self.branch = nn.Conv2d(net.spec.groups * unet.out_channels, net.spec.n_classes, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        net = self.net
        b, h, w = net._check(x)
        parts = net.features.parts(x.reshape(b * net.spec.groups, net.spec.in_channels, h, w))
        return net.head(_cat(parts), b), self.branch(parts[0].reshape(b, -1, h, w))


def build(spec: NetSpec) -> Net:
    """The one builder: the arch's layout picks the extractor parts, the unit and the fusion head."""
    lay = _LAYOUTS[spec.arch]
    unit = _conv_lstm(spec.groups) if lay.recurrent else _conv_relu
    unet = UNet(spec.in_channels, spec.unet_filters, spec.dropout, unit) if lay.unet else None
    pixel = PixelPath(spec.in_channels, spec.mlp_filters, unit) if lay.pixel else None
    features = GroupFeatures(unet, pixel)
    fo, k = features.out_channels, spec.n_classes
    head: _FusionHead
    if lay.fusion == "concat":
        head = _ConcatHead(fo, spec.groups, k)
    elif lay.fusion == "lstm":
        head = _LSTMHead(fo, spec.lstm_hidden, k)
    else:
        head = _LastStepHead(fo, spec.groups, k)
    return Net(spec, features, head)


WEIGHT_INITS = ("torch", "glorot", "he")


def initialise(net: nn.Module, how: str) -> nn.Module:
    """Re-draw the weights of every convolution and linear layer as ``how`` says (``nn.LSTM``
    keeps torch's).

    ``torch`` keeps PyTorch's layer defaults: weights of variance 1/(3 fan_in) and uniform biases,
    under which a plain conv+ReLU stack loses about 5/6 of its signal's second moment per layer.
    ``glorot`` is Keras's default, i.e. the paper's own framework (Glorot-uniform weights, zero
    biases); ``he`` keeps the second moment through ReLUs (He-uniform, zero biases). Uses torch's
    global generator: seed it first for reproducible weights.
    """
    if how not in WEIGHT_INITS:
        raise ValueError(f"unknown weight initialisation {how!r}: one of {', '.join(WEIGHT_INITS)}")
    if how == "torch":
        return net
    # gates (sigmoid, tanh) are not ReLUs: a ConvLSTM's conv gets Glorot either way, as in Keras
    gated = {id(c) for cell in net.modules() if isinstance(cell, ConvLSTM2d) for c in cell.modules()}
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            if how == "glorot" or id(m) in gated:
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def count_parameters(model: nn.Module) -> int:
    """Number of parameter scalars (trainable or not), as Keras' ``count_params`` reports them."""
    return sum(p.numel() for p in model.parameters())
