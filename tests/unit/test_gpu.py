"""GPU and host probes. The NVML-present path is exercised with a stub pynvml module."""

from __future__ import annotations

import sys
import time
import types
from typing import Any

import pytest

from serving.gpu import GpuProbe, read_host


def test_probe_reads_this_machine() -> None:
    """Without a GPU (CI): says why and reads nothing. With one (a GPU host;
    scripts/check_gpu_probe.py also checks one under load): every GPU, plausibly."""
    probe = GpuProbe()
    try:
        if not probe.available:
            assert probe.reason
            assert probe.read() == []
            assert probe.read([0, 1]) == []
        else:
            readings = probe.read()
            assert [r.index for r in readings] == list(range(probe.device_count))
            for r in readings:
                assert 0 <= r.utilization_pct <= 100
                assert 0 < r.memory_used_bytes <= r.memory_total_bytes
            assert probe.read([probe.device_count + 3]) == []  # left out, not raised
    finally:
        probe.close()
    probe.close()  # closing twice is harmless


def test_probe_without_pynvml_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    probe = GpuProbe()
    assert not probe.available
    assert "not installed" in probe.reason
    assert probe.read() == []


class _NvmlError(Exception):
    pass


def _fake_pynvml(count: int, *, power_fails: bool = False) -> types.ModuleType:
    nvml: Any = types.ModuleType("pynvml")
    nvml.NVMLError = _NvmlError
    nvml.shutdowns = 0

    def get_handle(index: int) -> int:
        if index >= count:
            raise _NvmlError("Invalid Argument")
        return index

    def power(handle: int) -> int:
        if power_fails:
            raise _NvmlError("Not Supported")
        return 250_000 + handle  # milliwatts

    def shutdown() -> None:
        nvml.shutdowns += 1

    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = shutdown
    nvml.nvmlDeviceGetCount = lambda: count
    nvml.nvmlDeviceGetHandleByIndex = get_handle
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=40 + h, memory=5)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        used=(h + 1) * 2**30, total=80 * 2**30, free=0
    )
    nvml.nvmlDeviceGetPowerUsage = power
    module: types.ModuleType = nvml
    return module


def test_probe_reads_gpus_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml(2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    before = time.monotonic()
    probe = GpuProbe()
    assert probe.available and probe.reason == "" and probe.device_count == 2
    readings = probe.read()
    assert [r.index for r in readings] == [0, 1]
    first = readings[0]
    assert first.utilization_pct == 40.0
    assert first.memory_used_bytes == 2**30
    assert first.memory_total_bytes == 80 * 2**30
    assert first.memory_used_fraction == pytest.approx(1 / 80)
    assert first.power_watts == pytest.approx(250.0)
    assert first.read_at >= before
    # An index that does not exist is left out rather than failing the read.
    assert [r.index for r in probe.read([1, 7])] == [1]
    probe.close()
    probe.close()
    assert fake.shutdowns == 1
    assert probe.read() == []


def test_probe_power_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(1, power_fails=True))
    with GpuProbe() as probe:
        (reading,) = probe.read()
    assert reading.power_watts is None


def test_probe_init_failure_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake: Any = _fake_pynvml(1)

    def fail() -> None:
        raise _NvmlError("Driver Not Loaded")

    fake.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = GpuProbe()
    assert not probe.available
    assert "Driver Not Loaded" in probe.reason
    assert probe.read() == []


def test_host_reading_is_sane() -> None:
    read_host()  # primes psutil's cpu_percent, which compares with the previous call
    time.sleep(0.1)
    host = read_host()
    assert 0.0 <= host.cpu_percent <= 100.0
    assert host.cpu_count >= 1
    assert 0 < host.memory_used_bytes < host.memory_total_bytes
    assert len(host.load_average) == 3 and all(x >= 0 for x in host.load_average)
    assert host.read_at > 0
