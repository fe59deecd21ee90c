"""How fast perlhf samples, and what each of its three speed-ups in `perlhf.rl.rollout.generate` gives: each turned
off in turn, on the default model, in one run.

  python benchmarks/sampling_speed.py                 # ~15 min on a quiet 2-core machine
  python benchmarks/sampling_speed.py --repeats 3 --out benchmarks/results/sampling_speed.md

Two workloads: RL's (16 distinct prompts, the policy adapter on, temperature 1) and the demo's pair sampling (24
prompts x 4 samples = 96 rows, nucleus top_p 0.95). Settings:
- perlhf: as it runs;
- F.linear decoding: `x @ weight.T` instead of `weight @ x.T` in float32 decoding steps (`_weight_left_decoding` off);
- no shared prefill: every row prefills its own prompt (`shared_prefill` off; RL's prompts are distinct, so it
  does not apply there);
- nucleus sorted whole: every row's vocabulary sorted every step (`SeededSampler.NUCLEUS_CANDIDATES` = vocabulary
  size, as transformers' TopPLogitsWarper does; pair sampling only).
Every setting samples with the same seeds, and the table says whether it drew the same tokens as perlhf: the
speed-ups must not change what is sampled. Each setting is timed `--repeats` times after one warm-up call, the
settings alternating within each repeat to spread drift; the table gives the median. A last table times one
nucleus step alone on the model's real logits. Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    args = parser.parse_args()

    import torch

    import perlhf.rl.rollout as rollout
    from perlhf.backbone import Backbone, lora_config
    from perlhf.demo import demo_prompts
    from perlhf.models import load_model

    loaded = load_model()
    vocab = loaded.model.config.vocab_size
    backbone = Backbone.with_adapter(loaded.model, "policy", lora_config(loaded.model, 8, 16.0, 0.0, "attention"))
    prompts = [[{"role": "user", "content": p}] for p in demo_prompts()[:24]]
    encoded, _ = rollout.encode_prompts(loaded.tokenizer, prompts, 256)
    pairs = [p for p in encoded for _ in range(4)]
    workloads = {"RL, 16 prompts": (encoded[:16], 1.0), "pairs, 24 prompts x 4": (pairs, 0.95)}
    real = {"weight_left": rollout._weight_left_decoding, "prefill": rollout.shared_prefill,
            "candidates": rollout.SeededSampler.NUCLEUS_CANDIDATES}

    def setting(name: str) -> None:  # perlhf's pieces back, then the one named turned off
        rollout._weight_left_decoding, rollout.shared_prefill = real["weight_left"], real["prefill"]
        rollout.SeededSampler.NUCLEUS_CANDIDATES = real["candidates"]
        if name == "F.linear decoding":
            rollout._weight_left_decoding = lambda model: nullcontext()
        elif name == "no shared prefill":
            rollout.shared_prefill = lambda model, ids, mask: None
        elif name == "nucleus sorted whole":
            rollout.SeededSampler.NUCLEUS_CANDIDATES = vocab

    lines = []
    with backbone.role("policy"):
        for workload, (batch, top_p) in workloads.items():
            names = ["perlhf", "F.linear decoding"]
            names += ["no shared prefill", "nucleus sorted whole"] if top_p < 1 else []
            seeds = list(range(len(batch)))
            times: dict[str, list[float]] = {name: [] for name in names}
            tokens: dict[str, torch.Tensor] = {}
            for repeat in range(args.repeats + 1):
                for name in names:
                    setting(name)
                    started = time.perf_counter()
                    out = rollout.generate(backbone.model, loaded.tokenizer, batch, args.new_tokens, 1.0, seeds, top_p)
                    took = time.perf_counter() - started
                    if repeat:  # the first round warms up
                        times[name].append(took)
                    tokens.setdefault(name, out.response_ids)
                    print(f"{workload}, {name}: {took:.2f} s", flush=True)
            setting("perlhf")
            base = statistics.median(times["perlhf"])
            lines += [f"\n{workload} ({len(batch)} rows x {args.new_tokens} new tokens, top_p {top_p}):\n",
                      "| setting | s (median) | / perlhf | same tokens as perlhf |", "|---|---:|---:|:---:|"]
            for name in names:
                median = statistics.median(times[name])
                same = tokens[name].shape == tokens["perlhf"].shape and torch.equal(tokens[name], tokens["perlhf"])
                lines.append(f"| {name} | {median:.2f} | {median / base:.2f} | {'yes' if same else 'NO'} |")
        lines += nucleus_step_table(backbone.model, loaded.tokenizer, pairs, rollout)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(f"`python benchmarks/sampling_speed.py {' '.join(sys.argv[1:])}`\n{text}")


def nucleus_step_table(model, tokenizer, batch, rollout, steps: int = 20) -> list[str]:
    """One nucleus draw (top_p 0.95) on the model's next-token logits after each prompt: among the top candidates
    (perlhf) against the whole vocabulary sorted."""
    import torch

    ids, mask = rollout.pad_left(batch, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    sampler = rollout.SeededSampler(1.0, list(range(len(batch))), "cpu", top_p=0.95)
    took = {}
    for name, candidates in (("top candidates (perlhf)", rollout.SeededSampler.NUCLEUS_CANDIDATES),
                             ("whole vocabulary sorted", logits.size(-1))):
        sampler.NUCLEUS_CANDIDATES = candidates
        sampler(None, logits)
        started = time.perf_counter()
        for _ in range(steps):
            sampler(None, logits)
        took[name] = (time.perf_counter() - started) / steps * 1e3
    first, second = took.values()
    return [f"\nOne nucleus step, {len(batch)} rows of real logits:\n", "| draw | ms |", "|---|---:|"] + \
        [f"| {name} | {ms:.1f} |" for name, ms in took.items()] + [f"| whole / candidates | {second / first:.1f}x |"]


if __name__ == "__main__":
    main()
