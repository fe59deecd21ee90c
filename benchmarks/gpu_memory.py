"""RL on a GPU at 1B and 8B scale, bf16 and 4-bit: peak memory and time per iteration beside `perlhf plan`.

  python benchmarks/gpu_memory.py                                  # on a CUDA machine; well under 10 minutes
  python benchmarks/gpu_memory.py --models benchmarks/configs/llama-1b --quantize none --device cpu --steps 1 \\
      --batch 2 --prompt-length 32 --new-tokens 8                   # a CPU smoke run of the same code

For each model config (random weights: only the shapes matter for memory and time) and each quantization, in its
own process: a random-initialised model is written once, a LoRA reward model is trained on it for 2 steps, then
`--steps` RL iterations (reinforce, gradient checkpointing, the defaults of `perlhf rl train`) run on it. Recorded:
torch.cuda.max_memory_allocated over the RL run (reset after the reward model), the median seconds per iteration
after the first, and the plan's prediction for the same run. The tokenizer is the embedded SmolLM2 one (its ids
fit any vocabulary this large). Results go to benchmarks/results/gpu_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(model_config: str, quantize: str | None, args) -> dict:
    import torch
    from random_model import write_random_model

    from perlhf.metrics import read_metrics
    from perlhf.plan import for_run
    from perlhf.reward import RewardConfig, train_reward_model
    from perlhf.rl.trainer import RLConfig, train_policy

    device = torch.device(args.device)
    root = Path(args.root)
    model_dir = write_random_model(model_config, root / Path(model_config).name, args.device)  # once per config
    words = "please write a short friendly answer about the weather and the sea".split()
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_length))
    (root / "prompts.txt").write_text("".join(f"{i} {prompt}\n" for i in range(4 * args.batch)))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"{i} {prompt}", "chosen": "Sure, gladly.",
                                                          "rejected": "No."}) + "\n" for i in range(32)))
    tag = f"{model_dir.name}-{quantize or 'none'}"
    rm_dir = root / f"rm-{tag}"
    train_reward_model(RewardConfig(model=str(model_dir), data=str(root / "pairs.jsonl"), output_dir=str(rm_dir),
                                    max_steps=2, per_device_train_batch_size=2, max_length=args.prompt_length + 16,
                                    eval_steps=0, save_steps=2, device=args.device, quantize=quantize,
                                    overwrite_output_dir=True))
    config = RLConfig(model=str(model_dir), reward_model=str(rm_dir), prompts=str(root / "prompts.txt"),
                      output_dir=str(root / f"rl-{tag}"), max_steps=args.steps, batch_size=args.batch,
                      max_prompt_length=args.prompt_length, max_new_tokens=args.new_tokens, save_steps=args.steps,
                      device=args.device, quantize=quantize, overwrite_output_dir=True, gradient_checkpointing=True)
    predicted = for_run(config, "rl", device, config.gradient_checkpointing, batch_size=config.batch_size,
                        max_prompt_length=config.max_prompt_length, max_new_tokens=config.max_new_tokens,
                        algorithm=config.algorithm)["perlhf"]["total"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    train_policy(config)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    parts = ("time/generate", "time/score", "time/reference", "time/update")
    stamps = [sum(r[k] for k in parts) for r in read_metrics(root / f"rl-{tag}") if all(k in r for k in parts)]
    return {"model": model_dir.name, "quantize": quantize or "none", "predicted_gib": predicted / 2**30,
            "peak_allocated_gib": peak / 2**30, "seconds_per_iteration": statistics.median(stamps[1:] or stamps)
            if stamps else (time.perf_counter() - started) / args.steps, "iterations": args.steps,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=[str(HERE / "configs/llama-1b"), str(HERE / "configs/llama-3-8b")])
    parser.add_argument("--quantize", nargs="*", default=["none", "4bit"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--root", default=None, help="where the random models go (default: a temporary directory)")
    parser.add_argument("--out", default="benchmarks/results/gpu_memory")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], None if args.child[1] == "none" else args.child[1], args)))
        return 0
    args.root = args.root or tempfile.mkdtemp(prefix="gpu_memory_")
    rows = []
    for model in args.models:
        for quantize in args.quantize:
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--root", args.root, "--child", model, quantize],
                                  capture_output=True, text=True, env=dict(os.environ))
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{model} {quantize}: failed\n{done.stderr[-3000:]}", flush=True)
                continue
            rows.append(json.loads(line[7:]))
            print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/gpu_memory.py " + " ".join(sys.argv[1:])
    table = ["| model | backbone | predicted (GiB) | peak allocated (GiB) | s / iteration |", "|---|---|---:|---:|---:|"]
    table += [f"| {r['model']} | {r['quantize']} | {r['predicted_gib']:.2f} | {r['peak_allocated_gib']:.2f} | "
              f"{r['seconds_per_iteration']:.2f} |" for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"`{command}` on {rows[0]['gpu'] if rows else '-'}\n\n" + "\n".join(table) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
