"""GPU (NVML) and host (psutil) load probes.

No GPU is a normal state for this project (CI, laptops, the CPU demo engine): the probe
then says so in `reason` and reads nothing. It never raises and never logs a traceback.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import psutil

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    utilization_pct: float
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float | None  # some boards and most MIG slices do not report power
    read_at: float  # time.monotonic()

    @property
    def memory_used_fraction(self) -> float:
        return self.memory_used_bytes / self.memory_total_bytes if self.memory_total_bytes else 0.0


@dataclass(frozen=True, slots=True)
class HostReading:
    cpu_percent: float  # since the previous call in this process (psutil's semantics)
    cpu_count: int
    memory_used_bytes: int
    memory_total_bytes: int
    load_average: tuple[float, float, float]  # 1, 5, 15 minutes
    read_at: float  # time.monotonic()


def _load_pynvml() -> tuple[ModuleType | None, str]:
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py (pynvml) is not installed"
    return pynvml, ""


def _nvml_reason(pynvml: ModuleType, exc: Exception) -> str:
    # The usual ways a machine has no usable GPU, in words an operator recognises.
    not_found = getattr(pynvml, "NVMLError_LibraryNotFound", None)
    no_driver = getattr(pynvml, "NVMLError_DriverNotLoaded", None)
    if not_found is not None and isinstance(exc, not_found):
        return "no NVIDIA driver (libnvidia-ml not found)"
    if no_driver is not None and isinstance(exc, no_driver):
        return "NVIDIA driver not loaded"
    return f"NVML unavailable: {exc}"


class GpuProbe:
    """Reads utilisation, memory and power of NVIDIA GPUs through NVML.

    NVML is initialised once, at construction; call close() when done.
    """

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None
        self.device_count = 0
        pynvml, reason = _load_pynvml()
        if pynvml is None:
            self.reason = reason
            return
        try:
            pynvml.nvmlInit()
            self.device_count = int(pynvml.nvmlDeviceGetCount())
        except Exception as exc:  # any NVML failure just means "no GPU here"
            self.reason = _nvml_reason(pynvml, exc)
            _log.info("GPU probe disabled: %s", self.reason)
            return
        self._nvml = pynvml
        self.reason = "" if self.device_count else "NVML found no GPU"

    @property
    def available(self) -> bool:
        return self._nvml is not None and self.device_count > 0

    def read(self, indices: Sequence[int] | None = None) -> list[GpuReading]:
        """Readings for the given GPU indices (all when None); [] without a GPU.

        A GPU that fails to answer (fallen off the bus, index out of range) is left out
        rather than failing the whole read.
        """
        nvml = self._nvml
        if nvml is None:
            return []
        wanted = range(self.device_count) if indices is None else indices
        readings: list[GpuReading] = []
        for index in wanted:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:
                _log.warning("GPU %s could not be read: %s", index, exc)
                continue
            try:
                power: float | None = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW
            except Exception:
                power = None
            readings.append(
                GpuReading(
                    index=index,
                    utilization_pct=float(util.gpu),
                    memory_used_bytes=int(memory.used),
                    memory_total_bytes=int(memory.total),
                    power_watts=power,
                    read_at=time.monotonic(),
                )
            )
        return readings

    def close(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception as exc:
                _log.debug("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> GpuProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_host() -> HostReading:
    """CPU, memory and load average of this machine."""
    memory = psutil.virtual_memory()
    return HostReading(
        # interval=None does not block: it compares with the previous call (0.0 on the first).
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        cpu_count=os.cpu_count() or 1,
        memory_used_bytes=int(memory.total - memory.available),
        memory_total_bytes=int(memory.total),
        load_average=psutil.getloadavg(),
        read_at=time.monotonic(),
    )
