"""Fault injection on the real trainers: SIGKILL at arbitrary moments (mid-step, mid-checkpoint-save), SIGTERM and
SIGINT, a second stop signal, NaN losses, a corrupt latest checkpoint, a torn metrics line, an unwritable output
directory. A resumed run must end with adapter tensors BITWISE equal to an uninterrupted run's, and a metrics.jsonl
with the same steps (none duplicated, none missing) and the same values.

The uninterrupted reference runs happen in this process (one CPU thread, as the subprocesses); the interrupted ones
are real subprocesses stopped with real signals. benchmarks/fault_injection.py runs many more kill points.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import resume_run_env, write_resume_inputs
from perlhf.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
UNSTABLE = ("time/", "perf/", "memory/")  # measure the machine, not the run


# ---------------------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _one_thread():
    """The in-process reference runs with one thread, like the subprocesses, so the sums happen in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    from perlhf.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _one_thread(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


class Child:
    """A `perlhf ...` subprocess whose output goes to files, so it never blocks on a full pipe."""

    def __init__(self, argv: list[str]):
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "perlhf.cli", *argv], stdout=self.out, stderr=self.err,
                                     env=resume_run_env(REPO), cwd=str(REPO), text=True)
        self.deadline = time.monotonic() + 240

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_until(self, condition, poll: float = 0.001) -> bool:
        """Poll `condition` while the process runs; True once it holds, False if the process ended first."""
        while self.running():
            if condition():
                return self.running()
            if time.monotonic() > self.deadline:
                raise TimeoutError("the run took too long")
            time.sleep(poll)
        return False

    def stderr_so_far(self) -> str:
        # pread: the child writes through the same open file, so moving its offset would make it overwrite.
        fd = self.err.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")

    def finish(self) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        finally:
            if self.running():
                self.proc.kill()
                self.proc.wait()
        self.out.seek(0)
        self.err.seek(0)
        result = self.proc.returncode, self.out.read(), self.err.read()
        self.out.close()
        self.err.close()
        return result


def _steps_logged(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


def _tmp_saves(run_dir: Path) -> list[str]:
    try:
        return [name for name in os.listdir(run_dir / "checkpoints") if name.startswith(".tmp-")]
    except OSError:
        return []


def _tmp_save_ids(run_dir: Path) -> set[tuple[str, int]]:
    """(name, inode) of each temporary save directory: a save left by an earlier killed run keeps its inode,
    a new save of the same step gets a new one."""
    ids = set()
    for name in _tmp_saves(run_dir):
        try:
            ids.add((name, os.stat(run_dir / "checkpoints" / name).st_ino))
        except OSError:
            pass
    return ids


def _kill_at_step(argv: list[str], run_dir: Path, step: int, sig=signal.SIGKILL) -> tuple[int, str, str]:
    """Start the run and send `sig` once metrics.jsonl shows `step` (with --logging-steps 1: mid-training)."""
    child = Child(argv)
    landed = child.wait_until(lambda: _steps_logged(run_dir) >= step)
    if landed:
        child.proc.send_signal(sig)
    code, out, err = child.finish()
    assert landed, f"the run ended (exit {code}) before step {step}: {err[-2000:]}"
    return code, out, err


def _kill_mid_save(argv: list[str], run_dir: Path, nth: int, required: bool = True) -> tuple[int, str, str, list[str]]:
    """SIGKILL the moment the nth checkpoint save of this run has its temporary directory on disk.

    A save of a tiny model lasts milliseconds; on a loaded machine the poller can miss it and the run finishes.
    With required=False that is returned (exit 0) for the caller to check the finished run instead."""
    left_before = _tmp_save_ids(run_dir)  # an earlier kill may have landed mid-save: not this run's save
    child = Child(argv)
    seen: set[tuple[str, int]] = set()

    def saving() -> bool:
        ids = _tmp_save_ids(run_dir) - left_before
        seen.update(ids)
        return bool(ids) and len(seen) >= nth

    landed = child.wait_until(saving, poll=0.0002)
    if landed:
        child.proc.send_signal(signal.SIGKILL)
    code, out, err = child.finish()
    assert landed or not required, f"the run ended (exit {code}) before its save #{nth}: {err[-2000:]}"
    return code, out, err, _tmp_saves(run_dir)


def _run(argv: list[str]) -> tuple[int, str, str]:
    return Child(argv).finish()


def _assert_same_adapters(got: Path, want: Path) -> None:
    """Every tensor of every adapter file under `want` is bitwise equal in `got`."""
    files = sorted(p.relative_to(want) for p in want.glob("*adapter_model.safetensors")) + sorted(
        p.relative_to(want) for p in want.glob("*/adapter_model.safetensors") if p.parts[-2] in ("policy", "value"))
    assert files, f"no final adapter in {want}"
    for rel in files:
        assert (got / rel).exists(), f"{got / rel} is missing"
        a, b = load_file(str(want / rel)), load_file(str(got / rel))
        assert set(a) == set(b), f"{rel}: different tensor names"
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (f"{rel}: {len(differ)} of {len(a)} tensors differ from the uninterrupted run, e.g. "
                            f"{differ[0]} (max |diff| {(a[differ[0]] - b[differ[0]]).abs().max().item():.3g})")


def _stable_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith(UNSTABLE) and "tokens_per_second" not in k}
            for row in rows]


