"""How fast perlhf samples: `perlhf.rl.rollout.generate` on the default model, as RL (16 prompts, the policy
adapter active) and as the demo's pair sampling (96 sequences) do it, with transformers' growing KV cache (what
perlhf uses) and with its static cache (tried for perlhf and measured here: no gain), in one run.

  python benchmarks/sampling_speed.py                 # ~4 min on 2 cores
  python benchmarks/sampling_speed.py --rows 16 --repeats 3

Each setting is timed `--repeats` times after one warm-up call, and the runs alternate between the caches to
spread drift; the table gives the median. A second table times one sampling step alone: perlhf's inverse-CDF
draw (`SeededSampler`) against the Gumbel-max draw it replaced (an Exp(1) number per vocabulary entry per row).
Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 96])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import perlhf.rl.rollout as rollout
    from perlhf.backbone import Backbone, lora_config
    from perlhf.demo import demo_prompts
    from perlhf.models import load_model

    loaded = load_model()
    backbone = Backbone.with_adapter(loaded.model, "policy", lora_config(loaded.model, 8, 16.0, 0.0, "attention"))
    prompts = [[{"role": "user", "content": p}] for p in demo_prompts()[:max(args.rows)]]
    encoded, _ = rollout.encode_prompts(loaded.tokenizer, prompts, 256)
    caches = {"growing (perlhf)": None, "static": "static"}
    plain = rollout.GenerationConfig

    def with_cache(implementation):  # the GenerationConfig that generate() builds, with this cache
        return lambda **kwargs: plain(**kwargs, cache_implementation=implementation)
    times: dict[tuple[int, str], list[float]] = {}
    with backbone.role("policy"):
        for rows in args.rows:
            batch, seeds = encoded[:rows], list(range(rows))
            for repeat in range(args.repeats + 1):
                for name, cache in caches.items():
                    rollout.GenerationConfig = with_cache(cache)
                    started = time.perf_counter()
                    out = rollout.generate(backbone.model, loaded.tokenizer, batch, args.new_tokens, 1.0, seeds)
                    if repeat:  # the first round warms up
                        times.setdefault((rows, name), []).append(time.perf_counter() - started)
                    print(f"{rows} rows, {name}: {time.perf_counter() - started:.2f} s, "
                          f"{int(out.response_mask.sum())} tokens", flush=True)
    rollout.GenerationConfig = plain
    sampler_table(args.rows, loaded.model.config.vocab_size, rollout.SeededSampler)
    print(f"\n| rows x new tokens | {' | '.join(caches)} | static / growing |\n|---|" + "---:|" * (len(caches) + 1))
    for rows in args.rows:
        medians = [statistics.median(times[(rows, name)]) for name in caches]
        print(f"| {rows} x {args.new_tokens} | " + " | ".join(f"{m:.1f} s" for m in medians)
              + f" | {medians[1] / medians[0]:.2f} |")


def sampler_table(row_counts: list[int], vocab: int, sampler_class, steps: int = 30) -> None:
    import torch

    def gumbel(scores, generators):
        noise = torch.stack([torch.empty(vocab).exponential_(generator=g) for g in generators])
        return scores - noise.log()

    print(f"\n| rows | inverse CDF (perlhf) | Gumbel-max | Gumbel / inverse CDF |\n|---|---:|---:|---:|")
    for rows in row_counts:
        scores = torch.randn(rows, vocab) * 3
        sampler = sampler_class(1.0, list(range(rows)), "cpu")
        draws = {"inverse CDF": lambda: sampler(None, scores), "Gumbel": lambda: gumbel(scores, sampler.generators)}
        took = {}
        for name, draw in draws.items():
            draw()
            started = time.perf_counter()
            for _ in range(steps):
                draw()
            took[name] = (time.perf_counter() - started) / steps * 1e3
        print(f"| {rows} | {took['inverse CDF']:.1f} ms | {took['Gumbel']:.1f} ms | "
              f"{took['Gumbel'] / took['inverse CDF']:.1f}x |")


if __name__ == "__main__":
    main()
