"""RL on real preference data: HH-RLHF harmless prompts, a LoRA reward model trained on them, and an
independent judge (a second LoRA reward model trained on a disjoint part of the data).

  python benchmarks/hh_rl.py [--rm-steps 40] [--rl-steps 20]

The records of ../shared/data/hh-rlhf-harmless are cut into four disjoint parts: A trains the reward model
that RL optimises, B trains the judge, C gives the RL prompts, D the held-out evaluation prompts. The result
is the policy's win rate against the anchor under both, with 95% intervals (evaluation.json in the run dir).
"""

import argparse
import gzip
import json
import sys
from pathlib import Path

from perlhf.evaluate import EvalConfig, describe, evaluate_policy
from perlhf.reward import RewardConfig, train_reward_model
from perlhf.rl.trainer import RLConfig, train_policy

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", type=int, default=600, help="records in each reward-model part")
    parser.add_argument("--rm-steps", type=int, default=40)
    parser.add_argument("--rm-learning-rate", type=float, default=5e-4)
    parser.add_argument("--rl-steps", type=int, default=20)
    parser.add_argument("--rl-learning-rate", type=float, default=5e-4)
    parser.add_argument("--eval-prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--runs", default="runs/hh_rl")
    parser.add_argument("--out", default="benchmarks/results/hh_rl.json")
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"skipped: {SHARED} is absent")
        return 0
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(SHARED, "rt", encoding="utf-8").read().splitlines()
    parts = {"A": lines[:args.part], "B": lines[args.part:2 * args.part], "C": lines[2 * args.part:-args.eval_prompts],
             "D": lines[-args.eval_prompts:]}
    for name, part in parts.items():
        (runs / f"part_{name}.jsonl").write_text("\n".join(part) + "\n", encoding="utf-8")

    common = dict(max_steps=args.rm_steps, per_device_train_batch_size=8, max_length=128, eval_steps=0,
                  learning_rate=args.rm_learning_rate,
                  save_steps=args.rm_steps, seed=0)
    results = {"command": " ".join(sys.argv)}
    for name, part in (("reward_model", "A"), ("judge", "B")):
        if not (runs / name / "eval_results.json").exists():
            train_reward_model(RewardConfig(data=str(runs / f"part_{part}.jsonl"), output_dir=str(runs / name), **common))
        results[name] = json.loads((runs / name / "eval_results.json").read_text())["final"]
    train_policy(RLConfig(reward_model=str(runs / "reward_model"), prompts=str(runs / "part_C.jsonl"),
                          output_dir=str(runs / "policy_run"), algorithm="reinforce", max_steps=args.rl_steps,
                          batch_size=8, max_new_tokens=args.max_new_tokens, max_prompt_length=160,
                          learning_rate=args.rl_learning_rate, value_learning_rate=args.rl_learning_rate,
                          save_steps=args.rl_steps, seed=0))
    evaluation = evaluate_policy(EvalConfig(policy=str(runs / "policy_run"), prompts=str(runs / "part_D.jsonl"),
                                            judges=[str(runs / "judge")], num_prompts=args.eval_prompts,
                                            max_new_tokens=args.max_new_tokens, max_prompt_length=160))
    print(describe(evaluation))
    results["evaluation"] = {k: v for k, v in evaluation.items() if k != "output_dir"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