def _assert_same_metrics(got: Path, want: Path) -> None:
    a, b = _stable_metrics(want), _stable_metrics(got)
    steps_a, steps_b = [r["step"] for r in a], [r["step"] for r in b]
    assert steps_b == steps_a, f"metrics.jsonl steps after resume {steps_b} != uninterrupted {steps_a}"
    for ra, rb in zip(a, b):
        assert ra == rb, f"metrics at step {ra['step']} differ: uninterrupted {ra}, resumed {rb}"


# ---------------------------------------------------------------------------------------------------------------
# Inputs and the uninterrupted runs


RM_STEPS = 20
RL_STEPS = 8


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fault-inputs")
    return {"model": tiny_model_dir, **write_resume_inputs(root), "root": root}


def rm_argv(inputs: dict, out: Path, *extra: str) -> list[str]:
    # --lora-dropout makes the result depend on the RNG state, so a resume that does not restore it shows.
    return ["rm", "train", "--model", inputs["model"], "--data", inputs["pairs"], "--output-dir", str(out),
            "--max-steps", str(RM_STEPS), "--save-steps", "2", "--save-total-limit", "3",
            "--per-device-train-batch-size", "4", "--eval-steps", "0", "--learning-rate", "1e-3",
            "--lora-dropout", "0.1", "--logging-steps", "1", "--device", "cpu", *extra]


def rl_argv(inputs: dict, reward_model: Path, out: Path, algorithm: str = "reinforce") -> list[str]:
    # --save-steps 3: a resume usually has iterations to redo, not only a checkpoint to pick up.
    return ["rl", "train", "--model", inputs["model"], "--reward-model", str(reward_model), "--prompts",
            inputs["prompts"], "--output-dir", str(out), "--max-steps", str(RL_STEPS), "--batch-size", "4",
            "--max-new-tokens", "8", "--save-steps", "3", "--algorithm", algorithm, "--device", "cpu"]


@pytest.fixture(scope="module")
def rm_reference(inputs) -> Path:
    out = inputs["root"] / "rm-reference"
    code, _, err = _cli(rm_argv(inputs, out))
    assert code == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def rl_reference(inputs, rm_reference) -> Path:
    out = inputs["root"] / "rl-reference"
    code, _, err = _cli(rl_argv(inputs, rm_reference, out))
    assert code == 0, err[-3000:]
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. SIGKILL at arbitrary moments, then resume


@pytest.mark.slow
def test_rm_sigkill_mid_step_and_mid_save_then_resume_is_bitwise_identical(inputs, rm_reference, tmp_path):
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    out = tmp_path / "rm"
    argv = rm_argv(inputs, out)
    kill_step = rng.randint(3, 12)
    code, _, err = _kill_at_step(argv, out, kill_step)
    assert code == -signal.SIGKILL, f"seed {seed}: exit {code}: {err[-2000:]}"

    # The resumed run is killed in turn, while it writes its 1st or 2nd checkpoint.
    code, out_text, err, left = _kill_mid_save(argv, out, nth=rng.randint(1, 2), required=False)
    if code == 0:  # the save was too quick to catch: the resumed run finished, and must match all the same
        assert "resuming" in out_text, f"seed {seed}: the second run did not resume: {out_text[-2000:]}"
        _assert_same_adapters(out, rm_reference)
        _assert_same_metrics(out, rm_reference)
        return
    assert code == -signal.SIGKILL, f"seed {seed}: exit {code}: {err[-2000:]}"
    assert "resuming" in out_text, f"seed {seed}: the second run did not resume: {out_text[-2000:]}"
    latest = CheckpointManager(out).latest()
    assert latest is not None and latest.step >= 2

    code, out_text, err = _run(argv)
    assert code == 0, f"seed {seed}: {err[-3000:]}"
    assert f"from step {latest.step}" in out_text, f"seed {seed}: {out_text[-2000:]}"
    if left:  # the kill landed while the temporary directory was there: it is reported, then cleared
        assert "unfinished checkpoint save" in err
        assert not _tmp_saves(out)
    _assert_same_adapters(out, rm_reference)
    _assert_same_metrics(out, rm_reference)


