"""Reward-model training speed and memory: perlhf LoRA (with and without prefix sharing) vs perlhf --full vs TRL's
RewardTrainer with LoRA, and LoRA on a 4-bit and an 8-bit base.

  pip install -e '.[bench]'        # trl, psutil (perlhf itself never imports trl)
  python benchmarks/reward_benchmark.py                     # CPU defaults: ~5 min on 2 shared cores
  python benchmarks/reward_benchmark.py --data synthetic --max-length 512   # long prompts, short replies
  python benchmarks/reward_benchmark.py --pairs 64 --batch 8 --max-length 512 --steps 20 --device cuda  # untested

One run measures every configuration on the SAME pairs, written once to a JSONL file of explicit
{"prompt", "chosen", "rejected"} records whose prompts are pre-cut (from the left, like perlhf does) so that
prompt + reply + eos fits --max-length for both tools: neither truncates nor drops anything, and both feed the
model exactly the same tokens. Every configuration runs in its own child process (peak RSS is per process) with
the same batch (pairs per step), steps, LoRA rank/alpha/targets (perlhf's "attention" projections, resolved
once and handed to TRL), learning rate, cosine schedule and warm-up, optimizer (torch AdamW), dtype (fp32 on
CPU, bf16 weights on CUDA, no autocast in either tool), no evaluation during training and no gradient
checkpointing. The configurations run in rounds, the order reversed every other round, to spread drift.

Measured in each child, the same way for every tool:
  * tokens/second: a timestamp at the end of every optimizer step (perlhf: its progress-bar advance, right after
    zero_grad; TRL: the on_step_end callback, same place); the timed window runs from the end of step 1 to the end
    of the last step, so step 1 (warm-up: allocator, first-call overheads) is excluded for everyone. Tokens are the
    non-pad tokens of chosen + rejected fed to the model in the timed steps (perlhf's own definition; TRL's
    `num_tokens` metric counts the same). On CUDA the device is synchronised before each timestamp.
    Also reported: the median over steps (robust to a burst of load hitting one step) and tokens per CPU-second.
  * peak memory: ru_maxrss of the child (perlhf's own measure) read at the end of the last step, so it covers
    loading and training but not the save and evaluation perlhf does after training (TRL here does neither);
    torch.cuda.max_memory_allocated on CUDA. The parent stays a small stdlib-only process, so no large RSS is
    inherited through fork/exec; /proc VmHWM is recorded as a cross-check.
  * trainable parameters: numel of the parameters with requires_grad.

On CPU every child runs with ONE torch thread by default (--threads). On a shared machine a 2-thread OpenMP step
stalls whenever one of its threads is descheduled, which made step times swing 10x between runs; with one
thread a busy neighbour slows every configuration in proportion and the ratios stay stable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import child_env, cpu_seconds, machine, status_mb, versions, write_report

ROOT = Path(__file__).resolve().parents[1]
HH_PAIRS = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
CONFIGS = ("perlhf-lora", "perlhf-lora-unshared", "perlhf-full", "trl-lora", "perlhf-lora-4bit", "perlhf-lora-8bit")
GOALS = {  # ratio: (goal, comparison) -- speed ratios must reach the goal, memory ratios stay under it
    "lora_vs_full_speed": (1.5, ">="), "lora_vs_full_memory": (0.5, "<="),
    "perlhf_vs_trl_speed": (1.5, ">="), "perlhf_vs_trl_memory": (1.0, "<="),
    "sharing_vs_unshared_memory": (1.0, "<="),  # prefix sharing must not cost memory
    "lora_4bit_vs_full_memory": (0.35, "<="),
}
QUANTIZED = {"perlhf-lora-4bit": "4bit", "perlhf-lora-8bit": "8bit"}  # LoRA on a quantized frozen base


# ---------------------------------------------------------------------------------------------------------------
# Children: each runs in a fresh interpreter and writes one JSON result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _peak_mb(device: str) -> float:
    """Peak memory of this process so far, measured as perlhf's metrics measure it."""
    from perlhf.metrics import peak_memory_mb

    return peak_memory_mb(device)


