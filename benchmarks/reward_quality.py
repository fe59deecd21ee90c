"""Reward-model quality on real preference data (../shared/data), the README's results table.

  python benchmarks/reward_quality.py [--steps 60] [--out benchmarks/results/reward_quality.json]

Runs, with the same budget each: a LoRA and a full-tuned reward model on HH-RLHF harmless pairs (validation
accuracy next to the prefer-the-shorter baseline), and a pointwise LoRA reward model on the Taskmaster coffee
ratings (accuracy and ROC-AUC next to the majority-class baseline). Skips what is absent.
"""

import argparse
import json
import sys
from pathlib import Path

from perlhf.reward import RewardConfig, train_reward_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--limit", type=int, default=1000, help="records read from each dataset")
    parser.add_argument("--runs", default="runs/reward_quality")
    parser.add_argument("--only", nargs="*", default=["hh-lora", "hh-full", "taskmaster-lora"])
    parser.add_argument("--out", default="benchmarks/results/reward_quality.json")
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"skipped: {SHARED} is absent")
        return 0
    common = dict(max_steps=args.steps, per_device_train_batch_size=args.batch, max_length=args.max_length,
                  limit=args.limit, eval_steps=max(1, args.steps // 2), save_steps=args.steps, seed=0,
                  overwrite_output_dir=True)
    runs = {
        "hh-lora": RewardConfig(data=str(SHARED / "hh-rlhf-harmless/pairs.jsonl.gz"), output_dir=f"{args.runs}/hh-lora", **common),
        "hh-full": RewardConfig(data=str(SHARED / "hh-rlhf-harmless/pairs.jsonl.gz"), output_dir=f"{args.runs}/hh-full",
                                full=True, **common),
        "taskmaster-lora": RewardConfig(data=str(SHARED / "taskmaster-coffee"), output_dir=f"{args.runs}/taskmaster-lora",
                                        **{**common, "limit": 3228}),
    }
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.only:
        summary = train_reward_model(runs[name])
        results[name] = {"final": summary["final"], "best": summary["best"], "steps": summary["steps"],
                         "tokens_per_second": summary["tokens_per_second"], "peak_memory_mb": summary["peak_memory_mb"],
                         "train_examples": summary["train_examples"], "validation_examples": summary["validation_examples"],
                         "command": " ".join(sys.argv)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