@pytest.mark.slow
def test_rl_sigkill_mid_save_then_double_sigterm_then_resume_is_bitwise_identical(inputs, rm_reference,
                                                                                     rl_reference, tmp_path):
    out = tmp_path / "rl"
    argv = rl_argv(inputs, rm_reference, out)
    code, _, err, _ = _kill_mid_save(argv, out, nth=1, required=False)  # the save at iteration 3
    if code == 0:  # the save was too quick to catch: the uninterrupted result must still match
        _assert_same_adapters(out, rl_reference)
        return
    assert code == -signal.SIGKILL, err[-2000:]
    assert CheckpointManager(out).latest() is None or CheckpointManager(out).latest().step == 3

    # A second stop signal stops at once without saving; the last checkpoint stays good.
    child = Child(argv)
    assert child.wait_until(lambda: _steps_logged(out) >= 4), child.finish()
    child.proc.send_signal(signal.SIGTERM)
    child.wait_until(lambda: "SIGTERM received" in child.stderr_so_far(), poll=0.0005)
    if child.running():
        child.proc.send_signal(signal.SIGTERM)
    code, out_text, err = child.finish()
    assert "SIGTERM received" in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    if code == 130:
        assert "perlhf: interrupted" in err
    else:  # the save finished before the second signal came
        assert code == 0 and "Re-run the same command to resume" in out_text, (code, err[-2000:])
    assert CheckpointManager(out).latest() is not None

    code, out_text, err = _run(argv)
    assert code == 0, err[-3000:]
    assert "resuming" in out_text
    _assert_same_adapters(out, rl_reference)
    _assert_same_metrics(out, rl_reference)


# ---------------------------------------------------------------------------------------------------------------
# 2. SIGTERM and SIGINT save, exit 0 and say how to resume; 4. a corrupt latest checkpoint is skipped


@pytest.mark.slow
def test_rm_sigint_sigterm_then_corrupt_latest_checkpoint_then_resume(inputs, rm_reference, tmp_path):
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    out = tmp_path / "rm"
    argv = rm_argv(inputs, out)
    stops = []
    for sig, first in ((signal.SIGINT, 3), (signal.SIGTERM, 2)):
        # The step logged so far is the first one: the resumed run has to get past its checkpoint first.
        previous = CheckpointManager(out).latest()
        at = (previous.step if previous else 0) + first + rng.randint(0, 4)
        code, out_text, err = _kill_at_step(argv, out, at, sig)
        name = signal.Signals(sig).name
        assert code == 0, f"seed {seed}: {name}: exit {code}: {err[-2000:]}"
        assert f"{name} received" in err
        assert "Re-run the same command to resume" in out_text, out_text[-1000:]
        assert "Traceback" not in err
        latest = CheckpointManager(out).latest()
        assert latest is not None and f"stopped at step {latest.step};" in out_text, (seed, out_text[-1000:])
        assert latest.step < RM_STEPS, f"seed {seed}: the {name} came too late to test anything"
        stops.append(latest.step)
    assert stops[1] > stops[0]

    # Truncate the newest checkpoint's adapter: the resume must notice, take the one before and still finish.
    checkpoints = CheckpointManager(out)
    newest = checkpoints.latest()
    adapter = newest.path / "model" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    assert checkpoints.latest().step < newest.step
    previous = checkpoints.latest().step

    code, out_text, err = _run(argv)
    assert code == 0, f"seed {seed}: {err[-3000:]}"
    assert f"skipping checkpoint {newest.path}" in err and "truncated" in err, err[-2000:]
    assert f"from step {previous}" in out_text
    _assert_same_adapters(out, rm_reference)
    _assert_same_metrics(out, rm_reference)


# ---------------------------------------------------------------------------------------------------------------
# 3. NaN: skipped and counted; three in a row stop the run, naming the step; the last checkpoint is good


def _rm_config(inputs: dict, out: Path, **overrides):
    from perlhf.reward import RewardConfig

    values = dict(model=inputs["model"], data=inputs["pairs"], output_dir=str(out), max_steps=10, save_steps=2,
                  save_total_limit=5, per_device_train_batch_size=4, eval_steps=0, learning_rate=1e-3,
                  logging_steps=1, device="cpu")
    values.update(overrides)
    return RewardConfig(**values)


