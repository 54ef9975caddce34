"""The network family of pipeline.nets.arch: Table 2 parameter counts, the two forward paths agreeing,
group weight sharing, and the receptive radius that sizes the inference margin, checked empirically.

Everything but the parameter-count tests (which only build) runs on tiny-filter nets, so the file
stays well under the CPU time budget.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.nets.arch import ARCHS, Net, NetSpec, build, count_parameters, unet_receptive_radius
from pipeline.nets.spec import BRANCHED, LINEAR_HEADS

SMALL = {"unet_filters": (4, 8, 16), "mlp_filters": (8, 6), "lstm_hidden": 7}
PAPER = {"in_channels": 30, "groups": 11, "n_classes": 17}


def small(arch: str, cg: int = 3, groups: int = 2, k: int = 4, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return build(NetSpec(arch, cg, groups, k, **SMALL))


# ---------------------------------------------------------------------------------------------------
# parameter counts, by independent hand formulas


def conv(cin: int, cout: int, k: int = 1) -> int:
    return cin * cout * k * k + cout


def convlstm(cin: int, hid: int, k: int) -> int:
    return conv(cin + hid, 4 * hid, k)


def unet_params(cg: int, f: tuple[int, ...], unit=lambda i, o: conv(i, o, 3)) -> int:
    chans = (cg, *f)
    down = sum(unit(chans[i], c) + unit(c, c) for i, c in enumerate(f))
    up = sum(unit(f[i + 1] + f[i], f[i]) + unit(f[i], f[i]) for i in range(len(f) - 1))
    return down + up


def path_params(cg: int, f: tuple[int, ...], unit=conv) -> int:
    chans = (cg, *f)
    return sum(unit(chans[i], c) for i, c in enumerate(f))


def expected(arch: str, cg: int, g: int, k: int, f=(32, 64, 128), m=(200, 100, 50), h: int = 128) -> int:
    if arch == "fgunet":
        return unet_params(cg, f) + path_params(cg, m) + (g * (f[0] + m[-1]) + 1) * k
    if arch == "unet3":
        return unet_params(cg, f) + (g * f[0] + 1) * k
    if arch == "mlp3":
        return path_params(cg, m) + (g * m[-1] + 1) * k
    if arch == "lstm3":  # PyTorch's LSTM has two bias vectors
        return path_params(cg, m) + 4 * (m[-1] * h + h * h + 2 * h) + (h + 1) * k
    return (
        unet_params(cg, f, lambda i, o: convlstm(i, o, 3))
        + path_params(cg, m, lambda i, o: convlstm(i, o, 1))
        + (f[0] + m[-1] + 1) * k
    )


@pytest.mark.parametrize(
    ("arch", "n"),
    [
        ("fgunet", 525_997),  # Table 2
        ("unet3", 485_297),  # Table 2
        ("mlp3", 40_717),  # Table 2
        ("lstm3", 125_703),  # paper 324,024: not reproducible from its description
        ("tsfgunet", 4_170_923),  # paper 4,137,272
    ],
)
def test_paper_parameter_counts(arch: str, n: int) -> None:
    net = build(NetSpec(arch, **PAPER))
    assert count_parameters(net) == n == expected(arch, 30, 11, 17)


def test_fgunet_parts_match_paper_arithmetic() -> None:
    net = build(NetSpec("fgunet", **PAPER))
    assert count_parameters(net.features.unet) == 479_296
    assert count_parameters(net.features.pixel) == 31_350
    assert count_parameters(net.head) == 903 * 17


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("cg", "g", "k"), [(10, 11, 17), (30, 3, 5), (7, 1, 2)])
def test_parameter_count_formula(arch: str, cg: int, g: int, k: int) -> None:
    spec = NetSpec(arch, cg, g, k, unet_filters=(8, 16), mlp_filters=(12, 5), lstm_hidden=9)
    got = count_parameters(build(spec))
    assert got == expected(arch, cg, g, k, f=(8, 16), m=(12, 5), h=9)


# ---------------------------------------------------------------------------------------------------
# forward paths


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape(arch: str) -> None:
    net = small(arch, cg=3, groups=3, k=5).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 9, 32, 32)).shape == (2, 5, 32, 32)
        assert net(torch.rand(1, 9, 16, 24)).shape == (1, 5, 16, 24)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_lowmem_matches_forward(arch: str) -> None:
    net = small(arch, cg=3, groups=4, k=5).eval()
    x = torch.rand(2, 12, 32, 24)
    with torch.no_grad():
        full = net(x)
        low = net.forward_lowmem(x)
        again = net(x)  # streaming state must not leak into the next call
    assert low.shape == full.shape
    torch.testing.assert_close(low, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, full, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter(arch: str) -> None:
    net = small(arch, cg=3, groups=2, k=3).train()
    loss = net(torch.rand(2, 6, 16, 16)).square().mean()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bad_input_shape_raises() -> None:
    net = small("fgunet", cg=3, groups=2)
    assert net.pool_factor == 4
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, 6, 30, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        net.forward_lowmem(torch.rand(1, 6, 32, 18))
    with pytest.raises(ValueError, match="2 groups x 3 channels"):
        net(torch.rand(1, 5, 32, 32))
    assert small("mlp3").pool_factor == small("lstm3").pool_factor == 1
    small("mlp3")(torch.rand(1, 6, 7, 5))  # no pooling: any size


# ---------------------------------------------------------------------------------------------------
# group weight sharing


@pytest.mark.parametrize("arch", ARCHS)
def test_extractor_is_shared_over_groups(arch: str) -> None:
    nets = {g: build(NetSpec(arch, 3, g, 4, **SMALL)) for g in (1, 2, 7)}
    sizes = {g: count_parameters(n.features) for g, n in nets.items()}
    assert len(set(sizes.values())) == 1  # one extractor, whatever G
    heads = {g: count_parameters(n.head) for g, n in nets.items()}
    if arch in ("fgunet", "unet3", "mlp3"):  # only the classifier's (G*F + 1) * K grows
        feat = nets[1].features.out_channels
        assert heads[7] - heads[1] == 6 * feat * 4
    else:  # sequence fusion: nothing depends on G
        assert len(set(heads.values())) == 1


def test_fgunet_swapping_groups_is_swapping_classifier_slices() -> None:
    net = small("fgunet", cg=3, groups=3).eval()
    x = torch.rand(1, 9, 16, 16)
    swapped = torch.cat([x[:, 3:6], x[:, 0:3], x[:, 6:9]], 1)
    f = net.features.out_channels
    other = small("fgunet", cg=3, groups=3).eval()
    other.load_state_dict(net.state_dict())
    w = other.head.classifier.weight.data
    w[:, : 2 * f] = torch.cat([w[:, f : 2 * f], w[:, :f]], 1).clone()
    with torch.no_grad():
        torch.testing.assert_close(other(swapped), net(x), atol=1e-6, rtol=0)
        assert not torch.allclose(net(swapped), net(x), atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# receptive radius


def test_analytic_radius_values() -> None:
    assert unet_receptive_radius(1) == 2  # two 3x3 convs
    assert unet_receptive_radius(2) == 9  # 2 + 4 (level 1) + 1 (upsampling) + 2
    assert unet_receptive_radius(3) == 23
    assert unet_receptive_radius(3, steps=11) == 63
    radii = {a: build(NetSpec(a, **PAPER)).receptive_radius() for a in ARCHS}
    assert radii == {"fgunet": 23, "unet3": 23, "mlp3": 0, "lstm3": 0, "tsfgunet": 63}


def _chebyshev(size: int, i: int, j: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.maximum((yy - i).abs(), (xx - j).abs())


def _positions(size: int, p: int = 4) -> list[tuple[int, int]]:
    """Pixels near the centre covering every alignment modulo the pooling factor (on both axes)."""
    c = size // 2
    return [(c + a, c + b) for a in range(p) for b in range(p)]


@pytest.mark.parametrize(
    ("arch", "groups", "size"),
    [("fgunet", 2, 64), ("unet3", 2, 64), ("mlp3", 2, 16), ("lstm3", 2, 16), ("tsfgunet", 2, 72)],
)
def test_receptive_radius_is_attained_by_gradients(arch: str, groups: int, size: int) -> None:
    """Gradient support of one output pixel: inside r for every alignment, reaching r for some.

    Float64 autograd gives exact zeros outside the dependence cone (no rounding noise), and sees the
    tiny but non-zero long-range terms of the saturating ConvLSTMs a perturbation would drown in.
    """
    net = small(arch, groups=groups).double().eval()
    r = net.receptive_radius()
    pos = _positions(size)
    x = torch.rand(1, groups * 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x.repeat(len(pos), 1, 1, 1).requires_grad_(True)
    y = net(x)
    torch.stack([y[b, :, i, j].sum() for b, (i, j) in enumerate(pos)]).sum().backward()
    support = x.grad.abs().amax(1) != 0
    reach = [int(_chebyshev(size, i, j)[support[b]].max()) for b, (i, j) in enumerate(pos)]
    assert max(reach) == r
    assert min(reach) >= r - 1  # every alignment gets within one pixel of the bound


@pytest.mark.parametrize(("arch", "size"), [("fgunet", 64), ("unet3", 64), ("mlp3", 16)])
def test_perturbing_a_pixel_changes_outputs_only_within_radius(arch: str, size: int) -> None:
    """Large finite perturbations (which also flip max-pool winners) stay within r, and reach r."""
    net = small(arch).double().eval()
    r = net.receptive_radius()
    pos = _positions(size)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 6, size, size, dtype=torch.float64, generator=gen).repeat(len(pos) + 1, 1, 1, 1)
    for b, (i, j) in enumerate(pos, start=1):  # sample 0 stays the unperturbed reference
        x[b, :, i, j] += 10 * torch.randn(6, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        y = net(x)
    changed = (y[1:] != y[:1]).any(1)
    reach = [int(_chebyshev(size, i, j)[changed[b]].max()) for b, (i, j) in enumerate(pos)]
    assert max(reach) == r


# ---------------------------------------------------------------------------------------------------
# spec


def test_spec_json_round_trip() -> None:
    spec = NetSpec("tsfgunet", 30, 11, 17, unet_filters=(16, 32), mlp_filters=(20, 10), dropout=0.1)
    d = json.loads(json.dumps(spec.to_json()))
    assert d["unet_filters"] == [16, 32]
    back = NetSpec.from_json(d)
    assert back == spec and isinstance(back.unet_filters, tuple)
    assert NetSpec.from_json({"arch": "mlp3", "in_channels": 3, "groups": 2, "n_classes": 4}).dropout == 0.2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arch": "unet5"}, "arch must be one of"),
        ({"in_channels": 0}, "in_channels must be a positive integer"),
        ({"groups": 2.0}, "groups must be a positive integer"),
        ({"n_classes": True}, "n_classes must be a positive integer"),
        ({"unet_filters": []}, "unet_filters must not be empty"),
        ({"mlp_filters": [200, -1]}, r"mlp_filters\[1\] must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be a number in"),
        ({"colour": "red"}, "unknown NetSpec key"),
    ],
)
def test_spec_rejects_bad_values(change: dict, message: str) -> None:
    d = {"arch": "fgunet", "in_channels": 30, "groups": 11, "n_classes": 17, **change}
    with pytest.raises(ValueError, match=message):
        NetSpec.from_json(d)


def test_spec_rejects_missing_key() -> None:
    with pytest.raises(ValueError, match="missing required key"):
        NetSpec.from_json({"arch": "fgunet", "in_channels": 30, "groups": 11})


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_weights_compute_the_same(arch):
    """The pipeline runs every network with channels-last weights (oneDNN's layout): same outputs."""
    torch.manual_seed(0)
    net = build(NetSpec(arch, 6, 2, 5, unet_filters=(4, 8, 16), mlp_filters=(8, 8, 8), lstm_hidden=8)).eval()
    x = torch.rand(2, 12, 16, 16)
    with torch.no_grad():
        ref, ref_low = net(x), net.forward_lowmem(x)
        net.to(memory_format=torch.channels_last)
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net.forward_lowmem(x), ref_low, rtol=1e-5, atol=1e-5)
        xl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(net.forward_lowmem(xl), ref_low, rtol=1e-5, atol=1e-5)


