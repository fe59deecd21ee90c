"""Fault injection: kill real training runs at many moments, resume them, and check that nothing was lost.

    python benchmarks/fault_injection.py [--rm-kills 10] [--rl-kills 7] [--rl-algorithms reinforce,rloo,ppo] [--seed 0]

For the reward model trainer (`perlhf rm train`) and the RL trainer (`perlhf rl train`, each algorithm named) on a
tiny random model: one uninterrupted run, then for each kill point a fresh run that is stopped by

  sigkill-random      SIGKILL after a random delay from the start (start-up included)
  sigkill-training    SIGKILL a random moment after the first checkpoint appeared (mid-training)
  sigkill-save        SIGKILL the moment a checkpoint's temporary directory appears (mid-save)
  sigkill-final       SIGKILL the moment the final adapter file appears (mid final write)
  sigterm / sigint    a polite stop mid-training: must save, exit 0 and say how to resume
  double              two SIGKILLs: one mid-training, one mid-save of the resumed run

then re-run with the same command until it exits 0. The resumed run's final adapter tensors must be BITWISE equal
(torch.equal on every safetensors key) to the uninterrupted run's, and its metrics.jsonl must hold the same steps
(none duplicated, none missing) with the same deterministic values. Prints the counts table and writes it to
benchmarks/results/fault_injection.json.

Counts: trials (fresh runs in which at least one stop landed; each ends in one resumed run that is compared), kill
points tried (stops that landed before the run finished; "double" trials have two), resumed runs matching the
uninterrupted run, mismatches (weights or metrics differ), crashes (a non-zero exit that is not the injected kill,
or a polite stop that did not exit 0), missed (the run finished before the stop landed; not counted as tried).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

STRATEGIES = ("sigkill-random", "sigkill-training", "sigkill-save", "sigkill-final", "sigterm", "sigint", "double")
# Metrics that measure the machine, not the run: they may differ between a resumed and an uninterrupted run.
UNSTABLE = ("time/", "perf/", "memory/")


def make_inputs(root: Path) -> dict:
    """A tiny random llama, ~100 explicit preference pairs, 24 prompts."""
    from conftest import make_tokenizer, save_tiny_model, write_resume_inputs

    root.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model("llama", root / "tiny", make_tokenizer())
    return {"model": model, **write_resume_inputs(root)}


def rm_command(inputs: dict, out: Path, max_steps: int = 20) -> list[str]:
    return [sys.executable, "-m", "perlhf.cli", "rm", "train", "--model", inputs["model"], "--data", inputs["pairs"],
            "--output-dir", str(out), "--max-steps", str(max_steps), "--save-steps", "2",
            "--per-device-train-batch-size", "4", "--eval-steps", "0", "--learning-rate", "1e-3",
            "--lora-dropout", "0.1", "--logging-steps", "1", "--device", "cpu"]


def rl_command(inputs: dict, reward_model: str, out: Path, algorithm: str, max_steps: int = 8) -> list[str]:
    return [sys.executable, "-m", "perlhf.cli", "rl", "train", "--model", inputs["model"], "--reward-model",
            reward_model, "--prompts", inputs["prompts"], "--output-dir", str(out), "--max-steps", str(max_steps),
            "--batch-size", "4", "--max-new-tokens", "8", "--save-steps", "1", "--algorithm", algorithm,
            "--device", "cpu"]


# ---------------------------------------------------------------------------------------------------------------
# Running and stopping


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    stopped: bool          # the stop landed while the run was still going
    seconds: float


def _entries(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def run(command: list[str], out: Path, stop: str | None = None, rng: random.Random | None = None,
        delay: tuple[float, float] = (0.5, 6.0), timeout: float = 300) -> Outcome:
    """Run the command; with `stop`, deliver that fault at the moment the strategy picks."""
    from conftest import resume_run_env  # tests/conftest.py imports torch: not at this parent's start-up
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        child = subprocess.Popen(command, stdout=out_file, stderr=err_file, env=resume_run_env(REPO), cwd=str(REPO),
                                 text=True)
        stopped = False
        try:
            if stop is not None:
                stopped = _deliver(child, out, stop, rng or random.Random(), delay, started + timeout)
            child.wait(timeout=max(1.0, started + timeout - time.monotonic()))
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        out_file.seek(0)
        err_file.seek(0)
        return Outcome(child.returncode, out_file.read(), err_file.read(), stopped, time.monotonic() - started)


def _deliver(child: subprocess.Popen, out: Path, stop: str, rng: random.Random, delay: tuple[float, float],
             deadline: float) -> bool:
    """Wait for the strategy's moment and send its signal; False when the run ended first."""
    begun = time.monotonic()
    checkpoints = out / "checkpoints"
    sig = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}.get(stop, signal.SIGKILL)

    def wait_for(condition, poll: float = 0.0005) -> bool:
        while child.poll() is None and time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(poll)
        return False

    if stop == "sigkill-random":
        pause = rng.uniform(*delay)
        if not wait_for(lambda: time.monotonic() >= begun + pause, 0.005):
            return False
    elif stop in ("sigkill-training", "sigterm", "sigint"):
        existing = set(n for n in _entries(checkpoints) if n.startswith("step-"))
        if not wait_for(lambda: any(n.startswith("step-") and n not in existing for n in _entries(checkpoints)),
                        0.002):
            return False
        seen_at, pause = time.monotonic(), rng.uniform(0.0, 0.6)
        if not wait_for(lambda: time.monotonic() >= seen_at + pause, 0.002):
            return False
    elif stop == "sigkill-save":
        skip = rng.randint(0, 3)  # kill in the save of the 1st..4th checkpoint this run writes
        seen: set[str] = set()

        def saving() -> bool:
            tmp = [n for n in _entries(checkpoints) if n.startswith(".tmp-")]
            seen.update(tmp)
            return bool(tmp) and len(seen) > skip
        if not wait_for(saving, 0.0002):
            return False
    elif stop == "sigkill-final":
        targets = [out / "adapter_model.safetensors", out / "policy"]
        if not wait_for(lambda: any(t.exists() for t in targets), 0.0002):
            return False
    else:
        raise ValueError(stop)
    if child.poll() is not None:
        return False
    child.send_signal(sig)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Comparing


