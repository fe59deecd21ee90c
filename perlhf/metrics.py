"""Where metrics go: TensorBoard, a JSONL file (one record per log call), and the progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm


class MetricsLogger:
    """Logs from the main process only; other processes get a logger that does nothing."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 description: str = ""):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = tqdm(total=total_steps, initial=start_step, desc=description, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step or None)
        # A resumed run keeps the records up to its checkpoint and drops those logged after it.
        if self.path.exists():
            from perlhf.guards import writing

            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= start_step]
            with writing(self.path):
                self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float], show: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        for name, value in clean.items():
            self.writer.add_scalar(name, value, step)
        from perlhf.guards import writing

        with writing(self.path), self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **clean}) + "\n")
        if show:
            self.bar.set_postfix({k.split("/")[-1]: f"{clean[k]:.4g}" for k in show if k in clean}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a blank line or the half-written last line a crash can leave."""
    try:
        return int(json.loads(line).get("step", 0)) if line.strip() else None
    except (ValueError, AttributeError):
        return None


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory of this process so far: max allocated on CUDA, max resident set size on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
