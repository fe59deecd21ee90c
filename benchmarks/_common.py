"""What the benchmark scripts share: the machine and versions they report, and CPU time. Standard library only,
so a benchmark's parent process stays small while its children hold the models."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def versions() -> dict:
    out = {}
    for name in ("perlhf", "torch", "transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_seconds() -> float:
    """CPU time of this process (all threads): less sensitive than wall time to other jobs on a shared machine."""
    times = os.times()
    return times.user + times.system