def adapters_equal(kind: str, out: Path, reference: Path) -> tuple[bool, str]:
    import torch
    from safetensors.torch import load_file

    for ref in (reference / "adapter_model.safetensors",) if kind == "rm" else (
            reference / "policy" / "adapter_model.safetensors", reference / "value" / "adapter_model.safetensors"):
        if not ref.exists():
            continue
        got = out / ref.relative_to(reference)
        if not got.exists():
            return False, f"{got} missing"
        a, b = load_file(str(ref)), load_file(str(got))
        if set(a) != set(b):
            return False, f"{got}: keys differ"
        for key in a:
            if not torch.equal(a[key], b[key]):
                return False, f"{got}: {key} differs (max |diff| {(a[key] - b[key]).abs().max().item():.3g})"
    return True, ""


def stable_metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith(UNSTABLE) and "tokens_per_second" not in k}
            for row in rows]


def metrics_equal(out: Path, reference: Path) -> tuple[bool, str]:
    ref, got = stable_metrics(reference / "metrics.jsonl"), stable_metrics(out / "metrics.jsonl")
    ref_steps, got_steps = [r["step"] for r in ref], [r["step"] for r in got]
    if ref_steps != got_steps:
        return False, f"metrics steps {got_steps} != uninterrupted {ref_steps}"
    for a, b in zip(ref, got):
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            return False, f"metrics at step {a['step']} differ in {diff}"
    return True, ""


# ---------------------------------------------------------------------------------------------------------------
# Trials


@dataclass
class Tally:
    name: str
    trials: int = 0        # trials in which at least one stop landed (each ends in one resumed, compared run)
    kill_points: int = 0
    matched: int = 0
    mismatched: int = 0
    crashes: int = 0
    missed: int = 0
    resumes: int = 0
    mid_save_confirmed: int = 0   # sigkill-save kills after which the unfinished save's directory was on disk
    resumed_from: list = field(default_factory=list)  # the step each resume started from (0: from scratch)
    by_strategy: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    seconds: float = 0.0


def trial(kind: str, command: list[str], out: Path, reference: Path, strategy: str, rng: random.Random,
          tally: Tally, delay: tuple[float, float]) -> None:
    plan = ["sigkill-training", "sigkill-save"] if strategy == "double" else [strategy]
    landed = 0
    problems = []
    for stop in plan:
        outcome = run(command, out, stop, rng, delay=delay)
        if not outcome.stopped:
            if outcome.returncode != 0:
                tally.crashes += 1
                problems.append(f"{stop}: run exited {outcome.returncode} before the stop: {outcome.stderr[-400:]}")
            continue
        landed += 1
        if stop == "sigkill-save" and any(n.startswith(".tmp-") for n in _entries(out / "checkpoints")):
            tally.mid_save_confirmed += 1
        if stop in ("sigterm", "sigint"):
            if outcome.returncode != 0 or "Re-run the same command to resume" not in outcome.stdout:
                # A stop that lands before the handler is installed (start-up) ends the process; that is allowed
                # (nothing to save yet) only if no checkpoint was written yet.
                tally.crashes += 1
                problems.append(f"{stop}: exit {outcome.returncode}, stdout tail {outcome.stdout[-200:]!r}, "
                                f"stderr tail {outcome.stderr[-400:]!r}")
        elif outcome.returncode != -signal.SIGKILL:
            tally.crashes += 1
            problems.append(f"{stop}: exit {outcome.returncode} instead of the kill: {outcome.stderr[-400:]}")
    tally.kill_points += landed
    tally.trials += landed > 0
    if landed == 0:
        tally.missed += 1
    for _ in range(5):
        outcome = run(command, out)
        tally.resumes += 1
        found = re.search(r"resuming .* from (?:step|iteration) (\d+)", outcome.stdout)
        tally.resumed_from.append(int(found[1]) if found else 0)
        if outcome.returncode == 0:
            break
        tally.crashes += 1
        problems.append(f"resume exited {outcome.returncode}: {outcome.stderr[-600:]}")
    else:
        tally.mismatched += 1
        tally.failures.append({"strategy": strategy, "problems": problems})
        return
    same_weights, why_w = adapters_equal(kind, out, reference)
    same_metrics, why_m = metrics_equal(out, reference)
    entry = tally.by_strategy.setdefault(strategy, {"tried": 0, "matched": 0})
    entry["tried"] += landed
    if landed:
        if same_weights and same_metrics:
            tally.matched += 1
            entry["matched"] += 1
        else:
            tally.mismatched += 1
            problems += [why for why in (why_w, why_m) if why]
    if problems:
        tally.failures.append({"strategy": strategy, "problems": problems})