def _nan_loss_at(monkeypatch, steps: set[int] | None = None, from_step: int | None = None) -> None:
    """Make the training loss NaN at the given steps (1-based; evaluation runs under no_grad and is untouched)."""
    import perlhf.reward as reward

    real = reward.batch_loss
    calls = {"n": 0}

    def batch_loss(out, margin, *rest):
        loss, accuracy = real(out, margin, *rest)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if (steps and calls["n"] in steps) or (from_step is not None and calls["n"] >= from_step):
                loss = loss * float("nan")
        return loss, accuracy

    monkeypatch.setattr(reward, "batch_loss", batch_loss)


def test_rm_nan_steps_are_skipped_and_counted(inputs, tmp_path, monkeypatch, capsys):
    from perlhf.reward import train_reward_model

    _nan_loss_at(monkeypatch, steps={3, 6, 7})
    out = tmp_path / "rm"
    with _one_thread():
        summary = train_reward_model(_rm_config(inputs, out))
    err = capsys.readouterr().err
    assert summary["steps"] == 10 and summary["skipped_steps"] == 3
    for step in (3, 6, 7):
        assert f"step {step}: the loss and the gradients were NaN or infinite; skipping" in err
    logged = {row["step"]: row for row in _stable_metrics(out) if "train/skipped_steps" in row}
    assert [logged[s]["train/skipped_steps"] for s in range(1, 11)] == [0, 0, 1, 1, 1, 2, 3, 3, 3, 3]
    # A skipped step does not move the optimizer: 7 Adam steps were taken in 10.
    state = torch.load(CheckpointManager(out).latest().path / "training_state.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {7}
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_rm_three_nan_steps_in_a_row_stop_the_run_and_leave_a_good_checkpoint(inputs, tmp_path, monkeypatch):
    from perlhf.guards import TrainingDiverged
    from perlhf.reward import train_reward_model

    _nan_loss_at(monkeypatch, from_step=5)
    out = tmp_path / "rm"
    with _one_thread(), pytest.raises(TrainingDiverged, match=r"diverged at step 7\b.*3 steps in a row"):
        train_reward_model(_rm_config(inputs, out))
    latest = CheckpointManager(out).latest()  # verifies every file against its manifest
    assert latest is not None and latest.step == 6
    weights = load_file(str(latest.path / "model" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a diverged run

    # The cause fixed, the same command resumes from that checkpoint and finishes.
    monkeypatch.undo()
    with _one_thread():
        summary = train_reward_model(_rm_config(inputs, out))
    assert summary["steps"] == 10  # (how the skipped count carries over: test_skipped_step_count_survives_a_resume)
    assert (out / "adapter_model.safetensors").exists()


def test_rl_three_nan_iterations_in_a_row_stop_the_run(inputs, rm_reference, tmp_path, monkeypatch):
    from perlhf.guards import TrainingDiverged
    from perlhf.rl import objectives
    from perlhf.rl.trainer import RLConfig, train_policy

    real = objectives.policy_gradient_loss
    calls = {"n": 0}

    def nan_from_the_third(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(objectives, "policy_gradient_loss", nan_from_the_third)
    out = tmp_path / "rl"
    config = RLConfig(model=inputs["model"], reward_model=str(rm_reference), prompts=inputs["prompts"],
                      output_dir=str(out), max_steps=8, batch_size=4, max_new_tokens=4, save_steps=1,
                      save_total_limit=5, device="cpu")
    with _one_thread(), pytest.raises(TrainingDiverged, match=r"diverged at step 5\b"):
        train_policy(config)
    latest = CheckpointManager(out).latest()
    assert latest is not None and latest.step == 4
    for role in ("policy", "value"):
        weights = load_file(str(latest.path / role / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_skipped_step_count_survives_a_resume(inputs, tmp_path, monkeypatch):
    """A run stopped (SIGTERM) after a skipped NaN step and resumed must count that step, as the uninterrupted
    run does: in metrics.jsonl, in eval_results.json, and in the three-in-a-row streak."""
    import perlhf.reward as reward
    from perlhf.reward import train_reward_model

    real = reward.batch_loss

    def patched(stop_at: int | None):
        calls = {"n": 0}

        def batch_loss(out, margin, *rest):
            loss, accuracy = real(out, margin, *rest)
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == 3:
                    loss = loss * float("nan")
                if calls["n"] == stop_at:
                    signal.raise_signal(signal.SIGTERM)  # a real signal, handled by the run's StopRequest
            return loss, accuracy
        return batch_loss

    with _one_thread():
        monkeypatch.setattr(reward, "batch_loss", patched(None))
        whole = train_reward_model(_rm_config(inputs, tmp_path / "whole"))
        monkeypatch.setattr(reward, "batch_loss", patched(4))
        assert train_reward_model(_rm_config(inputs, tmp_path / "resumed")) == {"stopped_at": 4}
        monkeypatch.setattr(reward, "batch_loss", real)
        resumed = train_reward_model(_rm_config(inputs, tmp_path / "resumed"))
    assert whole["skipped_steps"] == 1
    assert resumed["skipped_steps"] == 1, "the resumed run forgot the NaN step skipped before the stop"
    _assert_same_metrics(tmp_path / "resumed", tmp_path / "whole")


def test_disk_full_while_logging_metrics_is_a_clear_error(inputs, tmp_path, monkeypatch):
    """ENOSPC while appending to metrics.jsonl: exit 2 with the path and what to do, no traceback; the last
    checkpoint stays good, and the same command resumes once there is space."""
    import errno
    import pathlib

    real_open = pathlib.Path.open
    full = {"on": False}

    def open_(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and "a" in mode and full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        if self.name == "metrics.jsonl" and "a" in mode and _steps_logged(self.parent) >= 4:
            full["on"] = True  # the disk fills up after step 4 was logged
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", open_)
    out = tmp_path / "rm"
    code, _, err = _cli(rm_argv(inputs, out, "--max-steps", "8"))
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert "disk full while writing" in err and str(out) in err and "run the same command again" in err
    assert CheckpointManager(out).latest() is not None
    monkeypatch.undo()
    code, _, err = _cli(rm_argv(inputs, out, "--max-steps", "8"))
    assert code == 0, err[-3000:]


def test_diverged_run_exits_3_with_a_message_naming_the_step(inputs, tmp_path):
    code, _, err = _cli(rm_argv(inputs, tmp_path / "rm", "--learning-rate", "1e30", "--max-steps", "12"))
    assert code == 3, err[-2000:]
    assert "perlhf: training stopped: training diverged at step" in err
    assert "Traceback" not in err
    assert CheckpointManager(tmp_path / "rm").latest() is not None


def test_resume_after_divergence_uses_the_lowered_learning_rate(inputs, tmp_path):
    """The divergence message says: lower the learning rate, then resume. The lower rate must then be used (and
    training_config.yaml must not claim a rate that was never used)."""
    import yaml

    out = tmp_path / "rm"
    common = ["--lr-scheduler-type", "constant", "--warmup-ratio", "0"]
    code, _, err = _cli(rm_argv(inputs, out, "--max-steps", "4", "--learning-rate", "1e-3", *common))
    assert code == 0, err[-2000:]
    code, _, err = _cli(rm_argv(inputs, out, "--max-steps", "6", "--learning-rate", "1e-5", *common))
    assert code == 0, err[-2000:]
    rates = {row["step"]: row["train/lr"] for row in _stable_metrics(out) if "train/lr" in row}
    assert rates[4] == pytest.approx(1e-3)
    assert rates[5] == pytest.approx(1e-5) and rates[6] == pytest.approx(1e-5), (
        f"the resumed run kept the checkpoint's learning rate: {rates}")
    assert yaml.safe_load((out / "training_config.yaml").read_text())["learning_rate"] == 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Crash debris: a torn last line in metrics.jsonl


def test_resume_survives_a_torn_last_metrics_line(tmp_path):
    """A crash (power loss, full disk) can leave metrics.jsonl ending in half a record; resuming must not crash on
    it, and the records up to the checkpoint must stay."""
    from perlhf.metrics import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/loss": 0.4}\n{"step": 3, "trai',
                    encoding="utf-8")
    logger = MetricsLogger(tmp_path, total_steps=10, start_step=2)
    logger.log(3, {"train/loss": 0.3})
    logger.close()
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# 5. An output directory that cannot be written: a clear error before training, no traceback


@pytest.mark.parametrize("trainer", ["rm", "rl"])
def test_unwritable_output_dir_is_refused_before_training(inputs, rm_reference, tmp_path, trainer):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = blocker / "run"
    argv = rm_argv(inputs, target) if trainer == "rm" else rl_argv(inputs, rm_reference, target)
    code, out, err = _cli(argv)
    assert code == 2
    assert f"perlhf: error: cannot write to {target}" in err and "Not a directory" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "perlhf: model " not in out  # refused before the model was loaded


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_dir_is_refused_before_training(inputs, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, err = _cli(rm_argv(inputs, parent / "run"))
    finally:
        parent.chmod(0o755)
    assert code == 2 and f"cannot write to {parent / 'run'}" in err and "Traceback" not in err