def _take_path(monkeypatch, path: str, probe: str, dtype: torch.dtype) -> None:
    """``fast``: the private primitive where its probe says it works here (else skip: that machine
    only ever runs the fallback, tested by the other parameter); ``fallback``: forced off by the
    environment variable, as a user would."""
    from pipeline.nets import capability

    if dtype == torch.bfloat16 and not capability.bf16_autocast("cpu"):
        pytest.skip("bf16 autocast does not run on this CPU (precision falls back to fp32)")
    if path == "fallback":
        monkeypatch.setenv(capability.FAST_PATHS_ENV, "0")
    elif not getattr(capability, probe)(dtype):
        pytest.skip(f"capability.{probe}({dtype}) is false on this CPU/build: only the fallback runs")


def _spy(monkeypatch, op: str) -> list[int]:
    """Count the calls of ``torch.ops.mkldnn.<op>`` (to show which path a test exercised)."""
    calls: list[int] = []
    real = getattr(torch.ops.mkldnn, op)

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, op, spy)
    return calls


PATHS = ["fast", "fallback"]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_inference_pixel_path_is_the_layer_path(monkeypatch, dtype, channels_last: bool) -> None:
    """Without autograd the 1x1 path runs as a chunked per-pixel MLP (public addmm + ReLU, no private
    primitive, so the same on every CPU): same values, fp32 and bf16."""
    import pipeline.nets.arch as nets
    from pipeline.nets import capability

    if dtype == torch.bfloat16 and not capability.bf16_autocast("cpu"):
        pytest.skip("bf16 autocast does not run on this CPU (precision falls back to fp32)")
    monkeypatch.setattr(nets, "MLP_CHUNK", 100)  # 7 x 33 = 231 px: two full chunks and a partial one
    torch.manual_seed(3)
    net = build(NetSpec("fgunet", 6, 2, 5, unet_filters=(4, 8, 16), mlp_filters=(16, 12, 8))).eval()
    path_ = net.features.pixel
    x = torch.rand(1, 6, 7, 33)
    if channels_last:
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ref = path_.layers(x)  # the conv+ReLU layers, with autograd on
        with torch.inference_mode():
            got = path_(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype == dtype
    tol = 2e-2 if bf16 else 1e-6
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    assert path_(x).requires_grad  # training keeps the conv layers (and autograd)
    lstm = build(NetSpec("tsfgunet", 6, 2, 5, unet_filters=(4, 8, 16), mlp_filters=(8,))).features.pixel
    assert not lstm._mlp


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", PATHS)
def test_fused_conv_relu_is_conv_then_relu(monkeypatch, path, dtype, channels_last: bool) -> None:
    """Inference runs conv+ReLU as one oneDNN primitive where it works: the same values as the
    two modules (the fallback, which is those modules)."""
    import pipeline.nets.arch as nets

    _take_path(monkeypatch, path, "fused_conv_relu", dtype)
    calls = _spy(monkeypatch, "_convolution_pointwise")
    torch.manual_seed(4)
    unit = nets._conv_relu(5, 7, 3)
    x = torch.randn(2, 5, 13, 11)
    if channels_last:
        unit.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ref = unit[1](unit[0](x))  # autograd on: the modules one after the other
        with torch.inference_mode():
            got = unit(x)
    assert got.dtype == ref.dtype == dtype
    # bf16: both round the same fp32-accumulated result once, so bit-identical
    tol = 0 if bf16 else 1e-5
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    assert bool(calls) == (path == "fast")


@pytest.mark.parametrize("arch", ["fgunet", "tsfgunet"])
def test_fast_paths_and_fallback_give_the_same_fp32_net(monkeypatch, arch: str) -> None:
    """A whole inference forward, private primitives on vs forced off: the same logits to 1e-6."""
    from pipeline.nets import capability

    if not capability.fused_conv_relu(torch.float32):
        pytest.skip("no fp32 private primitive works here: every run is the fallback")
    torch.manual_seed(5)
    net = build(NetSpec(arch, 3, 2, 4, **SMALL)).eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 6, 16, 12)
    with torch.inference_mode():
        fast = net.forward_lowmem(x)
        monkeypatch.setenv(capability.FAST_PATHS_ENV, "0")
        plain = net.forward_lowmem(x)
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# initial weights (nets.weight_init)


