"""What a busy machine costs perlhf: one workload timed alone and beside one busy single-threaded process, under
each CPU thread policy, in one run.

  python benchmarks/contention.py                        # a short `perlhf rm train`, ~6 min
  python benchmarks/contention.py --workload generate    # sampling as RL does it, ~6 min
  python benchmarks/contention.py --workload demo        # `perlhf demo --quick`, ~20 min

A fair share of 2 cores with one other busy process is about 1.5x the time alone (3 busy threads on 2 cores).
OpenMP's threads meet at a barrier after every parallel operation; a thread that spins there while the other
core runs someone else's work burns the time its sibling needs. Policies:

  spin      OMP_WAIT_POLICY=ACTIVE: threads spin at every barrier
  libgomp   libgomp's default (it spins a while, then sleeps)
  short spin  libgomp's default with GOMP_SPINCOUNT=10000 (its default is 300000)
  perlhf    the environment without OMP_WAIT_POLICY: perlhf's own choice (perlhf/__init__.py): PASSIVE when the
            machine is busy as it starts, libgomp's default otherwise
  passive   OMP_WAIT_POLICY=PASSIVE: threads sleep at once
  1 thread  OMP_NUM_THREADS=1

Each (policy, alone | contended) runs in a fresh process; the runs alternate to spread drift. Measure on an
otherwise quiet machine: the contender is the only other load.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, versions, write_report

ROOT = Path(__file__).resolve().parents[1]
# "libgomp": an empty OMP_WAIT_POLICY, which libgomp ignores (with a warning) and perlhf does not replace
POLICIES = {"perlhf": {}, "spin": {"OMP_WAIT_POLICY": "ACTIVE"}, "libgomp": {"OMP_WAIT_POLICY": ""},
            "short spin": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"},
            "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "1 thread": {"OMP_NUM_THREADS": "1"}}


GENERATE = """
from perlhf.models import load_model
from perlhf.rl.rollout import encode_prompts, generate
lm = load_model(device="cpu")
prompts = [[{"role": "user", "content": f"Tell me something about topic {i}, in a few sentences."}] for i in range(16)]
ids, _ = encode_prompts(lm.tokenizer, prompts, 64)
for _ in range(3):
    generate(lm.model, lm.tokenizer, ids, 48, 1.0, list(range(16)))
"""


def workload(kind: str, work: Path, steps: int) -> list[str]:
    if kind == "generate":  # RL's sampling: 3 x 16 prompts x 48 new tokens, many small operations per token
        return [sys.executable, "-c", GENERATE]
    if kind == "demo":
        return [sys.executable, "-m", "perlhf.cli", "demo", "--quick", "--output-dir", str(work / "demo")]
    pairs = work / "pairs.jsonl"
    if not pairs.exists():
        words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
        with pairs.open("w") as handle:
            for i in range(64):
                prompt = " ".join(words[(i + j) % len(words)] for j in range(80))
                handle.write(json.dumps({"prompt": prompt, "chosen": f"Sure, here is {i}.",
                                         "rejected": "No."}) + "\n")
    return [sys.executable, "-m", "perlhf.cli", "rm", "train", "--data", str(pairs), "--output-dir", str(work / "rm"),
            "--overwrite-output-dir", "--max-steps", str(steps), "--per-device-train-batch-size", "4",
            "--max-length", "128", "--eval-steps", "0", "--save-steps", str(steps), "--device", "cpu"]


def timed(command: list[str], env: dict, contended: bool) -> dict:
    contender = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if contended else None)
    time.sleep(2 if contended else 0)  # running before the workload starts, as a neighbour's job would be
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    finally:
        if contender:
            contender.kill()
            contender.wait()
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    said = next((line for line in done.stdout.splitlines() if "CPU threads" in line), "")
    return {"wall_s": wall, "said": said}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["rm", "generate", "demo"], default="rm")
    parser.add_argument("--steps", type=int, default=12, help="rm workload: optimizer steps")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "contention.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perlhf-contention-"))
    command = workload(args.workload, work, args.steps)
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
    load_before = os.getloadavg()
    rows = {}
    for contended in (False, True):
        for name in args.policies:
            print(f"{name}, {'beside one busy process' if contended else 'alone'} ...", flush=True)
            rows.setdefault(name, {})["contended" if contended else "alone"] = timed(
                command, {**base, **POLICIES[name]}, contended)
    table = ["| policy | alone (s) | beside one busy process (s) | slowdown | fair share |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        r["slowdown"] = r["contended"]["wall_s"] / r["alone"]["wall_s"]
        table.append(f"| {name} | {r['alone']['wall_s']:.0f} | {r['contended']['wall_s']:.0f} | {r['slowdown']:.2f}x | "
                     "~1.5x |")
    report = {"command": shlex.join(["python", *sys.argv]), "workload": shlex.join(command), "machine": machine(),
              "versions": versions(), "load_average_before": load_before, "rows": rows}
    what = "generate 3 x 16 prompts x 48 tokens" if args.workload == "generate" else " ".join(command[2:6]) + " ..."
    text = "\n".join([f"`{report['command']}` (workload: `{what}`)", ""] + table) + "\n"
    print(text)
    write_report(Path(args.out), report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
