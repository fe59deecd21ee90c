"""SFT on real dialogues (../shared/data): the anchor before and after LoRA SFT, LoRA vs --full at one budget.

  python benchmarks/sft_quality.py [--steps 40] [--batch 4] [--max-length 256] [--limit 1000]

HH-RLHF harmless pairs, their chosen dialogues as SFT targets (the reply after the last "Assistant:"; the
dialogue before it is the prompt, masked out of the loss), split train/validation by prompt as `perlhf sft train`
splits them. Three children, one after another, each in its own process with one thread, so peak memory is each
configuration's own: `anchor` (the untouched model's validation loss), `lora` and `full` (`perlhf sft train` with
the same steps, batch and examples). Reported: validation loss and perplexity, training tokens per second
(target and prompt tokens, no padding), peak RSS, and the LoRA/full ratios. Skips when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_env, machine, status_mb, versions, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"


def child(name: str, args) -> dict:
    from perlhf.data import load_sft
    from perlhf.sft import SFTConfig, encode, evaluate, train_sft
    from perlhf.training import load_split

    config = SFTConfig(data=str(DATA), limit=args.limit, output_dir=f"{args.runs}/{name}", full=name == "full",
                       max_steps=args.steps, per_device_train_batch_size=args.batch, max_length=args.max_length,
                       eval_steps=0, save_steps=args.steps, seed=0, overwrite_output_dir=True, device="cpu")
    if name != "anchor":
        summary = train_sft(config)
        return {"final": summary["final"], "tokens_per_second": summary["tokens_per_second"],
                "train_examples": summary["train_examples"], "validation_examples": summary["validation_examples"],
                "trainable_parameters": summary["trainable_parameters"], "peak_rss_mb": status_mb("VmHWM")}
    from accelerate import Accelerator

    from perlhf.models import load_model

    loaded = load_model(config.model, device="cpu", verbose=False)
    _, validation = load_split(config, load_sft, None, verbose=False)
    examples, _ = encode(validation, loaded.tokenizer, config)
    return {"final": evaluate(loaded.model, examples, loaded.tokenizer.pad_token_id, config.per_device_eval_batch_size,
                              Accelerator(cpu=True)), "peak_rss_mb": status_mb("VmHWM")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--limit", type=int, default=1000, help="records read")
    parser.add_argument("--runs", default="runs/sft_quality")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/sft_quality.json")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} is absent")
        return 0
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return 0
    results = {}
    for name in ("anchor", "lora", "full"):
        done = subprocess.run([sys.executable, __file__, "--child", name, *sys.argv[1:]], capture_output=True, text=True,
                              env=child_env(ROOT, args.threads), cwd=str(ROOT))
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.split("RESULT ", 1)[1])
        print(f"{name}: {results[name]['final']}", flush=True)
    lora, full, anchor = results["lora"], results["full"], results["anchor"]
    ratios = {"lora_over_full_tokens_per_second": lora["tokens_per_second"] / full["tokens_per_second"],
              "lora_over_full_peak_rss": lora["peak_rss_mb"] / full["peak_rss_mb"]}
    report = {"command": "python benchmarks/sft_quality.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "versions": versions(), "settings": vars(args), "results": results, "ratios": ratios}
    rows = [f"| {name} | {r['final']['eval/loss']:.4f} | {r['final']['eval/perplexity']:.2f} | "
            f"{r.get('tokens_per_second', float('nan')):.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r.get('trainable_parameters', 0):,} |" for name, r in results.items()]
    markdown = "\n".join([
        "# SFT on HH-RLHF harmless chosen dialogues", "",
        f"- command: `{report['command']}`",
        f"- {args.steps} steps of {args.batch} examples, max length {args.max_length}, {lora['train_examples']} training / "
        f"{lora['validation_examples']} validation examples (first {args.limit} records), one thread per child", "",
        "| model | validation loss | perplexity | train tokens/s | peak RSS (MiB) | trainable parameters |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        f"LoRA / full: speed {ratios['lora_over_full_tokens_per_second']:.2f}x, peak memory "
        f"{ratios['lora_over_full_peak_rss']:.2f}; validation loss anchor {anchor['final']['eval/loss']:.4f} -> LoRA "
        f"{lora['final']['eval/loss']:.4f}, full {full['final']['eval/loss']:.4f}", ""])
    write_report(Path(args.out), report, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