def _fans(m: torch.nn.Module) -> tuple[int, int]:
    w = m.weight
    rf = w[0, 0].numel() if w.ndim > 2 else 1
    return w.shape[1] * rf, w.shape[0] * rf


@pytest.mark.parametrize("how", ["glorot", "he"])
@pytest.mark.parametrize("arch", ["fgunet", "tsfgunet"])
def test_initialise_draws_the_stated_variances(arch: str, how: str) -> None:
    """Every conv/linear weight has the variance of its rule (hand formulas from its fans), every
    bias is 0; a ConvLSTM's gate conv is Glorot under both rules (its gates are not ReLUs)."""
    from pipeline.nets.arch import ConvLSTM2d, initialise

    torch.manual_seed(3)
    net = initialise(build(NetSpec(arch, 12, 2, 5, unet_filters=(16, 32, 64), mlp_filters=(64, 32))), how)
    gated = {id(c) for cell in net.modules() if isinstance(cell, ConvLSTM2d) for c in cell.modules()}
    checked = 0
    for m in net.modules():
        if not isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            continue
        assert torch.count_nonzero(m.bias) == 0
        fan_in, fan_out = _fans(m)
        glorot = how == "glorot" or id(m) in gated
        want = 2 / (fan_in + fan_out) if glorot else 2 / fan_in
        bound = (3 * want) ** 0.5  # a uniform law on [-b, b] has variance b^2 / 3
        w = m.weight.detach().double()
        assert float(w.abs().max()) <= bound + 1e-6
        if w.numel() >= 2000:  # the sample variance within 10 % (SE of a uniform's: ~0.9 / sqrt(n))
            assert abs(float(w.var()) / want - 1) < 0.1, (m, float(w.var()), want)
            checked += 1
    assert checked >= 5


