"""Checkpoints: verified round trips, pruning, corruption and crash recovery, RNG and optimizer state."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from perlhf.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)


def payload(step: int, size: int = 4096) -> bytes:
    return random.Random(step).randbytes(size)


def write_step(step: int, size: int = 4096):
    def write(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(payload(step, size))
        (directory / "head").mkdir()
        (directory / "head" / "value.txt").write_text(f"step {step}")
    return write


def save_steps(manager: CheckpointManager, steps) -> list[Checkpoint]:
    return [manager.save(step, write_step(step), {"step": step, "loss": [0.5, step]}) for step in steps]


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_round_trip(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    saved = save_steps(manager, [10, 20, 30])
    assert saved[-1].path == tmp_path / "checkpoints" / "step-00000030"
    latest = manager.latest()
    assert latest == saved[-1]
    assert latest.meta == {"step": 30, "loss": [0.5, 30]}
    assert (latest.path / "weights.bin").read_bytes() == payload(30)
    assert (latest.path / "head" / "value.txt").read_text() == "step 30"
    assert [c.step for c in manager.all()] == [10, 20, 30]
    manifest = json.loads((latest.path / "manifest.json").read_text())
    assert manifest["step"] == 30
    assert manifest["files"]["head/value.txt"]["sha256"] == hashlib.sha256(b"step 30").hexdigest()
    assert manifest["files"]["weights.bin"]["size"] == 4096


def test_empty_or_missing_run_dir(tmp_path):
    assert CheckpointManager(tmp_path / "never-created").latest() is None
    (tmp_path / "checkpoints").mkdir()
    assert CheckpointManager(tmp_path).latest() is None
    assert CheckpointManager(tmp_path).all() == []


def test_keep_last_prunes_oldest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    save_steps(manager, range(1, 6))
    assert step_dirs(tmp_path) == ["step-00000004", "step-00000005"]
    assert [c.step for c in manager.all()] == [4, 5]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no-manifest"])
def test_damaged_checkpoint_is_skipped_with_warning(tmp_path, capsys, damage):
    manager = CheckpointManager(tmp_path)
    save_steps(manager, [1, 2])
    newest = tmp_path / "checkpoints" / "step-00000002"
    weights = newest / "weights.bin"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-1])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[100] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        (newest / "head" / "value.txt").unlink()
    else:
        (newest / "manifest.json").unlink()
    capsys.readouterr()
    latest = manager.latest()
    assert latest is not None and latest.step == 1
    warning = capsys.readouterr().err
    assert "step-00000002" in warning and "skipping" in warning
    assert [c.step for c in manager.all()] == [1]


def test_leftover_tmp_dir_is_ignored_then_cleaned(tmp_path, capsys):
    manager = CheckpointManager(tmp_path)
    save_steps(manager, [1])
    # What a crash in the middle of write() leaves behind.
    leftover = tmp_path / "checkpoints" / ".tmp-step-00000002-deadbeef"
    leftover.mkdir()
    (leftover / "weights.bin").write_bytes(b"half")
    capsys.readouterr()
    assert manager.latest().step == 1
    assert ".tmp-step-00000002-deadbeef" in capsys.readouterr().err
    save_steps(manager, [2])
    assert not leftover.exists()
    assert manager.latest().step == 2


def test_failed_write_leaves_previous_and_no_tmp(tmp_path):
    manager = CheckpointManager(tmp_path)
    save_steps(manager, [1])

    def broken(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        manager.save(2, broken, {})
    assert step_dirs(tmp_path) == ["step-00000001"]
    assert manager.latest().step == 1


def test_meta_must_be_json_before_anything_is_written(tmp_path):
    called = []
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        CheckpointManager(tmp_path).save(1, called.append, {"bad": object()})
    assert called == []


def test_resaving_a_step_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    save_steps(manager, [7])
    manager.save(7, write_step(8), {"again": True})
    latest = manager.latest()
    assert latest.step == 7 and latest.meta == {"again": True}
    assert (latest.path / "weights.bin").read_bytes() == payload(8)
    assert step_dirs(tmp_path) == ["step-00000007"]


def test_old_copy_is_used_if_a_crash_hit_during_replacement(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    save_steps(manager, [7])
    # The moment between moving the old step-7 aside and renaming the new one into place.
    (tmp_path / "checkpoints" / "step-00000007").rename(tmp_path / "checkpoints" / "step-00000007.old")
    assert manager.latest().step == 7
    save_steps(manager, [8])
    assert step_dirs(tmp_path) == ["step-00000008"]


def _save_forever(run_dir: str) -> None:
    manager = CheckpointManager(run_dir, keep_last=1)  # the harshest setting: one good checkpoint at a time
    step = manager.latest().step + 1
    while True:
        def write(directory: Path, step=step) -> None:
            data = payload(step, 64 * 1024)
            with open(directory / "weights.bin", "wb") as handle:
                handle.write(data[:1000])
                handle.flush()
                time.sleep(0.002)  # be caught with a half-written file now and then
                handle.write(data[1000:])
        manager.save(step, write, {"step": step})
        step += 1


def test_sigkill_at_random_moments_always_leaves_a_verified_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(0, lambda d: (d / "weights.bin").write_bytes(payload(0, 64 * 1024)), {"step": 0})
    # fork: the child starts in milliseconds, with torch already imported.
    context = multiprocessing.get_context("fork")
    rng = random.Random(1234)
    leftovers_seen: set[str] = set()
    kills_mid_save = 0
    for _ in range(10):
        child = context.Process(target=_save_forever, args=(str(tmp_path),), daemon=True)
        child.start()
        time.sleep(rng.uniform(0.03, 0.15))
        child.kill()  # SIGKILL: no cleanup handlers run
        child.join()
        assert child.exitcode == -9
        leftovers = {p.name for p in (tmp_path / "checkpoints").glob(".tmp-*")}
        kills_mid_save += bool(leftovers - leftovers_seen)
        leftovers_seen |= leftovers
        latest = manager.latest()
        assert latest is not None
        assert latest.meta == {"step": latest.step}
        data = (latest.path / "weights.bin").read_bytes()
        assert data == payload(latest.step, 64 * 1024)
        manifest = json.loads((latest.path / "manifest.json").read_text())
        assert manifest["files"]["weights.bin"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert latest.step > 0, "the child never finished a save"
    assert kills_mid_save >= 1, "no kill landed in the middle of a save; the test proved nothing"


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_rng_capture_and_restore_repeat_draws(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leave a cached gaussian in the python state
    state = capture_rng_state()
    first = _draws()
    _draws()
    restore_rng_state(state)
    assert _draws() == first
    # The same through a weights_only file.
    save_training_state(tmp_path / "state.pt", rng=state)
    _draws()
    restore_rng_state(load_training_state(tmp_path / "state.pt")["rng"])
    assert _draws() == first


def _fresh():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        # Every RNG takes part, so a missed restore changes the result.
        x = torch.randn(4, 3)
        target = x.sum(dim=1, keepdim=True) * float(np.random.rand()) + random.random()
        loss = ((model(x) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(3)
    model, optimizer, scheduler = _fresh()
    _train(model, optimizer, scheduler, 6)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(3)
    model, optimizer, scheduler = _fresh()
    _train(model, optimizer, scheduler, 3)
    manager = CheckpointManager(tmp_path)

    def write(directory: Path) -> None:
        save_file(model.state_dict(), directory / "model.safetensors")
        save_training_state(directory / "training_state.pt", optimizer=optimizer, scheduler=scheduler,
                            rng=capture_rng_state(), extra={"epoch": 0, "kl": {"beta": 0.05}})

    manager.save(3, write, {"step": 3})
    del model, optimizer, scheduler
    _draws()  # the new process's RNGs are elsewhere

    checkpoint = manager.latest()
    model, optimizer, scheduler = _fresh()
    model.load_state_dict(load_file(checkpoint.path / "model.safetensors"))
    state = load_training_state(checkpoint.path / "training_state.pt", optimizer=optimizer, scheduler=scheduler)
    restore_rng_state(state["rng"])
    assert state["extra"] == {"epoch": 0, "kl": {"beta": 0.05}}
    assert scheduler.last_epoch == 3
    _train(model, optimizer, scheduler, 3)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def _touch(path: str) -> None:
    Path(path).touch()


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_load_refuses_pickle_payload_that_is_not_weights_only(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"format": 1, "optimizer": None, "scheduler": None, "rng": None,
                "extra": RunsCodeWhenUnpickled(marker)}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="refusing to load.*arbitrary code") as info:
        load_training_state(tmp_path / "state.pt")
    assert "_touch" in str(info.value)  # names the offending global
    assert not marker.exists()


def test_save_refuses_values_that_would_not_load(tmp_path):
    with pytest.raises(CheckpointError, match=r"\['kl'\]\['beta'\] is a numpy.float64"):
        save_training_state(tmp_path / "state.pt", extra={"kl": {"beta": np.float64(0.1)}})


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_training_state(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_training_state(tmp_path / "junk.pt")
    save_training_state(tmp_path / "bare.pt", extra={})
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_training_state(tmp_path / "bare.pt", optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)]))


def test_cuda_rng_states_round_trip_per_device(tmp_path, monkeypatch, capsys):
    # No GPU on CI: stand in for two devices, to check the per-device bookkeeping and the file format.
    states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    save_training_state(tmp_path / "state.pt", rng=capture_rng_state())
    rng = load_training_state(tmp_path / "state.pt")["rng"]
    restore_rng_state(rng)
    assert sorted(restored) == [0, 1] and all(torch.equal(restored[i], states[i]) for i in (0, 1))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    restored.clear()
    restore_rng_state(rng)
    assert sorted(restored) == [0]
    assert "RNG states for 2 GPUs, this machine has 1" in capsys.readouterr().err