class Marks:
    """What the probes record at the end of every optimizer step, and the figures made from it."""

    def __init__(self, device: str):
        self.device, self.rows, self.rss_before_training = device, [], None
        self.tokens, self.computed, self.padded = 0, 0, 0

    def before_batch(self) -> None:  # every training micro-batch, before its forward
        if self.rss_before_training is None:
            self.rss_before_training = status_mb("VmRSS")

    def batch(self, tokens, computed, padded: int) -> None:
        """tokens: of the sequences scored; computed: real tokens the model ran over (fewer with prefix sharing);
        padded: positions it ran over, padding included."""
        self.tokens, self.computed, self.padded = self.tokens + tokens, self.computed + computed, self.padded + padded

    def step_end(self) -> None:
        _sync(self.device)
        self.rows.append((time.perf_counter(), cpu_seconds(), int(self.tokens), int(self.computed), self.padded,
                          _peak_mb(self.device)))
        self.tokens, self.computed, self.padded = 0, 0, 0

    def figures(self) -> dict:
        """Step 1 is the warm-up: the timed window runs from the end of step 1 to the end of the last step."""
        import torch

        wall, cpu, tokens, computed, padded, peak = zip(*self.rows)
        timed_tokens = sum(tokens[1:])
        intervals = [b - a for a, b in zip(wall, wall[1:])]
        out = {"timed_steps": len(wall) - 1, "timed_seconds": wall[-1] - wall[0], "timed_tokens": timed_tokens,
               "tokens_per_second": timed_tokens / (wall[-1] - wall[0]),
               # robust to a burst of load from other jobs that hits only some steps
               "median_step_tokens_per_second": statistics.median(n / t for n, t in zip(tokens[1:], intervals)),
               "tokens_per_cpu_second": timed_tokens / (cpu[-1] - cpu[0]),
               "padding_fraction": 1 - sum(computed[1:]) / sum(padded[1:]),
               "prefix_saved_fraction": 1 - sum(computed[1:]) / timed_tokens,
               "padded_tokens_per_second": sum(padded[1:]) / (wall[-1] - wall[0]),  # positions computed per second
               "median_step_seconds": statistics.median(intervals), "step_seconds": intervals,
               "step_tokens": list(tokens), "torch_threads": torch.get_num_threads(),
               # peak over loading + training, read at the end of the last step: the final save and evaluation
               # perlhf does after training (TRL here does neither) are left out
               "peak_mb": peak[-1], "peak_kind": "cuda max_memory_allocated" if self.device.startswith("cuda")
               else "ru_maxrss", "peak_at_exit_mb": _peak_mb(self.device),
               "rss_before_training_mb": self.rss_before_training}
        if not self.device.startswith("cuda"):
            out["vmhwm_at_exit_mb"] = status_mb("VmHWM")  # cross-check: the kernel's high-water mark of this mm
        return out