def campaign(kind: str, name: str, make_command, root: Path, kills: int, rng: random.Random,
             delay: tuple[float, float]) -> Tally:
    tally = Tally(name)
    started = time.monotonic()
    reference = root / f"{name}-reference"
    outcome = run(make_command(reference), reference)
    if outcome.returncode != 0:
        raise SystemExit(f"{name}: the uninterrupted run failed:\n{outcome.stderr[-3000:]}")
    order = list(STRATEGIES)
    for index in range(kills):
        strategy = order[index % len(order)]
        out = root / f"{name}-trial-{index:02d}"
        trial(kind, make_command(out), out, reference, strategy, rng, tally, delay)
        print(f"  {name} #{index + 1} {strategy:17s} tried {tally.kill_points} matched {tally.matched} "
              f"mismatched {tally.mismatched} crashes {tally.crashes}", flush=True)
    tally.seconds = time.monotonic() - started
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rm-kills", type=int, default=10, help="reward-model kill trials")
    parser.add_argument("--rl-kills", type=int, default=7, help="RL kill trials per algorithm")
    parser.add_argument("--rl-algorithms", default="reinforce,rloo,ppo", help="comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "fault_injection.json"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="perlhf-faults-") as scratch:
        root = Path(args.workdir or scratch)
        inputs = make_inputs(root / "inputs")
        tallies = []
        if args.rm_kills:
            print(f"reward model: {args.rm_kills} kill trials", flush=True)
            tallies.append(campaign("rm", "rm", lambda out: rm_command(inputs, out), root, args.rm_kills, rng,
                                    (0.5, 8.0)))
        algorithms = [a for a in args.rl_algorithms.split(",") if a] if args.rl_kills else []
        if algorithms:
            reward_model = root / "rl-reward-model"
            outcome = run(rm_command(inputs, reward_model, max_steps=10), reward_model)
            if outcome.returncode != 0:
                raise SystemExit(f"the reward model for RL failed:\n{outcome.stderr[-3000:]}")
        for algorithm in algorithms:
            print(f"RL {algorithm}: {args.rl_kills} kill trials", flush=True)
            tallies.append(campaign("rl", f"rl-{algorithm}",
                                    lambda out, a=algorithm: rl_command(inputs, str(reward_model), out, a),
                                    root, args.rl_kills, rng, (0.5, 7.0)))
    rows = [{"trainer": t.name, "trials": t.trials, "kill_points_tried": t.kill_points, "resumed_runs_matching": t.matched,
             "mismatches": t.mismatched, "crashes": t.crashes, "missed": t.missed, "resume_runs": t.resumes,
             "mid_save_kills_confirmed": t.mid_save_confirmed, "resumed_from_steps": t.resumed_from,
             "seconds": round(t.seconds, 1), "by_strategy": t.by_strategy, "failures": t.failures} for t in tallies]
    total = {"trials": sum(r["trials"] for r in rows),
             "kill_points_tried": sum(r["kill_points_tried"] for r in rows),
             "resumed_runs_matching": sum(r["resumed_runs_matching"] for r in rows),
             "mismatches": sum(r["mismatches"] for r in rows), "crashes": sum(r["crashes"] for r in rows),
             "seconds": round(time.monotonic() - started, 1)}
    print()
    print(f"{'trainer':14s} {'trials':>6s} {'kill points':>11s} {'matching':>9s} {'mismatch':>9s} {'crashes':>8s} {'missed':>7s} "
          f"{'seconds':>8s}")
    for r in rows:
        print(f"{r['trainer']:14s} {r['trials']:6d} {r['kill_points_tried']:11d} {r['resumed_runs_matching']:9d} {r['mismatches']:9d} "
              f"{r['crashes']:8d} {r['missed']:7d} {r['seconds']:8.1f}")
    print(f"{'total':14s} {total['trials']:6d} {total['kill_points_tried']:11d} {total['resumed_runs_matching']:9d} "
          f"{total['mismatches']:9d} {total['crashes']:8d} {'':7s} {total['seconds']:8.1f}")
    for r in rows:
        for failure in r["failures"]:
            print(f"\n{r['trainer']} {failure['strategy']}:\n  " + "\n  ".join(failure["problems"]))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"args": vars(args), "total": total, "trainers": rows}, indent=2) + "\n",
                      encoding="utf-8")
    print(f"\nwritten to {output}")
    return 0 if total["mismatches"] == 0 and total["crashes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
