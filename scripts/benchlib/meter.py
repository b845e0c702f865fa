"""CPU time of the processes under test, read with psutil."""

from __future__ import annotations

import contextlib
import os

import psutil


class CpuMeter:
    """CPU seconds (user + system) of some process trees between start() and stop().

    A pid's children count with it (an engine's workers, uvicorn's workers), except for
    this process: its children are the servers under test, not the load generator.
    """

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.procs: dict[str, list[psutil.Process]] = {}
        for name, pid in pids.items():
            if pid is None:
                continue
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                self.procs[name] = ([p] if pid == os.getpid()
                                    else [p, *p.children(recursive=True)])
        self.t0: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, procs in self.procs.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    c = p.cpu_times()
                    total += c.user + c.system
            out[name] = total
        return out

    def start(self) -> None:
        self.t0 = self._read()

    def stop(self) -> dict[str, float]:
        t1 = self._read()
        return {k: t1[k] - self.t0.get(k, 0.0) for k in t1}