def child_prepare(spec: dict) -> dict:
    """Resolve the model, then write the pairs both tools will read (prompts pre-cut to fit max_length)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from perlhf.backbone import attention_target_modules
    from perlhf.data import load_preferences
    from perlhf.models import resolve_model_path

    model_dir, source = resolve_model_path(spec["model"])
    with init_empty_weights():  # module names only: what perlhf's --lora-target attention means for this model
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    targets = attention_target_modules(skeleton)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos, max_length = tokenizer.eos_token, spec["max_length"]
    n = spec["pairs"]
    if Path(spec["data"]).exists():
        # HH replies are often long; read enough records to find n whose replies leave room for some prompt.
        records, _ = load_preferences(spec["data"], limit=max(200, 40 * n))
        raw = [(r.prompt, " " + r.chosen, " " + r.rejected) for r in records if isinstance(r.prompt, str)]
        data_note = f"{spec['data']} (HH-RLHF harmless, implicit pairs split into prompt / reply)"
    else:
        rng = random.Random(0)
        words = "the a cat dog tea rain map jazz bread train river cloud lamp stone quiet bright slow".split()
        text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
        raw = [(f"\n\nHuman: {text(300)}\n\nAssistant:", " " + text(rng.randint(10, 60)), " " + text(rng.randint(10, 60)))
               for _ in range(4 * n)]
        data_note = ("synthetic long-prompt / short-reply pairs (300-word prompts, 10-60-word replies)"
                     if spec["data"] == "synthetic" else f"SYNTHETIC pairs ({spec['data']} is absent)")
        if spec["data"] != "synthetic":
            print(f"note: {spec['data']} not found; benchmarking on synthetic pairs")

    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    min_prompt = max(8, max_length // 8)
    pairs = []
    for prompt, chosen, rejected in raw:
        reply = max(len(encode(chosen)), len(encode(rejected))) + 1  # + eos, which both tools append
        room = max_length - reply
        if room < min_prompt:
            continue
        prompt_ids = encode(prompt)
        for shave in range(4):  # decoding a cut prompt and re-encoding it can shift a token; then cut one more
            cut = tokenizer.decode(prompt_ids[-(room - shave):])
            perlhf_len = len(encode(cut)) + reply                                     # perlhf encodes them apart
            trl_len = max(len(tokenizer(cut + c + eos)["input_ids"]) for c in (chosen, rejected))  # TRL joins
            if max(perlhf_len, trl_len) <= max_length:
                pairs.append({"prompt": cut, "chosen": chosen, "rejected": rejected})
                break
        if len(pairs) == n:
            break
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} pairs fit --max-length {max_length}; lower --pairs or raise --max-length")
    path = Path(spec["pairs_file"])
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    tokens = [len(tokenizer(p["prompt"] + p[k] + eos)["input_ids"]) for p in pairs for k in ("chosen", "rejected")]
    return {"model_dir": model_dir, "model_source": source, "lora_targets": targets, "data": data_note, "pairs": len(pairs),
            "pairs_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "tokens_per_sequence": {"min": min(tokens), "mean": sum(tokens) / len(tokens), "max": max(tokens)}}


def child_perlhf(spec: dict, full: bool, quantize: str | None = None, share_prefix: bool = True) -> dict:
    """perlhf through its Python API (the CLI runs the same function), with two read-only probes for timing."""
    import perlhf.reward as reward
    from perlhf.metrics import MetricsLogger

    device = spec["device"]
    marks = Marks(device)
    forward, advance = reward.forward_batch, MetricsLogger.advance

    def counting_forward(model, batch, pad_id, dev):  # training forwards only: evaluation runs in eval mode
        if not model.training:
            return forward(model, batch, pad_id, dev)
        marks.before_batch()
        out = forward(model, batch, pad_id, dev)
        marks.batch(out["tokens"].item(), out["computed"].item(), out["positions"])
        return out

    def timed_advance(self, steps=1):  # called once per optimizer step, right after zero_grad
        marks.step_end()
        advance(self, steps)

    reward.forward_batch, MetricsLogger.advance = counting_forward, timed_advance
    config = reward.RewardConfig(
        model=spec["model_dir"], data=spec["pairs_file"], validation_fraction=0.0, output_dir=spec["run_dir"],
        overwrite_output_dir=True, full=full, lora_rank=spec["lora_rank"], lora_alpha=spec["lora_alpha"],
        lora_dropout=0.0, lora_target="attention", learning_rate=spec["full_lr"] if full else spec["lr"],
        lr_scheduler_type="cosine", warmup_ratio=spec["warmup_ratio"], max_grad_norm=1.0, weight_decay=0.0,
        max_steps=spec["steps"], per_device_train_batch_size=spec["batch"], max_length=spec["max_length"],
        # no evaluation, logging or checkpoint before the last step: those would land inside the timed window
        eval_steps=0, save_steps=spec["steps"], logging_steps=spec["steps"], seed=spec["seed"],
        device=device, dtype=spec["dtype"], gradient_checkpointing=False, quantize=quantize, share_prefix=share_prefix)
    summary = reward.train_reward_model(config)
    return {**marks.figures(), "trainable_parameters": summary["trainable_parameters"],
            "tool_reported": {"tokens_per_second_incl_warmup": summary["tokens_per_second"],
                              "peak_memory_mb": summary["peak_memory_mb"]}}


def child_trl(spec: dict) -> dict:
    """TRL's RewardTrainer with the same LoRA on the same pairs; a callback and a compute_loss probe time it."""
    import torch
    import trl
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    device = spec["device"]
    marks = Marks(device)

    class Probe(trl.RewardTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:  # a tensor sum: no extra host sync before the step ends
                marks.before_batch()
                real = inputs["attention_mask"].sum()
                marks.batch(real, real, inputs["attention_mask"].numel())
            return super().compute_loss(model, inputs, *args, **kwargs)

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after optimizer.step, scheduler, zero_grad
            marks.step_end()

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    args = trl.RewardConfig(
        output_dir=spec["run_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"], lr_scheduler_type="cosine",
        warmup_steps=int(spec["warmup_ratio"] * spec["steps"]),  # perlhf rounds down; TRL's ratio form rounds up
        max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch",  # torch.optim.AdamW, as perlhf (TRL default: fused)
        gradient_checkpointing=False, bf16=False, fp16=False,  # TRL defaults: checkpointing on, bf16 autocast on
        model_init_kwargs={"dtype": dtype}, max_length=spec["max_length"], use_cpu=device == "cpu",
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        dataloader_num_workers=0, seed=spec["seed"], disable_dropout=True)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = load_dataset("json", data_files=spec["pairs_file"], split="train",
                           cache_dir=str(Path(spec["run_dir"]) / "hf-datasets"))
    lora = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                      target_modules=spec["lora_targets"], bias="none", task_type="SEQ_CLS")  # SEQ_CLS: score head trains
    trainer = Probe(model=spec["model_dir"], args=args, train_dataset=dataset, processing_class=tokenizer,
                    peft_config=lora, callbacks=[StepTimer()])
    if len(trainer.train_dataset) != spec["pairs"]:  # TRL drops over-long pairs; the prepared ones must all fit
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {spec['pairs']} pairs")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return {**marks.figures(), "trainable_parameters": trainable}


