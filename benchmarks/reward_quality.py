"""Reward-model quality on real preference data (../shared/data): the recipe comparison behind `rm train`'s
defaults, with several seeds per recipe.

  python benchmarks/reward_quality.py --recipes defaults paper full --seeds 1 2 3 --jobs 2
  python benchmarks/reward_quality.py --table          # the table from the runs already made

Each (recipe, seed) is one `train_reward_model` run in its own single-threaded process (`--jobs` of them side by
side: accuracy does not depend on timing), at one budget: `--steps` optimizer steps of `--batch` pairs at
`--max-length` tokens. HH-RLHF harmless recipes are scored on their validation split (at half the budget and at the end:
the curve) and, out of distribution, on PandaLM's human-voted pairs (majority vote, ties skipped), next to the
prefer-the-shorter baseline. Taskmaster recipes are pointwise (thumbs up/down): ROC-AUC and accuracy next to the
majority baseline. A run's figures are kept in RESULTS/RECIPE-sSEED.json (committed, so later sessions add seeds to
them; the checkpoints stay in RUNS) and reused; the table shows means with 95% t-intervals over seeds. Skips what is
absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH = SHARED / "hh-rlhf-harmless/pairs.jsonl.gz"
TASKMASTER = SHARED / "taskmaster-coffee"
PANDALM = SHARED / "pandalm/testset-v1.json"
PANDALM_COLUMNS = {"prompt": "instruction", "input": "input", "response_a": "response1", "response_b": "response2",
                   "votes": "annotator1,annotator2,annotator3"}

# recipe -> (data, RewardConfig fields). "defaults" is whatever `perlhf rm train` does with no flags.
RECIPES: dict[str, tuple[Path, dict]] = {
    "defaults": (HH, {}),
    "paper": (HH, {"lora_target": "attention"}),  # the PERL paper's attention-only LoRA: one flag from the defaults
    "previous-defaults": (HH, {"lora_target": "attention", "lora_rank": 8, "lora_alpha": 16.0, "learning_rate": 2e-4}),
    "full": (HH, {"full": True}),
    "defaults-4bit": (HH, {"quantize": "4bit"}),  # the same recipe on a 4-bit frozen base
    "defaults-unshared": (HH, {"share_prefix": False}),  # prefix sharing off: the accuracy must not change
    "full-lr3e-5": (HH, {"full": True, "learning_rate": 3e-5}),
    "all-r16-lr2e-4": (HH, {"lora_target": "all-linear", "lora_rank": 16, "lora_alpha": 32.0, "learning_rate": 2e-4}),
    "all-r16-lr5e-4": (HH, {"lora_target": "all-linear", "lora_rank": 16, "lora_alpha": 32.0, "learning_rate": 5e-4}),
    "all-r16-lr5e-4-head5e-3": (HH, {"lora_target": "all-linear", "lora_rank": 16, "lora_alpha": 32.0,
                                     "learning_rate": 5e-4, "head_learning_rate": 5e-3}),
    "all-r16-lr1e-3": (HH, {"lora_target": "all-linear", "lora_rank": 16, "lora_alpha": 32.0, "learning_rate": 1e-3}),
    "attn-r8-lr1e-3": (HH, {"lora_target": "attention", "lora_rank": 8, "lora_alpha": 16.0, "learning_rate": 1e-3}),
    "taskmaster-defaults": (TASKMASTER, {}),
    "taskmaster-previous-defaults": (TASKMASTER, {"lora_target": "attention", "lora_rank": 8, "lora_alpha": 16.0,
                                                  "learning_rate": 2e-4}),
    "taskmaster-balanced": (TASKMASTER, {"balance_classes": True}),
    "taskmaster-balanced-120-steps": (TASKMASTER, {"balance_classes": True, "max_steps": 120}),
    "taskmaster-balanced-lr1e-4": (TASKMASTER, {"balance_classes": True, "learning_rate": 1e-4}),
}
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_config(recipe: str, seed: int, args):
    from perlhf.reward import RewardConfig

    data, fields = RECIPES[recipe]
    pointwise = data == TASKMASTER
    steps = fields.get("max_steps", args.pointwise_steps if pointwise else args.steps)
    # pointwise runs are short, so their curve is sampled finely: ROC-AUC moves a lot between evaluations
    eval_steps = args.pointwise_eval_steps if pointwise else max(1, steps // 2)
    options = dict(data=str(data), output_dir=str(Path(args.runs) / f"{recipe}-s{seed}"), max_steps=steps,
                   per_device_train_batch_size=args.batch, max_length=args.max_length, eval_steps=eval_steps,
                   save_steps=steps, seed=seed, device="cpu", overwrite_output_dir=True,
                   logging_steps=max(1, steps // 10))
    return RewardConfig(**{**options, **fields})


def config_key(config) -> str:
    """What decides a run's result: every option but where it is written."""
    import dataclasses

    options = {k: v for k, v in dataclasses.asdict(config).items() if k != "output_dir"}
    return json.dumps({**options, "learning_rate": config.lr}, sort_keys=True)  # the default resolved