def test_initialise_torch_keeps_the_defaults_and_is_reproducible() -> None:
    from pipeline.nets.arch import initialise

    a = small("fgunet", seed=5)
    b = initialise(small("fgunet", seed=5), "torch")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    torch.manual_seed(9)
    c = initialise(build(NetSpec("fgunet", 3, 2, 4, **SMALL)), "he")
    torch.manual_seed(9)
    d = initialise(build(NetSpec("fgunet", 3, 2, 4, **SMALL)), "he")
    assert all(
        torch.equal(x, y) for x, y in zip(c.state_dict().values(), d.state_dict().values(), strict=True)
    )
    assert not torch.equal(c.state_dict()["head.classifier.weight"], a.state_dict()["head.classifier.weight"])
    with pytest.raises(ValueError, match="unknown weight initialisation 'lecun'"):
        initialise(a, "lecun")


# ---------------------------------------------------------------------------------------------------
# deep supervision of the U-Net branch (nets.unet_aux_loss)


def test_branch_supervision_reads_the_unet_branch_alone() -> None:
    """The wrapper's first output is the network's own logits; the second is a 1x1 classifier of
    the G groups' U-Net features side by side (each group run through the U-Net on its own here),
    so it does not move when only the 1x1 path's weights change."""
    from pipeline.nets.arch import BranchSupervised

    net = small("fgunet", groups=3).eval()
    sup = BranchSupervised(net).eval()
    x = torch.randn(2, 9, 16, 16)
    logits, branch = sup(x)
    torch.testing.assert_close(logits, net(x), rtol=0, atol=0)
    feats = torch.cat([net.features.unet(x[:, 3 * g : 3 * g + 3]) for g in range(3)], 1)
    w = sup.branch.weight[:, :, 0, 0]
    want = torch.einsum("kf,bfhw->bkhw", w, feats) + sup.branch.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(branch, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for p in net.features.pixel.parameters():
            p.add_(1.0)
    new_logits, new_branch = sup(x)
    assert torch.equal(new_branch, branch) and not torch.allclose(new_logits, logits)
    assert BRANCHED == ("fgunet",)  # derived from the layout table
    for arch in ARCHS:  # the table's derivation agrees with what the modules can do
        if arch in BRANCHED:
            BranchSupervised(small(arch))
        else:
            with pytest.raises(ValueError, match="no U-Net branch beside a 1x1 path"):
                BranchSupervised(small(arch))


def test_linear_heads_are_the_archs_with_a_penultimate_feature_map():
    """``nets.head_refit`` refits the 1x1 conv over the penultimate map: the list derived from the
    layout table names exactly the archs whose modules have that map."""
    assert LINEAR_HEADS == ("fgunet", "unet3", "mlp3")
    for arch in ARCHS:
        assert small(arch).has_penultimate == (arch in LINEAR_HEADS), arch