def run_child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    if args.child == "prepare":
        result = child_prepare(spec)
    elif args.child.startswith("perlhf-"):
        result = child_perlhf(spec, full=args.child == "perlhf-full", quantize=QUANTIZED.get(args.child),
                              share_prefix=args.child != "perlhf-lora-unshared")
    else:
        result = child_trl(spec)
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parent: stdlib only, so children inherit nothing large


def spawn(name: str, tag: str, spec: dict, work: Path, log) -> dict:
    spec_path, result_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = child_env(ROOT, spec.get("threads"))
    if spec.get("malloc_mmap_threshold"):  # read by glibc at process start, so it must be in the environment
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["malloc_mmap_threshold"])
    started = time.perf_counter()
    with open(work / f"{tag}.log", "w") as out:
        code = subprocess.call([sys.executable, __file__, "--child", name, "--spec", str(spec_path),
                                "--result", str(result_path)], stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not result_path.exists():
        tail = (work / f"{tag}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{tag} failed (exit {code}); log {work / f'{tag}.log'}:\n{tail}")
    log(f"  {tag}: done in {time.perf_counter() - started:.0f}s")
    result = json.loads(result_path.read_text())
    return {**result, "wall_seconds": time.perf_counter() - started}


def ratios(results: dict, speed_key: str = "tokens_per_second") -> dict:
    speed = lambda name: results[name][speed_key]  # noqa: E731
    memory = lambda name: results[name]["peak_mb"]  # noqa: E731
    pairs = {"lora_vs_full_speed": (speed, "perlhf-lora", "perlhf-full"),
             "lora_vs_full_memory": (memory, "perlhf-lora", "perlhf-full"),
             "perlhf_vs_trl_speed": (speed, "perlhf-lora", "trl-lora"),
             "perlhf_vs_trl_memory": (memory, "perlhf-lora", "trl-lora"),
             "lora_4bit_vs_full_memory": (memory, "perlhf-lora-4bit", "perlhf-full"),
             "sharing_vs_unshared_speed": (speed, "perlhf-lora", "perlhf-lora-unshared"),
             "sharing_vs_unshared_memory": (memory, "perlhf-lora", "perlhf-lora-unshared")}
    values = {k: f(a) / f(b) for k, (f, a, b) in pairs.items() if a in results and b in results}
    for name in QUANTIZED:  # reported beside the goals: quantized matmuls can be slower on CPU
        if name in results and "perlhf-full" in results:
            values[f"{name.removeprefix('perlhf-')}_vs_full_speed"] = speed(name) / speed("perlhf-full")
            values[f"{name.removeprefix('perlhf-')}_vs_full_memory"] = memory(name) / memory("perlhf-full")
    return {k: {"value": v, **({"goal": f"{GOALS[k][1]} {GOALS[k][0]}",
                                "met": v >= GOALS[k][0] if GOALS[k][1] == ">=" else v <= GOALS[k][0]} if k in GOALS else {})}
            for k, v in values.items()}


def render(report: dict) -> str:
    s, rounds = report["settings"], report["rounds"]
    unit = "peak CUDA allocated (MiB)" if s["device"].startswith("cuda") else "peak RSS (MiB)"
    each = lambda name, key, fmt: " / ".join(format(rd[name][key], fmt) for rd in rounds)  # noqa: E731
    lines = [f"{s['pairs']} pairs, {s['batch']} pairs/step, max_length {s['max_length']}, {s['steps']} steps "
             f"(step 1 = warm-up, not timed), LoRA r={s['lora_rank']} alpha={s['lora_alpha']:g} on "
             f"{','.join(t.split('.')[-1] for t in s['lora_targets'])}, "
             f"{s['device']} {s['dtype']}, {len(rounds)} round(s); each figure is the median over rounds, "
             "each round's value in brackets.", "",
             f"| configuration | trainable params | tokens/s | tokens/s, median step | tokens per CPU-s | padding "
             f"| saved by prefix sharing | {unit} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["summary"].items():
        lines.append(f"| {name} | {r['trainable_parameters']:,} | {r['tokens_per_second']:.0f} "
                     f"({each(name, 'tokens_per_second', '.0f')}) | {r['median_step_tokens_per_second']:.0f} "
                     f"({each(name, 'median_step_tokens_per_second', '.0f')}) | {r['tokens_per_cpu_second']:.0f} | "
                     f"{r['padding_fraction']:.0%} | {r['prefix_saved_fraction']:.0%} | "
                     f"{r['peak_mb']:.0f} ({each(name, 'peak_mb', '.0f')}) |")
    lines += ["", "| ratio | value | per round | from median steps | from CPU time | goal | met |",
              "|---|---:|---:|---:|---:|---:|:---:|"]
    for name, r in report["ratios"].items():
        per_round = " / ".join(f"{rd[name]['value']:.2f}" for rd in report["round_ratios"])
        robust = (f"{report['median_step_ratios'][name]['value']:.2f} | {report['cpu_ratios'][name]['value']:.2f}"
                  if "speed" in name else "- | -")
        met = "-" if "met" not in r else "yes" if r["met"] else "NO"
        lines.append(f"| {name} | {r['value']:.2f} | {per_round} | {robust} | {r.get('goal', '-')} | {met} |")
    # Tokens/s counts real tokens only, so it also rewards batching that pads less; per padded position it
    # compares the two training engines alone.
    padded = lambda rs: rs["perlhf-lora"]["padded_tokens_per_second"] / rs["trl-lora"]["padded_tokens_per_second"]  # noqa: E731
    if {"perlhf-lora", "trl-lora"} <= set(report["summary"]):
        lines.append(f"| perlhf_vs_trl_speed per padded position | {padded(report['summary']):.2f} | "
                     f"{' / '.join(f'{padded(rd):.2f}' for rd in rounds)} | - | - | (info) | - |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m, s, data = report["machine"], report["settings"], report["data"]
    (load_before, *_), (load_after, *_) = report["load_average_1_5_15_before_after"]
    tokens = data["tokens_per_sequence"]
    header = ["# Reward-model training benchmark", "",
              f"- command: `{report['command']}`", f"- date: {report['date']}",
              f"- machine: {m['cpu']}, {m['usable_cores']} usable cores" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
              + f"; 1-min load average {load_before:.1f} before, {load_after:.1f} after (shared machine)",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
              f"- torch threads per child: {s['threads'] or 'default'}; glibc malloc: "
              + (f"MALLOC_MMAP_THRESHOLD_={s['malloc_mmap_threshold']}" if s["malloc_mmap_threshold"] else "default"),
              f"- data: {data['data']}; {data['pairs']} pairs, {tokens['min']}-{tokens['max']} tokens per "
              f"sequence (mean {tokens['mean']:.0f})", ""]
    return "\n".join(header + [render(report)]) + "\n"


def main() -> int:
    if "--child" in sys.argv:
        return run_child(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--data", default=str(HH_PAIRS), help="preference pairs; `synthetic`: long prompts, short "
                                                                "replies (also used when the file is absent)")
    parser.add_argument("--pairs", type=int, default=16, help="distinct pairs, shared by all configurations")
    parser.add_argument("--batch", type=int, default=2, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps; the first is warm-up and not timed")
    parser.add_argument("--rounds", type=int, default=2, help="run every configuration this many times, alternating the order")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of both LoRA runs")
    parser.add_argument("--full-lr", type=float, default=1e-5, help="learning rate of --full (speed does not depend on it)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the cuda path has not been run yet)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per child (default on CPU: 1, see the docstring; on CUDA: torch's choice)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in every child (e.g. 131072): freed activation "
                             "buffers go back to the OS, so peak RSS tracks live tensors instead of heap growth")
    parser.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reward_benchmark.json"),
                        help="JSON report; the Markdown table goes next to it (.md)")
    parser.add_argument("--work-dir", default=None, help="pairs, run dirs and child logs (default: a temp dir, removed)")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3 (step 1 is warm-up; two timed steps give one interval)")

    if args.threads is None and args.device == "cpu":
        args.threads = 1
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="perlhf-reward-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = {"model": args.model, "data": args.data, "pairs": args.pairs, "batch": args.batch,
            "max_length": args.max_length, "steps": args.steps, "lora_rank": args.lora_rank,
            "lora_alpha": args.lora_alpha, "lr": args.lr, "full_lr": args.full_lr, "warmup_ratio": 0.05,
            "seed": 0, "device": args.device, "dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
            "threads": args.threads, "malloc_mmap_threshold": args.malloc_mmap_threshold,
            "pairs_file": str(work / "pairs.jsonl")}
    load_before = os.getloadavg()
    log(f"work dir {work}\npreparing {args.pairs} pairs (max_length {args.max_length})")
    prepared = spawn("prepare", "prepare", spec, work, log)
    spec["model_dir"], spec["lora_targets"] = prepared["model_dir"], prepared["lora_targets"]
    log(f"  {prepared['pairs']} pairs from {prepared['data']}; tokens/sequence {prepared['tokens_per_sequence']}")

    rounds = []
    for index in range(args.rounds):
        order = args.only if index % 2 == 0 else list(reversed(args.only))  # alternate to spread drift and noise
        log(f"round {index + 1}/{args.rounds}: {', '.join(order)}")
        rounds.append({name: spawn(name, f"{name}-{index + 1}", {**spec, "run_dir": str(work / f"run-{name}-{index + 1}")},
                                   work, log) for name in order})
    load_after = os.getloadavg()

    keys = ("tokens_per_second", "median_step_tokens_per_second", "tokens_per_cpu_second", "padded_tokens_per_second",
            "median_step_seconds", "padding_fraction", "prefix_saved_fraction", "peak_mb", "rss_before_training_mb")
    summary = {name: {**{k: statistics.median(r[name][k] for r in rounds) for k in keys},
                      "trainable_parameters": rounds[0][name]["trainable_parameters"]} for name in args.only}
    report = {"command": shlex.join(["python", *sys.argv]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "load_average_1_5_15_before_after": [load_before, load_after], "versions": versions(),
              "settings": {k: v for k, v in spec.items() if k != "pairs_file"}, "data": prepared,
              "summary": summary, "rounds": rounds}
    report["ratios"] = ratios(summary)
    report["round_ratios"] = [ratios(r) for r in rounds]
    report["median_step_ratios"] = ratios(summary, "median_step_tokens_per_second")
    report["cpu_ratios"] = ratios(summary, "tokens_per_cpu_second")
    log("\n" + render(report))
    out = Path(args.out)
    write_report(out, report, markdown(report))
    log(f"\nwrote {out} and {out.with_suffix('.md')}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
