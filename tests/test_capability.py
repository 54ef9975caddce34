"""The capability probes (pipeline.nets.capability) and what precision the networks then run in.

A private primitive is taken only if its probe ran and agreed with the public path; bf16 is picked by
``auto`` only where it is native, and an explicit ``bf16`` that cannot run maps in fp32 with a warning
instead of crashing. The map-level check (PRECISION tag) is in tests/test_stitching.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import get
from pipeline.nets import capability
from pipeline.nets.arch import NetSpec, build

PROBES = [capability._fused_conv_relu_probe, capability._bf16_autocast_probe]


@pytest.fixture
def fresh_probes():
    """Forget cached answers before and after, so a probe run against a broken primitive here is
    not what the rest of the session sees."""
    for p in PROBES:
        p.cache_clear()
    capability._FAILURES.clear()
    yield
    for p in PROBES:
        p.cache_clear()
    capability._FAILURES.clear()


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_env_switches_every_private_primitive_off_without_probing(monkeypatch, fresh_probes, value):
    monkeypatch.setenv(capability.FAST_PATHS_ENV, value)
    for dt in (torch.float32, torch.bfloat16):
        assert not capability.fused_conv_relu(dt)
    assert capability._fused_conv_relu_probe.cache_info().currsize == 0  # nothing was run


def test_probes_run_once_and_never_claim_float64(fresh_probes):
    assert not capability.fused_conv_relu(torch.float64)  # oneDNN has no float64 primitive
    first = capability.fused_conv_relu(torch.float32)
    assert capability.fused_conv_relu(torch.float32) == first
    info = capability._fused_conv_relu_probe.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_probes_leave_the_global_rng_alone(fresh_probes):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    capability.fused_conv_relu(torch.float32)
    capability.fused_conv_relu(torch.bfloat16)
    capability.bf16_autocast("cpu")
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_a_primitive_that_raises_is_not_used(monkeypatch, fresh_probes):
    def missing(*args):
        raise RuntimeError("could not create a primitive descriptor\nsecond line")

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", missing)
    assert not capability.fused_conv_relu(torch.float32)
    assert not capability.fused_conv_relu(torch.bfloat16)
    why = capability.failure("oneDNN conv+ReLU torch.float32")
    assert why == "RuntimeError: could not create a primitive descriptor"
    # and the nets then run the public path instead of raising
    net = build(NetSpec("fgunet", 3, 2, 4, unet_filters=(4, 8, 16), mlp_filters=(8, 6))).eval()
    with torch.inference_mode():
        assert torch.isfinite(net.forward_lowmem(torch.rand(1, 6, 8, 8))).all()


def test_a_build_without_the_primitives_uses_none(monkeypatch, fresh_probes):
    monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace())  # e.g. a torch built without oneDNN
    assert not capability.fused_conv_relu(torch.float32)
    assert capability.failure("oneDNN conv+ReLU torch.float32").startswith("AttributeError")
    assert not capability.onednn_native_bf16()


def test_a_primitive_that_disagrees_is_not_used(monkeypatch, fresh_probes):
    wrong = lambda x, w, b, *rest: torch.zeros_like(F.conv2d(x, w, b, padding=1))  # noqa: E731
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", wrong)
    assert not capability.fused_conv_relu(torch.float32)
    assert "disagrees" in capability.failure("oneDNN conv+ReLU torch.float32")


def test_bf16_autocast_that_raises_is_reported(monkeypatch, fresh_probes):
    def broken(*args, **kwargs):
        raise RuntimeError("bf16 path needs the cpu support avx512bw")

    monkeypatch.setattr(capability.F, "conv2d", broken)
    assert not capability.bf16_autocast("cpu")
    assert "avx512bw" in capability.failure("bf16 autocast on cpu")


@pytest.mark.parametrize(
    ("cap", "native"),
    [("", True), ("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", False),
     ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True), ("ALL", True)],
)  # fmt: skip
def test_onednn_isa_cap_decides_native_bf16(monkeypatch, cap: str, native: bool):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert capability.onednn_native_bf16() is native
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not capability.onednn_native_bf16()


def _model():
    torch.manual_seed(0)
    net = build(NetSpec("mlp3", 3, 2, 4, mlp_filters=(8, 6)))
    return get("mlp3")(net, [1, 2, 3, 4], ())


def test_bf16_that_cannot_run_maps_in_fp32_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(capability, "bf16_autocast", lambda kind="cpu": False)
    monkeypatch.setitem(capability._FAILURES, "bf16 autocast on cpu", "RuntimeError: no bf16 here")
    model = _model()
    with caplog.at_level("WARNING", logger="pipeline.nets.capability"):
        assert model.set_precision("bf16") == "fp32"
    assert model.precision == "fp32"
    (rec,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "fp32 instead" in rec.getMessage() and "no bf16 here" in rec.getMessage()
    assert not capability.native_bf16("cpu")
    caplog.clear()
    assert model.set_precision("auto") == "fp32"
    assert model.set_precision("fp32") == "fp32"
    assert not caplog.records


def test_emulated_bf16_is_kept_when_asked_for_and_auto_takes_fp32(monkeypatch, caplog):
    monkeypatch.setattr(capability, "bf16_autocast", lambda kind="cpu": True)
    monkeypatch.setattr(capability, "native_bf16", lambda device="cpu": False)
    model = _model()
    with caplog.at_level("WARNING", logger="pipeline.nets.capability"):
        assert model.set_precision("bf16") == "bf16"
    assert any("emulated" in r.getMessage() for r in caplog.records)
    assert model.set_precision("auto") == "fp32"
    monkeypatch.setattr(capability, "native_bf16", lambda device="cpu": True)
    monkeypatch.setattr(capability, "bf16_speedup", lambda kind="cpu", training=False: 2.2)
    assert model.set_precision("auto") == "bf16"
    # native, but no faster than fp32 (an AVX512-BF16 Xeon without AMX measured 0.7-1.0x): fp32
    monkeypatch.setattr(capability, "bf16_speedup", lambda kind="cpu", training=False: 1.05)
    assert model.set_precision("auto") == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        model.set_precision("fp16")


def test_native_bf16_needs_flags_and_a_working_probe(monkeypatch):
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo: native_bf16 says False on such a CPU")
    monkeypatch.setattr(capability, "onednn_native_bf16", lambda: True)
    monkeypatch.setattr(capability, "bf16_autocast", lambda kind="cpu": False)
    assert not capability.native_bf16("cpu")  # whatever the flags say
    monkeypatch.setattr(capability, "bf16_autocast", lambda kind="cpu": True)
    with open("/proc/cpuinfo") as f:
        flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    assert capability.native_bf16("cpu") == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bf16_speedup_is_a_timing_and_zero_when_bf16_cannot_run(monkeypatch):
    capability.bf16_speedup.cache_clear()
    try:
        if capability.bf16_autocast("cpu"):
            assert capability.bf16_speedup("cpu", training=True) > 0
        real = capability.F.conv2d

        def no_bf16(x, *a, **k):
            if torch.is_autocast_enabled("cpu"):
                raise RuntimeError("could not create a primitive descriptor")
            return real(x, *a, **k)

        capability.bf16_speedup.cache_clear()
        monkeypatch.setattr(capability.F, "conv2d", no_bf16)
        assert capability.bf16_speedup("cpu") == 0.0
    finally:
        capability.bf16_speedup.cache_clear()
