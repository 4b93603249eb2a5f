"""The GPU table: lookup by name, alias, capacity and 'auto'; precision support; usable bytes."""
import dataclasses

import pytest
import torch

from memprof.plan import gpus
from memprof.plan.gpus import GPU, MiB, GiB, lookup, usable_bytes


def test_required_entries_present():
    for name in ("v100-16gb", "v100-32gb", "t4", "a10g", "l4", "rtx-3090", "rtx-4090",
                 "a100-40gb", "a100-80gb", "h100-80gb", "h200"):
        g = lookup(name)
        assert g.name == name and g.memory_bytes > 0 and g.bandwidth > 0 and g.fp32 > 0


def test_v100_as_torch_reports_it():
    g = lookup("v100-16gb")
    assert g.memory_bytes == 16160 * MiB
    assert g.fp16 == 125e12 and g.fp32 == pytest.approx(15.7e12)
    assert g.compute_capability == (7, 0)


@pytest.mark.parametrize("alias, name", [
    ("V100", "v100-16gb"),
    ("Tesla V100-SXM2-16GB", "v100-16gb"),
    ("tesla v100-sxm2-32gb", "v100-32gb"),
    ("Tesla T4", "t4"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA GeForce RTX 3090", "rtx-3090"),
    ("RTX-4090", "rtx-4090"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb"),
    ("NVIDIA H100 80GB HBM3", "h100-80gb"),
    ("  H100-80GB ", "h100-80gb"),
    ("NVIDIA H200", "h200"),
])
def test_lookup_by_alias_case_insensitive(alias, name):
    assert lookup(alias).name == name


@pytest.mark.parametrize("spec, expected", [
    ("24gb", 24 * 10**9), ("16GiB", 16 * GiB), ("40GB", 40 * 10**9), ("1.5 GiB", int(1.5 * GiB)),
    ("512MiB", 512 * MiB),
])
def test_lookup_by_capacity(spec, expected):
    g = lookup(spec)
    assert g.generic and g.memory_bytes == expected
    assert g.fp32 is None and g.peak_flops("bf16") is None
    assert g.supports("bf16")  # unknown card: assumed capable


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as ei:
        lookup("v200-16gb")
    msg = str(ei.value)
    assert "\n" not in msg and "'v200-16gb'" in msg
    for name in gpus.names():
        assert name in msg
    with pytest.raises(ValueError):
        lookup("")
    with pytest.raises(ValueError):
        lookup("0gb")


def test_auto_without_gpu_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(gpus, "_detect_raw", lambda index=0: None)
    with pytest.raises(gpus.NoGPUError, match="no CUDA GPU") as ei:
        lookup("auto")
    assert "\n" not in str(ei.value) and "v100-16gb" in str(ei.value)


@pytest.mark.gpu
def test_auto_on_a_gpu_has_its_real_total_memory():
    g = lookup("AUTO")
    assert g.memory_bytes == torch.cuda.get_device_properties(0).total_memory


def test_auto_uses_the_table_entry_with_the_detected_memory(monkeypatch):
    monkeypatch.setattr(gpus, "_detect_raw",
                        lambda index=0: ("Tesla V100-SXM2-16GB", 16160 * MiB + 4096, (7, 0),
                                         "torch total_memory"))
    g = lookup("auto")
    assert g.name == "v100-16gb" and g.memory_bytes == 16160 * MiB + 4096
    assert "detected" in g.memory_source and g.fp16 == 125e12
    monkeypatch.setattr(gpus, "_detect_raw",
                        lambda index=0: ("NVIDIA Quadro X", 48 * GiB, (7, 5), "NVML"))
    g = lookup("auto")
    assert g.generic and g.name == "NVIDIA Quadro X" and g.memory_bytes == 48 * GiB
    assert not g.supports("bf16") and g.supports("fp16")


def test_precision_support():
    v100 = lookup("v100-16gb")
    assert not v100.supports("bf16") and not v100.supports("tf32")
    assert v100.supports("fp16") and v100.supports("fp32") and v100.supports("float16")
    assert v100.peak_flops("bf16") is None
    assert not lookup("t4").supports("bfloat16")
    for name in ("a10g", "l4", "rtx-3090", "rtx-4090", "a100-40gb", "h100-80gb", "h200"):
        g = lookup(name)
        assert g.supports("bf16") and g.supports("tf32")
        assert g.bf16 > g.fp32 and g.fp16 == g.bf16
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        v100.supports("int3")


def test_dense_numbers_are_half_the_sparse_datasheet_figures():
    assert lookup("h100-80gb").bf16 == pytest.approx(989.5e12)
    assert lookup("l4").fp16 == pytest.approx(121e12)
    assert lookup("a100-40gb").bf16 == pytest.approx(312e12)


def test_usable_bytes():
    g = lookup("v100-16gb")
    expected = int(g.memory_bytes - gpus.DEFAULT_OVERHEAD_BYTES - gpus.FIT_MARGIN * g.memory_bytes)
    assert usable_bytes(g) == usable_bytes("v100-16gb") == expected
    assert usable_bytes(g, overhead=0, margin=0) == g.memory_bytes
    assert usable_bytes(g, overhead=gpus.LAZY_CONTEXT_BYTES, margin=0) == \
        g.memory_bytes - 287_047_680
    assert usable_bytes("512MiB") == 0  # overhead larger than the card: clamped
    with pytest.raises(ValueError):
        usable_bytes(g, margin=1.5)


def test_table_and_format():
    rows = gpus.table()
    assert [r["name"] for r in rows] == gpus.names()
    assert all(r["usable_bytes"] < r["memory_bytes"] for r in rows)
    text = gpus.format_table()
    assert "v100-16gb" in text and "h200" in text


def test_gpu_is_a_frozen_dataclass():
    g = lookup("t4")
    assert isinstance(g, GPU) and lookup(g) is g
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.memory_bytes = 1
