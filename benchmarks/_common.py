"""What the benchmark scripts share: the machine and versions they report, CPU time and /proc memory figures, the
children's environment and where the report goes. Standard library only, so a benchmark's parent process stays
small while its children hold the models."""

from __future__ import annotations

import json
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


def status_mb(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM the kernel's peak), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_env(root: Path, threads: int | None) -> dict:
    """Environment of a benchmark child: offline, quiet, `root` importable, `threads` OpenMP/MKL threads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def write_report(out: Path, report: dict, markdown: str) -> None:
    """The JSON report at `out` and its Markdown table beside it (.md)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
