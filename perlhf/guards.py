"""Guards for long runs: the output directory, disk errors, Ctrl-C/SIGTERM, NaN losses and untrusted paths/files.

Each turns a failure that would otherwise surface as a traceback hours into a run (or not at all) into an early,
plain message that says what to do.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from perlhf.checkpoint import CheckpointManager

RUN_MARKER = ".perlhf-run"  # written into every run dir, so --overwrite-output-dir never clears a foreign one
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class OutputError(RuntimeError):
    """A file or directory perlhf must write cannot be written; the message names the path and the cause."""


class TrainingDiverged(RuntimeError):
    pass


class UnsafeInputError(ValueError):
    """A path or weights file named by a config or an adapter that perlhf refuses to use."""


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def prepare_run_dir(path: str | Path, *, overwrite: bool) -> bool:
    """Create the run dir and prove it writable before any training work; return True if it holds checkpoints."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".perlhf-write-probe-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"probe")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except FileExistsError:
        raise OutputError(f"cannot write to {path}: it exists and is not a directory") from None
    except OSError as err:
        raise OutputError(f"cannot write to {path}: {_reason(err)}") from None
    entries = [entry for entry in path.iterdir() if entry.name != RUN_MARKER]
    ours = (path / RUN_MARKER).exists() or CheckpointManager(path).has_any()
    if overwrite:
        if entries and not ours:
            raise OutputError(f"refusing to clear {path} for --overwrite-output-dir: it is not a perlhf run "
                              f"directory (no {RUN_MARKER} file). Choose a new or empty output directory.")
        try:
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        except OSError as err:
            raise OutputError(f"cannot clear {path} for --overwrite-output-dir: {_reason(err)}") from None
        if entries:
            print(f"perlhf: --overwrite-output-dir: removed the previous run's {len(entries)} entries from {path}")
    # Mark only directories that are new, empty or already ours: a marked directory may later be cleared.
    if ours or not entries:
        try:
            (path / RUN_MARKER).touch()
        except OSError as err:
            raise OutputError(f"cannot write to {path}: {_reason(err)}") from None
    return CheckpointManager(path).has_any()


def _os_error(err: BaseException) -> OSError | None:
    if isinstance(err, OSError):
        return err
    # safetensors (and so PEFT's save_pretrained) reports I/O failures as SafetensorError("... (os error 28)").
    match = re.search(r"\(os error (\d+)\)", str(err))
    if type(err).__name__ == "SafetensorError" and match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn OS errors raised while writing `path` into an OutputError that names it and says what went wrong."""
    try:
        yield
    except OutputError:
        raise
    except Exception as raised:
        err = _os_error(raised)
        if err is None:
            raise
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"disk full while writing {path}: free some space (or choose an output directory "
                              "on another disk) and run the same command again to resume") from raised
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"{path} is not writable: {_reason(err)}") from raised
        raise OutputError(f"error while writing {path}: {_reason(err)}") from raised


class StopRequest:
    """On the first SIGINT/SIGTERM, set `requested` so the loop can save and exit; on the second, stop at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:
                # Handlers can only be installed from the main thread; elsewhere this is a no-op.
                break
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            # None means a handler not installed from Python; the default is the closest we can restore.
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            raise KeyboardInterrupt(f"second stop signal ({name}): stopping at once without saving "
                                    "(the last saved checkpoint is intact)")
        self.requested = True
        self.signal_name = name
        print(f"\nperlhf: {name} received: finishing this step, then saving a checkpoint and exiting "
              "(send it again to stop at once without saving)", file=sys.stderr, flush=True)


class NonFiniteGuard:
    """Skip optimizer steps whose loss or gradients are NaN/inf; give up after `max_in_row` in a row."""

    def __init__(self, max_in_row: int = 3):
        if max_in_row < 1:
            raise ValueError(f"max_in_row must be at least 1 (got {max_in_row})")
        self.max_in_row = max_in_row
        self.skipped = 0
        self.in_row = 0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_row": self.in_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_row = int(state.get("skipped", 0)), int(state.get("in_row", 0))

    def step_ok(self, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], step: int) -> bool:
        loss_bad = not bool(torch.isfinite(torch.as_tensor(loss).detach()).all())
        grads = [p.grad for p in parameters if p.grad is not None]
        grads_bad = False
        if grads:
            # One host sync for all gradients instead of one per tensor.
            device = grads[0].device
            grads_bad = not bool(torch.stack([g.isfinite().all().to(device) for g in grads]).all())
        if not (loss_bad or grads_bad):
            self.in_row = 0
            return True
        self.skipped += 1
        self.in_row += 1
        what = "the loss and the gradients were" if loss_bad and grads_bad else (
            "the loss was" if loss_bad else "the gradients were")
        if self.in_row >= self.max_in_row:
            raise TrainingDiverged(
                f"training diverged at step {step}: {what} NaN or infinite for {self.in_row} steps in a row "
                f"({self.skipped} steps skipped in all). Likely causes: a learning rate too high (lower it), "
                "fp16 overflow (use --dtype bfloat16 or float32), or bad data (empty or extremely long examples, "
                "NaN rewards). The last checkpoint is intact; fix the cause and resume from it.")
        print(f"perlhf: warning: step {step}: {what} NaN or infinite; skipping this optimizer step "
              f"({self.in_row} in a row, {self.skipped} in all)", file=sys.stderr)
        return False


def safe_join(root: str | Path, relative: str) -> Path:
    """root/relative, resolved, refusing absolute paths and anything that leads outside root (.., symlinks)."""
    if not relative or Path(relative).is_absolute() or relative.startswith("~"):
        raise UnsafeInputError(f"path {relative!r} must be relative to {root} (absolute paths are refused)")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise UnsafeInputError(f"path {relative!r} leads outside {base} (to {target}); refused")
    return target


def check_safetensors_only(directory: Path, allow_pickle: bool) -> None:
    """Refuse a directory whose weights exist only as pickle files, which can run code when loaded."""
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
    if allow_pickle or any(name.endswith(".safetensors") for name in names):
        return
    pickled = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise UnsafeInputError(
            f"{directory / pickled[0]}: weights in {directory} are only in pickle format ({', '.join(pickled)}), "
            "which can run arbitrary code when loaded. Convert them to safetensors, or pass --allow-pickle if "
            "you trust the source.")
