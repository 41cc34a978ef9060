"""lumos_mcore.perf.hardware: the spec-peak table by GPU name and the matmul probe."""

from __future__ import annotations

import pytest
import torch

from lumos_mcore.perf import hardware
from lumos_mcore.perf.hardware import GPU_PEAK_TFLOPS, gpu_peak, measure_matmul_flops


@pytest.mark.parametrize(
    ("name", "bf16", "fp8", "fragment"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0, 1979.0, "H100 80GB HBM3"),  # SXM
        ("NVIDIA H100 PCIe", 756.0, 1513.0, "H100 PCIe"),
        ("NVIDIA H100 NVL", 835.0, 1670.0, "H100 NVL"),
        ("NVIDIA H200", 989.0, 1979.0, "H200"),
        ("NVIDIA H200 NVL", 835.0, 1670.0, "H200 NVL"),
        ("NVIDIA GH200 480GB", 989.0, 1979.0, "GH200"),
        ("NVIDIA B200", 2250.0, 4500.0, "B200"),
        ("NVIDIA GB200", 2500.0, 5000.0, "GB200"),
    ],
)
def test_gpu_peak_picks_the_specific_part_before_the_generic_name(name, bf16, fp8, fragment):
    """torch.cuda.get_device_name strings: "GB200" contains "B200", "H200 NVL" contains
    "H200" -- the table's order decides, and a wrong match is a wrong MFU."""
    got_bf16, got_fp8 = gpu_peak(name, "bf16"), gpu_peak(name, "fp8")
    assert (got_bf16.tflops, got_fp8.tflops) == (bf16, fp8)
    assert got_bf16.source == f"spec: {fragment} bf16 dense"
    assert got_fp8.source == f"spec: {fragment} fp8 dense"


def test_gpu_peak_unknown_gpu_or_dtype_is_none():
    assert gpu_peak("NVIDIA L40S", "bf16") is None
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "fp8") is None  # no FP8 tensor cores
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "bf16").tflops == 312.0
    # no fragment comes before a longer one that contains it (it would shadow it)
    names = list(GPU_PEAK_TFLOPS)
    for i, earlier in enumerate(names):
        for later in names[i + 1 :]:
            assert earlier not in later, (earlier, later)


def test_matmul_probe_times_batches_of_calls(monkeypatch):
    """The probe doubles the calls per timing until one lasts min_time, then keeps the fastest
    of ``repeats`` timings of that many calls (one synchronisation per batch on CUDA)."""
    batches = []
    real = hardware.time_calls

    def spy(fn, calls, device):
        batches.append(calls)
        return real(fn, calls, device)

    monkeypatch.setattr(hardware, "time_calls", spy)
    best, per_shape = measure_matmul_flops([(64, 64, 64)], repeats=3, min_time=0.02)
    assert list(per_shape) == ["64x64x64"] and best == per_shape["64x64x64"] > 0
    calibration, repeats = batches[:-2], batches[-2:]
    assert calibration == [2**i for i in range(len(calibration))]  # 1, 2, 4, ... N
    assert repeats == [calibration[-1]] * 2  # N calls twice more: the last calibration is repeat 1


def test_time_calls_on_cpu_runs_the_calls():
    count = []
    seconds = hardware.time_calls(lambda: count.append(1), 5, torch.device("cpu"))
    assert len(count) == 5 and seconds >= 0
