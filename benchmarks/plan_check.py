"""`perlhf plan` against measured peaks: each configuration trains in its own process, and its peak RSS (minus the
process's RSS once torch, transformers and perlhf are imported) is set beside the plan's prediction.

  python benchmarks/plan_check.py [--out benchmarks/results/plan_check]   # ~15 min on 2 shared CPU cores

Data are synthetic pairs whose every example is cut to exactly --max-length tokens, so the run has the shape the
plan assumes. On CPU the peak is the kernel's high-water mark of resident memory (ru_maxrss). Each run returns
freed memory to the system (`perlhf.models.return_freed_memory`, what the trainers do when memory is tight);
`--glibc-default` measures with glibc's own policy instead, whose heap keeps freed activations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "rm lora": ("rm", {}),
    "rm lora, checkpointing": ("rm", {"gradient_checkpointing": True}),
    "rm lora, 4bit": ("rm", {"quantize": "4bit"}),
    "rm full": ("rm", {"full": True}),
    # RL with checkpointing, as these rows were measured (RL's default then; now the plan decides, as for rm)
    "rl reinforce": ("rl", {"gradient_checkpointing": True}),
    "rl reinforce, 4bit": ("rl", {"quantize": "4bit", "gradient_checkpointing": True}),
}


def child(name: str, root: Path, args) -> dict:
    import resource

    import torch

    from perlhf import plan as planning
    from perlhf.reward import RewardConfig, train_reward_model
    from perlhf.rl.trainer import RLConfig, train_policy

    torch.set_num_threads(1)
    if not args.glibc_default:
        from perlhf.models import return_freed_memory

        return_freed_memory()
    baseline = _rss_mb()
    task, options = CONFIGS[name][0], dict(CONFIGS[name][1])
    if task == "rm":
        config = RewardConfig(model=args.model, data=str(root / "pairs.jsonl"),
                              output_dir=str(root / name.replace(" ", "_")),
                              max_steps=2, per_device_train_batch_size=args.batch, max_length=args.max_length,
                              eval_steps=0, save_steps=2, device="cpu", overwrite_output_dir=True,
                              share_prefix=False,  # the plan counts both sequences of a pair: an upper bound
                              gradient_checkpointing=options.pop("gradient_checkpointing", False), **options)
        shape = {"batch_size": config.per_device_train_batch_size, "max_length": config.max_length}
        predicted = planning.for_run(config, "rm", torch.device("cpu"), config.gradient_checkpointing, **shape)
        layout = "classic" if config.full else "perlhf"  # --full is the classic layout's reward model
        train_reward_model(config)
    else:
        # the reward model trained on the same base, so that it is a role of the one backbone, as the plan assumes
        reward = "rm_lora,_4bit" if options.get("quantize") == "4bit" else "rm_lora"
        config = RLConfig(model=args.model, reward_model=str(root / reward), prompts=str(root / "prompts.txt"),
                          output_dir=str(root / name.replace(" ", "_").replace(",", "")), max_steps=2,
                          batch_size=args.batch, max_new_tokens=48, max_prompt_length=args.prompt_length,
                          save_steps=2, device="cpu", overwrite_output_dir=True, **options)
        predicted = planning.for_run(config, "rl", torch.device("cpu"), config.gradient_checkpointing,
                                     batch_size=config.batch_size, max_prompt_length=config.max_prompt_length,
                                     max_new_tokens=config.max_new_tokens, algorithm=config.algorithm)
        layout = "perlhf"
        train_policy(config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"name": name, "predicted_mb": predicted[layout]["total"] / 2**20, "measured_mb": peak - baseline,
            "baseline_mb": baseline, "peak_rss_mb": peak, "parts_mb": {k: v / 2**20 for k, v in predicted[layout].items()}}


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        return next(float(line.split()[1]) / 1024 for line in handle if line.startswith("VmRSS"))


def write_inputs(root: Path, args) -> None:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    text = " ".join(words[i % len(words)] for i in range(4 * args.max_length))  # cut from the left to max length
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for i in range(64):
            handle.write(json.dumps({"prompt": f"{i} {text}", "chosen": "Sure, here it is.",
                                     "rejected": "No, I will not."}) + "\n")
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_length))
    (root / "prompts.txt").write_text("".join(f"{i} {prompt}\n" for i in range(16)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="a model id or directory (benchmarks/random_model.py writes one of any config)")
    parser.add_argument("--batch", type=int, default=4, help="pairs (rm) or prompts (rl) per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--prompt-length", type=int, default=192, help="rl prompt tokens (cut to this)")
    parser.add_argument("--only", nargs="*", default=list(CONFIGS))
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--out", default="benchmarks/results/plan_check")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, Path(args.root), args)))
        return 0
    root = Path(tempfile.mkdtemp(prefix="plan_check_"))
    write_inputs(root, args)
    rows = []
    order = [n for n in CONFIGS if n in args.only]
    for reward, rl in (("rm lora", "rl reinforce"), ("rm lora, 4bit", "rl reinforce, 4bit")):
        if rl in order and reward not in order:
            order.insert(0, reward)  # the reward model RL runs against
    for name in order:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, __file__, "--child", name, "--root", str(root),
                               "--model", args.model, "--batch", str(args.batch),
                               "--max-length", str(args.max_length),
                               "--prompt-length", str(args.prompt_length)]
                              + (["--glibc-default"] if args.glibc_default else []),
                              capture_output=True, text=True, env=env)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{done.stderr[-3000:]}")
            continue
        rows.append(json.loads(line[7:]))
        print(f"{name}: predicted {rows[-1]['predicted_mb']:.0f} MiB, measured {rows[-1]['measured_mb']:.0f} MiB",
              flush=True)
    command = "python benchmarks/plan_check.py " + " ".join(sys.argv[1:])
    table = ["| configuration | predicted (MiB) | measured peak RSS - baseline (MiB) | error |", "|---|---:|---:|---:|"]
    table += [f"| {r['name']} | {r['predicted_mb']:.0f} | {r['measured_mb']:.0f} | "
              f"{r['predicted_mb'] / r['measured_mb'] - 1:+.1%} |" for r in rows]
    policy = "glibc's default allocator policy" if args.glibc_default else "freed memory returned to the system"
    text = (f"`{command}` ({args.model}, CPU fp32, batch {args.batch}, rm max length {args.max_length}, "
            f"rl prompts {args.prompt_length} + 48 new tokens; {policy})\n\n" + "\n".join(table) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
