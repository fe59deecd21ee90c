"""Guards: run dir checks, disk errors, stop signals, non-finite steps, path and pickle refusals."""

from __future__ import annotations

import errno
import math
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from perlhf.checkpoint import CheckpointManager, save_training_state
from perlhf.guards import (
    RUN_MARKER,
    NonFiniteGuard,
    OutputError,
    StopRequest,
    TrainingDiverged,
    UnsafeInputError,
    check_safetensors_only,
    prepare_run_dir,
    safe_join,
    writing,
)

REPO = Path(__file__).resolve().parents[1]


def save_one(run_dir: Path, step: int = 1) -> None:
    CheckpointManager(run_dir).save(step, lambda d: (d / "a.txt").write_text("a"), {})


# prepare_run_dir


def test_new_run_dir_is_created_and_probed(tmp_path):
    run = tmp_path / "deep" / "run"
    assert prepare_run_dir(run, overwrite=False) is False
    assert sorted(p.name for p in run.iterdir()) == [RUN_MARKER]  # the probe file is gone


def test_unwritable_run_dir_fails_before_any_work(tmp_path):
    # Tests run as root, where chmod does not stop writes; a regular file in the path does.
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write to .*file.txt/run: Not a directory"):
        prepare_run_dir(tmp_path / "file.txt" / "run", overwrite=False)
    with pytest.raises(OutputError, match="cannot write to .*file.txt: it exists and is not a directory"):
        prepare_run_dir(tmp_path / "file.txt", overwrite=True)
    assert (tmp_path / "file.txt").read_text() == "x"


def test_existing_but_unwritable_dir_fails_at_the_probe():
    target = Path("/sys/kernel")  # exists; sysfs refuses new files even for root
    try:
        tempfile.TemporaryFile(dir=target).close()
    except OSError:
        pass
    else:
        pytest.skip("/sys/kernel accepts new files here")
    with pytest.raises(OutputError, match="cannot write to /sys/kernel: "):
        prepare_run_dir(target, overwrite=False)


def test_resume_detection_and_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert prepare_run_dir(run, overwrite=False) is False
    save_one(run)
    (run / "logs").mkdir()
    (run / "logs" / "events").write_text("log")
    assert prepare_run_dir(run, overwrite=False) is True  # resume: nothing removed
    assert CheckpointManager(run).latest().step == 1 and (run / "logs" / "events").exists()
    assert prepare_run_dir(run, overwrite=True) is False
    assert sorted(p.name for p in run.iterdir()) == [RUN_MARKER]
    assert "removed the previous run's 2 entries" in capsys.readouterr().out


