"""Checkpoints that survive crashes, and the training state (optimizer, scheduler, RNG) that goes in them.

A checkpoint is a directory run_dir/checkpoints/step-00000042 holding whatever the trainer wrote plus a
manifest.json with the size and sha256 of every file. It is written under a hidden temporary name, fsync'ed and
renamed into place in one step, so a crash at any moment leaves either the old set of checkpoints or the old set
plus a complete new one. On resume, a checkpoint counts only if every file still matches its manifest.

Training state is saved with torch.save of plain containers and tensors and loaded with weights_only=True: a
checkpoint directory may come from somewhere else, and full unpickling would let it run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = 1
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# step-00000042, or step-00000042.old while a checkpoint of the same step is being replaced.
NAME = re.compile(r"^step-(\d+)(\.old)?$")


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict


def _warn(message: str) -> None:
    print(f"perlhf: warning: {message}", file=sys.stderr)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _remove(path: Path) -> None:
    """Rename out of the way first, so a crash halfway through rmtree leaves a hidden name, not a broken step-N."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (got {keep_last})")
        self.run_dir = Path(run_dir).absolute()  # checkpoint paths printed in resume messages are unambiguous
        self.root = self.run_dir / CHECKPOINTS
        self.keep_last = keep_last

    def save(self, step: int, write: Callable[[Path], None], meta: dict) -> Checkpoint:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int (got {step!r})")
        try:
            meta = json.loads(json.dumps(meta))  # what latest() will give back: tuples become lists, keys strings
        except (TypeError, ValueError) as err:
            # Checked before write() so that no minutes are spent writing a checkpoint that cannot be finished.
            raise CheckpointError(f"checkpoint meta for step {step} is not JSON-serialisable: {err}") from None
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write(tmp)
            files = self._seal(tmp)
            manifest = {"format": FORMAT, "step": step, "meta": meta, "files": files}
            with open(tmp / MANIFEST, "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.root / name
        old = final.with_name(name + ".old")
        if final.exists():
            # A directory cannot be renamed over a non-empty one. Until the new one is in place the old one
            # stays readable as step-N.old, which latest() accepts when step-N is missing.
            if old.exists():
                _remove(old)
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(self.root)
        if old.exists():
            _remove(old)
        saved = Checkpoint(path=final, step=step, meta=meta)
        self._prune(saved)
        return saved

    def _seal(self, tmp: Path) -> dict[str, dict[str, Any]]:
        """Hash and fsync every file write() left in tmp; fsync the directories, deepest first."""
        files: dict[str, dict[str, Any]] = {}
        directories = []
        for path in sorted(tmp.rglob("*")):
            rel = path.relative_to(tmp).as_posix()
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise CheckpointError(f"checkpoint file {rel}: only regular files and directories may be saved")
            if path.is_dir():
                directories.append(path)
            elif rel == MANIFEST:
                raise CheckpointError(f"{MANIFEST} is written by the checkpoint manager; name the file differently")
            else:
                files[rel] = {"size": path.stat().st_size, "sha256": _hash_file(path, fsync=True)}
        for directory in reversed(directories):
            _fsync_dir(directory)
        return files

    def _candidates(self) -> list[tuple[int, bool, Path]]:
        """(step, is_old_copy, path) of every step directory, newest first, step-N before step-N.old."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = NAME.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), bool(match.group(2)), path))
        return sorted(found, key=lambda item: (-item[0], item[1]))

    def has_any(self) -> bool:
        """Whether any checkpoint directory is present, without verifying it (cheap; latest() verifies)."""
        return bool(self._candidates())

    def _verified(self) -> Iterator[Checkpoint]:
        """Verified checkpoints, newest first, warning about whatever is skipped on the way."""
        if self.root.is_dir():
            for path in sorted(self.root.glob(TMP_PREFIX + "*")):
                _warn(f"skipping {path}: an unfinished checkpoint save (the run stopped while saving)")
        last_step = None
        for step, _, path in self._candidates():
            if step == last_step:
                continue  # step-N verified; its step-N.old leftover is not needed
            checkpoint, problem = _verify(path, step)
            if checkpoint is None:
                _warn(f"skipping checkpoint {path}: {problem}")
            else:
                last_step = step
                yield checkpoint

    def latest(self) -> Checkpoint | None:
        return next(self._verified(), None)  # hashes only down to the first good one

    def all(self) -> list[Checkpoint]:
        return list(reversed(list(self._verified())))

    def _prune(self, saved: Checkpoint) -> None:
        """Keep the newest keep_last verified checkpoints (counting the one just saved); drop everything older."""
        kept = 0
        oldest_kept = saved.step
        for step, _, path in self._candidates():
            if kept >= self.keep_last:
                break
            if path == saved.path or _verify(path, step)[0] is not None:
                kept += 1
                oldest_kept = min(oldest_kept, step)
        for step, _, path in self._candidates():
            if step < oldest_kept:
                _remove(path)
        # Leftovers of saves and removals that a crash interrupted; they were warned about by latest().
        for path in list(self.root.glob(TMP_PREFIX + "*")) + list(self.root.glob(TRASH_PREFIX + "*")):
            shutil.rmtree(path, ignore_errors=True)


def _verify(path: Path, step: int) -> tuple[Checkpoint | None, str]:
    """(the checkpoint, "") if every file matches the manifest, else (None, what is wrong)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError) as err:
        return None, f"unreadable {MANIFEST} ({err})"
    try:
        files = dict(manifest["files"])
        meta = manifest["meta"]
        if int(manifest["step"]) != step:
            return None, f"{MANIFEST} says step {manifest['step']}, the directory name says {step}"
    except (KeyError, TypeError, ValueError):
        return None, f"malformed {MANIFEST}"
    for rel, info in files.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:
            return None, f"{MANIFEST} names a file outside the checkpoint ({rel})"
        file = path / rel
        try:
            size = file.stat().st_size
            if size != info["size"]:
                return None, f"{rel} has {size} bytes, the manifest says {info['size']} (truncated or changed)"
            if _hash_file(file) != info["sha256"]:
                return None, f"{rel} does not match its sha256 in the manifest (corrupted or changed)"
        except FileNotFoundError:
            return None, f"{rel} is missing"
        except (OSError, KeyError, TypeError) as err:
            return None, f"cannot check {rel} ({err})"
    return Checkpoint(path=path, step=step, meta=meta), ""