def same_run(recipe: str, seed: int, args) -> dict | None:
    """A result already made with exactly this recipe's resolved options under another name (such as
    "defaults" and the sweep recipe it was chosen from): the same run, so it is reused, and said so."""
    import dataclasses

    config = run_config(recipe, seed, args)
    key = json.loads(config_key(config))
    defaults = {f.name: f.default for f in dataclasses.fields(config)}  # options added since a result was made
    for path in Path(args.results).glob(f"*-s{seed}.json"):
        result = json.loads(path.read_text())
        made = json.loads(result.get("config_key", "null")) or {}
        if made and all(made.get(name, defaults.get(name)) == value for name, value in key.items()):
            return {**result, "recipe": recipe, "fields": RECIPES[recipe][1], "same_run_as": result["recipe"]}
    return None


def one_run(recipe: str, seed: int, args) -> dict:
    """Train one recipe at one seed in this process; returns its figures (also written to RESULTS)."""
    import torch

    from perlhf.reward import train_reward_model

    torch.set_num_threads(1)
    data, fields = RECIPES[recipe]
    config = run_config(recipe, seed, args)
    run_dir = Path(config.output_dir)
    pointwise = data == TASKMASTER
    finished = run_dir / "eval_results.json"
    if finished.exists() and json.loads(finished.read_text()).get("steps") == config.max_steps:
        summary = json.loads(finished.read_text())  # trained already; only the scoring below was left to do
    else:
        summary = train_reward_model(config)
    curve = [{"step": row["step"], "accuracy": row.get("eval/accuracy"), "roc_auc": row.get("eval/roc_auc")}
             for row in _read_metrics(run_dir) if "eval/accuracy" in row]
    result = {"recipe": recipe, "seed": seed, "fields": fields, "config_key": config_key(config),
              "final": summary["final"], "curve": curve,
              "steps": summary["steps"], "examples_seen": summary["steps"] * args.batch,
              "tokens_per_second": summary["tokens_per_second"], "peak_memory_mb": summary["peak_memory_mb"],
              "trainable_parameters": summary["trainable_parameters"],
              "train_examples": summary["train_examples"], "validation_examples": summary["validation_examples"]}
    if not pointwise and PANDALM.exists():
        result["pandalm"] = out_of_distribution(run_dir, args.max_length, args.pandalm_pairs)
    result_file(args, recipe, seed).parent.mkdir(parents=True, exist_ok=True)
    result_file(args, recipe, seed).write_text(json.dumps(result, indent=2) + "\n")
    return result


def result_file(args, recipe: str, seed: int) -> Path:
    return Path(args.results) / f"{recipe}-s{seed}.json"


def out_of_distribution(run_dir: Path, max_length: int, pairs: int) -> dict:
    """The trained reward model's accuracy on PandaLM's voted pairs (another distribution, never trained on): the
    same `pairs` of them for every run, drawn with a fixed seed."""
    import random

    from perlhf.data import load_preferences
    from perlhf.reward import encode_records, evaluate, load_reward_model

    reward = load_reward_model(run_dir, device="cpu", verbose=False)
    records, report = load_preferences(str(PANDALM), columns=PANDALM_COLUMNS)
    records = random.Random(0).sample(records, min(pairs, len(records)))
    encoded, _ = encode_records(records, reward.tokenizer, max_length)
    metrics = evaluate(reward, encoded, reward.tokenizer.pad_token_id, 16)
    return {"accuracy": metrics["eval/accuracy"], "shorter_baseline": metrics["eval/shorter_baseline"],
            "pairs": metrics["eval/examples"], "skipped": report.summary()}


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_95.get(n - 1, 1.96) * sd / math.sqrt(n)