def test_overwrite_refuses_to_clear_a_directory_perlhf_did_not_make(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    assert prepare_run_dir(tmp_path, overwrite=False) is False  # writing into it is fine...
    assert not (tmp_path / RUN_MARKER).exists()  # ...but it is not marked as ours
    with pytest.raises(OutputError, match="refusing to clear .*not a perlhf run directory"):
        prepare_run_dir(tmp_path, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


# writing()


@pytest.mark.parametrize("code, message", [
    (errno.ENOSPC, "disk full while writing out/adapter.safetensors"),
    (errno.EDQUOT, "disk full while writing out/adapter.safetensors"),
    (errno.EACCES, "out/adapter.safetensors is not writable: Permission denied"),
    (errno.EROFS, "out/adapter.safetensors is not writable: Read-only file system"),
    (errno.EIO, "error while writing out/adapter.safetensors: Input/output error"),
])
def test_writing_maps_os_errors(code, message):
    with pytest.raises(OutputError) as info:
        with writing("out/adapter.safetensors"):
            raise OSError(code, os.strerror(code))
    assert str(info.value).startswith(message)
    assert isinstance(info.value.__cause__, OSError)


def test_writing_leaves_other_errors_alone():
    with pytest.raises(ValueError, match="not an I/O problem"):
        with writing("x"):
            raise ValueError("not an I/O problem")


def test_writing_maps_safetensors_io_errors():
    from safetensors import SafetensorError

    with pytest.raises(OutputError, match="disk full while writing w.safetensors"):
        with writing("w.safetensors"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


# Only the real character device: as root, open("/dev/full", "wb") would otherwise create a regular file there.
@pytest.mark.skipif(not (Path("/dev/full").exists() and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
                    reason="needs the /dev/full device")
def test_writing_a_real_full_device():
    with pytest.raises(OutputError, match="disk full while writing /dev/full"):
        with writing("/dev/full"), open("/dev/full", "wb") as handle:
            handle.write(b"x" * 100)
    with pytest.raises(OutputError, match="disk full"):
        with writing("/dev/full"):
            save_training_state(Path("/dev/full"), extra={"weights": torch.zeros(10_000)})


# StopRequest

STOPPABLE_LOOP = r"""
import sys, time
from perlhf.checkpoint import CheckpointManager
from perlhf.guards import StopRequest

run_dir, slow_save = sys.argv[1], sys.argv[2] == "slow"
manager = CheckpointManager(run_dir)
with StopRequest() as stop:
    print("ready", flush=True)
    step = 0
    while not stop.requested:
        step += 1
        time.sleep(0.01)
        if step > 2000:
            sys.exit(3)  # the signal never came
    if slow_save:
        time.sleep(30)  # a second signal must cut this short
    manager.save(step, lambda d: (d / "state.txt").write_text(str(step)), {"step": step})
    print(f"stopped at step {step}; run the same command again to resume", flush=True)
"""


def _start(run_dir: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", STOPPABLE_LOOP, str(run_dir), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_stop_request_in_a_real_process(tmp_path):
    # Both children start at once so their imports overlap.
    graceful = _start(tmp_path / "graceful", "fast")
    impatient = _start(tmp_path / "impatient", "slow")
    try:
        assert graceful.stdout.readline() == "ready\n"
        time.sleep(0.1)  # let it run some steps
        graceful.send_signal(signal.SIGTERM)
        out, err = graceful.communicate(timeout=20)
        assert graceful.returncode == 0, err
        assert "SIGTERM received" in err and "resume" in out
        checkpoint = CheckpointManager(tmp_path / "graceful").latest()
        assert checkpoint is not None and checkpoint.step > 1
        assert f"stopped at step {checkpoint.step}" in out

        assert impatient.stdout.readline() == "ready\n"
        impatient.send_signal(signal.SIGINT)
        while "SIGINT received" not in impatient.stderr.readline():
            pass
        started = time.monotonic()
        impatient.send_signal(signal.SIGINT)
        out, err = impatient.communicate(timeout=20)
        assert time.monotonic() - started < 10  # not the 30 s of the slow save
        assert impatient.returncode != 0
        assert "KeyboardInterrupt: second stop signal (SIGINT)" in err
        assert CheckpointManager(tmp_path / "impatient").latest() is None
    finally:
        for child in (graceful, impatient):
            if child.poll() is None:
                child.kill()
                child.communicate()


def test_stop_request_restores_handlers_and_second_signal_interrupts():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) != before[0]
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_stop_request_is_a_no_op_outside_the_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def run() -> None:
        with StopRequest() as stop:
            seen.append((stop.requested, signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [(False, before)]


# NonFiniteGuard


def _params(grad_value: float) -> list[torch.nn.Parameter]:
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.full_like(layer.weight, grad_value)
    layer.bias.grad = torch.zeros_like(layer.bias)
    return list(layer.parameters())


def test_non_finite_guard_counts_skips_and_resets():
    guard = NonFiniteGuard(max_in_row=3)
    good = torch.tensor(1.0)
    assert guard.step_ok(good, _params(0.5), step=1)
    assert not guard.step_ok(torch.tensor(math.nan), _params(0.5), step=2)
    assert not guard.step_ok(good, _params(math.inf), step=3)
    assert (guard.skipped, guard.in_row) == (2, 2)
    assert guard.step_ok(good, _params(0.5), step=4)  # a good step resets the run
    assert (guard.skipped, guard.in_row) == (2, 0)
    assert not guard.step_ok(good, _params(-math.inf), step=5)
    assert not guard.step_ok(torch.tensor(math.inf), _params(0.5), step=6)
    with pytest.raises(TrainingDiverged) as info:
        guard.step_ok(torch.tensor(math.nan), _params(math.nan), step=7)
    message = str(info.value)
    assert "step 7" in message and "the loss and the gradients were" in message and "3 steps in a row" in message
    assert "learning rate" in message and "fp16" in message and "bad data" in message
    assert guard.skipped == 5


def test_non_finite_guard_names_what_went_wrong():
    guard = NonFiniteGuard(max_in_row=1)
    with pytest.raises(TrainingDiverged, match="step 3: the gradients were NaN"):
        guard.step_ok(torch.tensor(0.1), _params(math.nan), step=3)
    with pytest.raises(TrainingDiverged, match="step 4: the loss was NaN"):
        NonFiniteGuard(max_in_row=1).step_ok(torch.tensor(math.nan), [torch.nn.Parameter(torch.ones(1))], step=4)


# safe_join


def test_safe_join_allows_subpaths(tmp_path):
    (tmp_path / "adapters").mkdir()
    assert safe_join(tmp_path, "adapters/reward") == (tmp_path / "adapters" / "reward").resolve()
    assert safe_join(tmp_path, "adapters/../head.safetensors") == (tmp_path / "head.safetensors").resolve()
    (tmp_path / "inner-link").symlink_to(tmp_path / "adapters")
    assert safe_join(tmp_path, "inner-link/x") == (tmp_path / "adapters" / "x").resolve()


@pytest.mark.parametrize("relative", ["../x", "adapters/../../x", "/etc/passwd", "~/.ssh/id_rsa", "", "link/passwd"])
def test_safe_join_refuses_escapes(tmp_path, relative):
    (tmp_path / "adapters").mkdir()
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(UnsafeInputError, match="refused"):
        safe_join(tmp_path, relative)


# check_safetensors_only


@pytest.mark.parametrize("name", ["pytorch_model.bin", "adapter.pt", "head.pth", "state.pkl"])
def test_pickle_only_weights_are_refused(tmp_path, name):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / name).write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeInputError, match=rf"{name}.*--allow-pickle"):
        check_safetensors_only(tmp_path, allow_pickle=False)
    check_safetensors_only(tmp_path, allow_pickle=True)


def test_safetensors_present_or_no_weights_is_fine(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    check_safetensors_only(tmp_path, allow_pickle=False)  # nothing to refuse; the loader reports missing weights
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (tmp_path / "model.safetensors").write_bytes(b"{}")
    check_safetensors_only(tmp_path, allow_pickle=False)