def capture_rng_state() -> dict:
    """Every RNG a training step may draw from, as plain values and tensors that torch.load(weights_only) accepts."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            _warn("the checkpoint holds a numpy RNG state but numpy is not installed; not restored")
        else:
            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        if not torch.cuda.is_available():
            _warn("the checkpoint holds CUDA RNG states but CUDA is not available; runs will not repeat exactly")
        else:
            saved = state["cuda"]
            if len(saved) != torch.cuda.device_count():
                _warn(f"the checkpoint holds RNG states for {len(saved)} GPUs, this machine has "
                      f"{torch.cuda.device_count()}; restoring the ones both have")
            for index, device_state in enumerate(saved[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(device_state, index)


# Exact types: numpy.float64 is a float subclass, yet weights_only refuses it.
_SCALARS = (str, bytes, int, float, bool, type(None))
_TORCH = (torch.Tensor, torch.dtype, torch.device)


def _check_plain(value: Any, where: str) -> None:
    """Fail at save time, naming the key, on anything torch.load(weights_only=True) would refuse at resume time."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not (type(value) in _SCALARS or isinstance(value, _TORCH)):
        raise CheckpointError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}; training state "
                              "may hold only dicts, lists, tuples, str, int, float, bool, None and tensors")


def save_training_state(path: Path, *, optimizer=None, scheduler=None, rng: dict | None = None,
                        extra: dict | None = None) -> None:
    state = {
        "format": FORMAT,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng,
        "extra": extra,
    }
    _check_plain(state, "training state")
    # Through a Python file object, so a full disk raises OSError(ENOSPC) rather than torch's opaque RuntimeError.
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_training_state(path: Path, *, optimizer=None, scheduler=None) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: training state not found") from None
    except pickle.UnpicklingError as err:
        detail = next((line for line in str(err).splitlines() if "GLOBAL" in line), str(err).splitlines()[0])
        raise CheckpointError(
            f"{path}: refusing to load: it holds objects other than tensors and plain containers, and unpickling "
            f"them could run arbitrary code ({detail.strip()})") from None
    except RuntimeError as err:
        raise CheckpointError(f"{path}: not a readable training state file ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a perlhf training state (format {FORMAT})")
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{path}: holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise CheckpointError(f"{path}: holds no scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    return {"rng": state["rng"], "extra": state["extra"]}


def apply_learning_rates(optimizer, scheduler, rates: list[float], verbose: bool) -> None:
    """Make the learning rates of this command line win over the ones saved in the checkpoint being resumed."""
    old = list(scheduler.base_lrs)
    if old == rates:
        return
    scheduler.base_lrs = list(rates)
    for group, rate, factor in zip(optimizer.param_groups, rates,
                                   [lam(scheduler.last_epoch) for lam in scheduler.lr_lambdas]):
        group["initial_lr"], group["lr"] = rate, rate * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if verbose:
        print(f"perlhf: resuming with learning rate(s) {', '.join(f'{r:g}' for r in rates)} "
              f"(the checkpoint was trained with {', '.join(f'{r:g}' for r in old)})")


def check_global_batch(meta: dict, run_dir: Path, processes: int, per_process: int, flag: str) -> None:
    """A checkpoint resumes on any number of processes that keeps its global batch (processes x per-process
    batch): the data order and every update depend on the global batch only. Another one is a ConfigError that
    says which value of `flag` to pass. Checkpoints record both with `global_batch_meta`."""
    from perlhf.config import ConfigError

    saved_processes, saved_batch = meta.get("processes", processes), meta.get("batch_size", per_process)
    if saved_processes * saved_batch != processes * per_process:
        raise ConfigError(
            f"{flag}: {run_dir} was trained with a global batch of {saved_processes * saved_batch} "
            f"({saved_processes} process(es) x {flag} {saved_batch}); resume with the same global batch (here "
            f"{processes} process(es): {flag} {saved_processes * saved_batch / processes:g}) or pass "
            "--overwrite-output-dir to start over")


def global_batch_meta(processes: int, per_process: int) -> dict:
    return {"processes": processes, "batch_size": per_process}