def table(results_dir: Path, recipes: list[str]) -> tuple[str, dict]:
    results: dict[str, list[dict]] = {}
    for path in sorted(results_dir.glob("*-s*.json")):
        result = json.loads(path.read_text())
        if result["recipe"] in recipes:
            results.setdefault(result["recipe"], []).append(result)

    def cell(values: list[float], percent: bool = True) -> str:
        if not values:
            return "-"
        mean, half = mean_interval(values)
        scale, digits = (100, 1) if percent else (1, 3)
        return f"{scale * mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {scale * half:.{digits}f}")

    rows = ["| recipe | settings | seeds | validation accuracy (%) | shorter baseline (%) | PandaLM accuracy (%) "
            "| ROC-AUC | majority baseline (%) | steps x batch | tokens/s | peak MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    aggregate = {}
    for recipe in recipes:
        if recipe not in results:
            continue
        rs = results[recipe]
        final = [r["final"] for r in rs]
        pandalm = [r["pandalm"]["accuracy"] for r in rs if "pandalm" in r]
        settings = ", ".join(f"{k}={v}" for k, v in rs[0]["fields"].items()) or "no flags"
        aggregate[recipe] = {"seeds": [r["seed"] for r in rs],
                             "accuracy": mean_interval([f["eval/accuracy"] for f in final]),
                             "pandalm": mean_interval(pandalm) if pandalm else None,
                             "roc_auc": mean_interval([f["eval/roc_auc"] for f in final]) if "eval/roc_auc" in final[0] else None}
        rows.append(" | ".join([
            f"| {recipe}", settings, str(len(rs)), cell([f["eval/accuracy"] for f in final]),
            cell([f["eval/shorter_baseline"] for f in final if "eval/shorter_baseline" in f]), cell(pandalm),
            cell([f["eval/roc_auc"] for f in final if "eval/roc_auc" in f], percent=False),
            cell([f["eval/majority_baseline"] for f in final if "eval/majority_baseline" in f]),
            f"{rs[0]['steps']} x {rs[0]['examples_seen'] // rs[0]['steps']}",
            f"{sum(r['tokens_per_second'] for r in rs) / len(rs):.0f}",
            f"{max(r['peak_memory_mb'] for r in rs):.0f} |"]))
    pairs = {k: v for k, v in results.items() if "eval/roc_auc" not in v[0]["final"]}
    pointwise = {k: v for k, v in results.items() if k not in pairs}
    curves = _curve_table(pairs, recipes, "accuracy", "Validation accuracy (%) against steps, mean over seeds:", 100)
    curves += _curve_table(pointwise, recipes, "roc_auc", "Taskmaster: validation ROC-AUC against steps, mean over "
                           "seeds:", 1)
    return "\n".join(rows + curves), aggregate


def _curve_table(results: dict, recipes: list[str], key: str, title: str, scale: float) -> list[str]:
    if not results:
        return []
    steps = _steps(results)
    lines = ["", title, "", "| recipe | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for recipe in recipes:
        if recipe in results:
            by_step = {}
            for r in results[recipe]:
                for point in r["curve"]:
                    by_step.setdefault(point["step"], []).append(point[key])
            digits = 1 if scale == 100 else 3
            lines.append(f"| {recipe} | " + " | ".join(
                f"{scale * sum(by_step[s]) / len(by_step[s]):.{digits}f}" if s in by_step else "-" for s in steps) + " |")
    return lines


def _steps(results: dict) -> list[int]:
    return sorted({p["step"] for rs in results.values() for r in rs for p in r["curve"]})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", nargs="*", default=["defaults", "paper", "full", "taskmaster-defaults",
                                                          "taskmaster-previous-defaults"], choices=sorted(RECIPES))
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--pointwise-steps", type=int, default=60, help="steps for Taskmaster (60 x 8 = 480 ratings)")
    parser.add_argument("--pointwise-eval-steps", type=int, default=10, help="Taskmaster's evaluation interval")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--pandalm-pairs", type=int, default=400, help="PandaLM pairs scored (a fixed sample)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--runs", default="runs/reward_quality")
    parser.add_argument("--results", default="benchmarks/results/reward_quality_runs", help="one JSON per run")
    parser.add_argument("--rerun", action="store_true", help="train again even where its result exists")
    parser.add_argument("--table", action="store_true", help="only print the table of the runs already made")
    parser.add_argument("--one", nargs=2, metavar=("RECIPE", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/reward_quality")
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"skipped: {SHARED} is absent")
        return 0
    if args.one:
        one_run(args.one[0], int(args.one[1]), args)
        return 0
    runs = Path(args.runs)
    if not args.table:
        todo = []
        for recipe, seed in [(r, s) for s in args.seeds for r in args.recipes]:
            if not args.rerun and result_file(args, recipe, seed).exists():
                continue
            reused = None if args.rerun else same_run(recipe, seed, args)
            if reused:
                result_file(args, recipe, seed).write_text(json.dumps(reused, indent=2) + "\n")
                print(f"{recipe} seed {seed}: the same run as {reused['same_run_as']} seed {seed}", flush=True)
            else:
                todo.append((recipe, seed))
        passed = [a for a in sys.argv[1:] if a not in ("--rerun",)]

        def launch(job):
            recipe, seed = job
            log = runs / f"{recipe}-s{seed}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            with log.open("w") as handle:
                code = subprocess.call([sys.executable, __file__, *passed, "--one", recipe, str(seed)],
                                       stdout=handle, stderr=subprocess.STDOUT, env=env)
            print(f"{recipe} seed {seed}: {'done' if code == 0 else f'FAILED ({code}), see {log}'}", flush=True)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(launch, todo))
    text, aggregate = table(Path(args.results), args.recipes)
    command = "python benchmarks/reward_quality.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"`{command}`\n\n{text}\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "recipes": aggregate}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
