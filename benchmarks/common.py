"""Shared by the benchmarks: the machine they ran on, and saving figures as JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    import torch

    from ensemble.artifacts import versions

    cpu = platform.processor()
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if fields:
        # "AMD EPYC" alone names neither Zen 1 (family 23) nor Zen 3 (family 25), whose
        # int8 speeds differ by 2x: keep the family, model and the vector extensions
        cpu = (
            f"{fields.get('model name', cpu)} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
        )
        wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
        flags = fields.get("flags", "").split()
        cpu = ", ".join([cpu, *(f for f in wanted if f in flags)])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "platform": platform.platform(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB. VmHWM starts afresh at exec, unlike
    ru_maxrss, which a child started by exec inherits from its parent's high-water mark."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)


def save(name: str, figures: dict, out: str | None = None) -> Path:
    path = Path(out) if out else ROOT / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **figures}, indent=2, default=str) + "\n")
    print(f"saved {path}")
    return path
