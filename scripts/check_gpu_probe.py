#!/usr/bin/env python3
"""What the router's GPU probe (serving/gpu.py, NVML) reads on this machine, idle and
under load: run it once on a new GPU host to see that /status and /readyz will report
the GPUs as nvidia-smi does.

    .venv/bin/python scripts/check_gpu_probe.py             # idle, then loaded if torch is here
    .venv/bin/python scripts/check_gpu_probe.py --load-s 0  # idle only

Loads GPU 0 with bf16 matrix products (PyTorch, when installed) for --load-s seconds in
a background thread after allocating --alloc-gib of memory, sampling the probe every
0.25 s; prints each GPU's idle reading, the load's peak utilisation, memory and power, and
one JSON line. Exits 1 when a GPU is found but a reading is implausible (utilisation
outside 0-100, no memory total, the allocation not seen in memory used, utilisation not
rising under load), 0 otherwise, and 0 with the probe's reason on a machine without one.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.gpu import GpuProbe, GpuReading

GIB = 2**30


def _row(r: GpuReading) -> dict[str, Any]:
    return {"index": r.index, "utilization_pct": r.utilization_pct,
            "memory_used_gib": round(r.memory_used_bytes / GIB, 2),
            "memory_total_gib": round(r.memory_total_bytes / GIB, 2),
            "power_watts": r.power_watts}


def _load(seconds: float, alloc_gib: float, stop: threading.Event,
          started: threading.Event) -> str:
    try:
        import torch
    except ImportError:
        started.set()
        return "torch is not installed: no load"
    if not torch.cuda.is_available():
        started.set()
        return "torch sees no CUDA device: no load"
    hold = torch.empty(int(alloc_gib * GIB), dtype=torch.uint8, device="cuda:0")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda:0")
    torch.cuda.synchronize()
    started.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        for _ in range(10):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
    del hold, a
    torch.cuda.empty_cache()
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load-s", type=float, default=6.0)
    p.add_argument("--alloc-gib", type=float, default=8.0)
    args = p.parse_args()
    problems: list[str] = []
    with GpuProbe() as probe:
        if not probe.available:
            print(f"no GPU to read: {probe.reason}")
            print(json.dumps({"available": False, "reason": probe.reason}))
            return 0
        idle = probe.read()
        for r in idle:
            print(f"GPU {r.index} idle: {_row(r)}")
            if not 0 <= r.utilization_pct <= 100:
                problems.append(f"GPU {r.index}: utilisation {r.utilization_pct}")
            if r.memory_total_bytes <= 0:
                problems.append(f"GPU {r.index}: no memory total")
        missing = probe.read([probe.device_count + 3])  # an index that does not exist
        if missing:
            problems.append("an index that does not exist was read")
        peak: dict[str, Any] = {}
        note = ""
        if args.load_s > 0:
            stop, started = threading.Event(), threading.Event()
            result: list[str] = []
            worker = threading.Thread(target=lambda: result.append(
                _load(args.load_s, args.alloc_gib, stop, started)), daemon=True)
            worker.start()
            started.wait(60)
            samples: list[GpuReading] = []
            while worker.is_alive():
                samples += probe.read([0])
                time.sleep(0.25)
            stop.set()
            note = result[0] if result else "the load thread failed"
            if samples and not note:
                top = max(samples, key=lambda r: r.utilization_pct)
                mem = max(r.memory_used_bytes for r in samples)
                power = [r.power_watts for r in samples if r.power_watts is not None]
                peak = {"samples": len(samples), "utilization_pct_max": top.utilization_pct,
                        "memory_used_gib_max": round(mem / GIB, 2),
                        "power_watts_max": max(power) if power else None}
                print(f"GPU 0 under load ({args.load_s:g} s, {args.alloc_gib:g} GiB "
                      f"held): {peak}")
                if top.utilization_pct < 50:
                    problems.append(f"utilisation under load only {top.utilization_pct}%")
                if mem - idle[0].memory_used_bytes < 0.9 * args.alloc_gib * GIB:
                    problems.append("the allocation was not seen in memory used")
            elif note:
                print(note)
        after = probe.read([0])
        if after:
            print(f"GPU 0 after: {_row(after[0])}")
    print(json.dumps({"available": True, "idle": [_row(r) for r in idle], "load": peak,
                      "note": note, "problems": problems}))
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
