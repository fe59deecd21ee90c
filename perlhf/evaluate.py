"""`perlhf eval`: the trained policy against its anchor on held-out prompts.

Both generate for the same prompts; each judge (the training reward model, other reward models, or the
demo's gold preference) scores both responses; a win is policy > anchor. Reported: win rate with a 95% Wilson
interval per judge, the same restricted to pairs where the policy did not answer longer (a length check, so
reward hacking by length shows), mean KL to the anchor, length statistics, and the reward/length correlation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from perlhf import config as cfg
from perlhf.config import check, field
from perlhf.models import DEFAULT_MODEL


@dataclass
class EvalConfig:
    policy: str = field("", "policy adapter directory, or an RL run directory holding policy/")
    prompts: str = field("", "held-out prompts (same formats as `perlhf rl train --prompts`)")
    prompt_column: str | None = field(None, "column holding the prompt, if not `prompt`")
    reward_model: str | None = field(None, "the training reward model (default: the one the RL run used)")
    judges: list[str] = field([], "independent judges: reward model directories, or `gold` (the demo's preference)")
    model: str | None = field(None, "backbone (default: the one the policy names)")
    num_prompts: int = field(64, "evaluate on at most this many prompts")
    max_new_tokens: int = field(48, "tokens per response")
    max_prompt_length: int = field(256, "prompt tokens kept (cut from the left)")
    temperature: float | None = field(None, "sampling temperature for both policy and anchor (0: greedy); "
                                            "default: the RL run's --temperature, else 1")
    batch_size: int = field(16, "prompts per generation batch")
    output_dir: str | None = field(None, "where evaluation.json, samples.jsonl and report/ go (default: the run dir)")
    seed: int = field(1234, "sampling seed")
    device: str | None = field(None, "default: cuda if available")
    dtype: str | None = field(None, "default: bf16 on CUDA, fp32 on CPU")
    quantize: str | None = field(None, "load the backbone quantized (4bit or 8bit); default: as the policy was trained")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check(bool(self.policy), "policy", "is required")
        check(bool(self.prompts), "prompts", "is required")
        check(self.num_prompts >= 1, "num_prompts", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature is None or self.temperature >= 0, "temperature", "must be >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        cfg.check_quantize(self.quantize)


def win_rate(policy: list[float], anchor: list[float], z: float = 1.96) -> dict:
    """Wins/ties/losses of policy over anchor; ties count half. 95% Wilson score interval on the rate."""
    wins = sum(p > a for p, a in zip(policy, anchor))
    ties = sum(p == a for p, a in zip(policy, anchor))
    n = len(policy)
    if n == 0:
        return {"win_rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "wins": 0, "ties": 0,
                "losses": 0, "n": 0}
    rate = (wins + 0.5 * ties) / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"win_rate": rate, "ci_low": max(0.0, centre - half), "ci_high": min(1.0, centre + half),
            "wins": wins, "ties": ties, "losses": n - wins - ties, "n": n}


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else None


def judge_names(specs: list[str]) -> list[str]:
    """A distinct name per judge spec: `gold`, or `judge:` + the shortest trailing part of its path no other spec
    ends with (`a/best`, `b/best` -> `judge:a/best`, `judge:b/best`). A spec given twice is a ConfigError."""
    paths = [spec if spec == "gold" else os.path.normpath(spec) for spec in specs]
    twice = next((spec for spec, path in zip(specs, paths) if paths.count(path) > 1), None)
    check(twice is None, "judges", f"{twice} is given twice (the first judge is the run's reward model, if any)")
    parts = [Path(path).parts for path in paths if path != "gold"]
    names = []
    for path in paths:
        if path == "gold":
            names.append("gold")
            continue
        mine = Path(path).parts
        # The shortest tail no other spec has at that length (names of different lengths never clash); a spec that
        # ends another one (`best` beside `a/best`) keeps its whole path.
        tail = next((mine[-k:] for k in range(1, len(mine) + 1)
                     if all(other[-k:] != mine[-k:] for other in parts if other != mine)), mine)
        names.append("judge:" + Path(*tail).as_posix())
    return names


def _policy_dir(path: str) -> tuple[Path, dict]:
    """The adapter directory and, when given a run directory, its training config."""
    root = Path(path)
    run_config = {}
    if (root / "policy" / "adapter_config.json").exists():
        if (root / "training_config.yaml").exists():
            run_config = yaml.safe_load((root / "training_config.yaml").read_text(encoding="utf-8")) or {}
        return root / "policy", run_config
    if (root / "adapter_config.json").exists():
        if (root.parent / "training_config.yaml").exists():
            run_config = yaml.safe_load((root.parent / "training_config.yaml").read_text(encoding="utf-8")) or {}
        return root, run_config
    raise FileNotFoundError(f"--policy {path}: no adapter_config.json there or in {root / 'policy'}")


def evaluate_policy(config: EvalConfig) -> dict:
    from perlhf.backbone import Backbone, trained_quantization
    from perlhf.data import load_prompts
    from perlhf.models import load_model
    from perlhf.rl.objectives import exact_kl, masked_sum
    from perlhf.rl.rollout import encode_prompts, generate, response_logits, response_texts, sequence_seed

    policy_dir, run_config = _policy_dir(config.policy)
    adapter_info = json.loads((policy_dir / "adapter_config.json").read_text(encoding="utf-8"))
    model_name = config.model or run_config.get("model") or adapter_info.get("base_model_name_or_path") or DEFAULT_MODEL
    reward_dir = config.reward_model or run_config.get("reward_model")
    output = Path(config.output_dir or (policy_dir.parent if run_config else policy_dir))
    judge_specs = ([reward_dir] if reward_dir else []) + list(config.judges)
    names = judge_names(judge_specs)  # before loading anything: a repeated judge is refused at once
    if reward_dir:
        names[0] = "reward_model"

    quantize = config.quantize or trained_quantization(policy_dir)  # evaluated on the base it was trained on
    loaded = load_model(model_name, device=config.device, dtype=config.dtype, quantize=quantize)
    tokenizer = loaded.tokenizer
    backbone = Backbone(loaded.model)
    backbone.load_adapter("policy", policy_dir, trainable=False)
    anchor = None
    if run_config.get("policy_adapter"):  # the policy started from an adapter: that adapter is the anchor
        backbone.load_adapter("anchor", run_config["policy_adapter"], trainable=False)
        anchor = "anchor"

    judges = {name: _judge(spec, i, backbone, tokenizer, model_name, loaded.quantization, config)
              for i, (spec, name) in enumerate(zip(judge_specs, names))}

    prompts, report = load_prompts(config.prompts, column=config.prompt_column, limit=config.num_prompts)
    print(f"perlhf: evaluation prompts: {report.summary()}")
    encoded, _ = encode_prompts(tokenizer, prompts, config.max_prompt_length)
    # KL(policy || anchor) of the distributions as sampled: softmax(logits / T); greedy decoding (T = 0) has no
    # such distribution, so there it is the KL at T = 1 along the greedy responses, and the results say so.
    temperature = config.temperature if config.temperature is not None else float(run_config.get("temperature", 1.0))
    kl_temperature = temperature if temperature > 0 else 1.0
    rows, kls = [], []
    for start in range(0, len(encoded), config.batch_size):
        ids = encoded[start:start + config.batch_size]
        batch_prompts = prompts[start:start + config.batch_size]
        # policy and anchor draw with the same per-prompt seeds: a paired comparison, less noise in the win rate
        seeds = [sequence_seed(config.seed, start + j) for j in range(len(ids))]
        outs = {}
        for role, adapter in (("policy", "policy"), ("anchor", anchor)):
            with backbone.role(adapter):
                outs[role] = generate(backbone.model, tokenizer, ids, config.max_new_tokens, temperature, seeds)
        with torch.no_grad():
            with backbone.role("policy"):
                policy_logits = response_logits(backbone.model, outs["policy"])
            with backbone.role(anchor):
                anchor_logits = response_logits(backbone.model, outs["policy"])
        per_token = exact_kl(policy_logits, anchor_logits, kl_temperature)
        kls += masked_sum(per_token, outs["policy"].response_mask, dim=1).tolist()
        del policy_logits, anchor_logits
        texts = {role: response_texts(tokenizer, rollout) for role, rollout in outs.items()}
        scores = {name: {role: judge(batch_prompts, texts[role]) for role in outs} for name, judge in judges.items()}
        for j, prompt in enumerate(batch_prompts):
            rows.append({"prompt": _prompt_text(prompt), "policy": texts["policy"][j], "anchor": texts["anchor"][j],
                         "policy_tokens": int(outs["policy"].response_mask[j].sum()),
                         "anchor_tokens": int(outs["anchor"].response_mask[j].sum()),
                         "scores": {n: {r: s[r][j] for r in s} for n, s in scores.items()}})

    results = {"judges": {}, "kl": {"mean": sum(kls) / len(kls), "temperature": kl_temperature,
                                    "estimator": "exact per-token KL(policy || anchor) over the vocabulary, summed "
                                                 "over each response, averaged over the policy's "
                                                 + ("samples" if temperature > 0 else "greedy responses")},
               "length": {"policy_mean": _mean([r["policy_tokens"] for r in rows]),
                          "anchor_mean": _mean([r["anchor_tokens"] for r in rows])},
               "prompts": len(rows), "anchor": anchor or "backbone with adapters off", "notes": []}
    for name in judges:
        policy_scores = [r["scores"][name]["policy"] for r in rows]
        anchor_scores = [r["scores"][name]["anchor"] for r in rows]
        judged = win_rate(policy_scores, anchor_scores)
        not_longer = [r for r in rows if r["policy_tokens"] <= r["anchor_tokens"]]
        judged["length_controlled_win_rate"] = win_rate(
            [r["scores"][name]["policy"] for r in not_longer], [r["scores"][name]["anchor"] for r in not_longer]
        )["win_rate"] if not_longer else None
        results["judges"][name] = judged
    if "reward_model" in judges:
        all_scores = [r["scores"]["reward_model"][role] for r in rows for role in ("policy", "anchor")]
        all_lengths = [r[f"{role}_tokens"] for r in rows for role in ("policy", "anchor")]
        results["reward_length_correlation"] = pearson(all_scores, all_lengths)
        correlation = results["reward_length_correlation"]
        if correlation is not None and abs(correlation) > 0.5:
            results["notes"].append(f"The training reward model's scores correlate with response length "
                                    f"(r = {correlation:+.2f}); check the length-controlled win rate before "
                                    "trusting a reward gain.")
    gains = [(n, j["win_rate"]) for n, j in results["judges"].items()]
    if "reward_model" in results["judges"] and len(gains) > 1:
        rm_rate = results["judges"]["reward_model"]["win_rate"]
        for name, rate in gains:
            if name != "reward_model" and rm_rate > 0.55 and rate <= 0.5:
                results["notes"].append(f"The policy wins under the training reward model ({rm_rate:.0%}) but not "
                                        f"under {name} ({rate:.0%}): the gain looks like reward hacking.")

    output.mkdir(parents=True, exist_ok=True)
    (output / "evaluation.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    with (output / "samples.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    results["output_dir"] = str(output)
    return results


def _judge(spec: str, index: int, backbone, tokenizer, model_name: str, quantization: str | None, config: EvalConfig):
    """A function (prompts, response texts) -> scores: the demo's gold preference, a reward adapter on the same
    backbone (read as `perlhf rm score` reads it), or a reward model on another base (or quantized otherwise) as a
    separate model, loaded as it was trained."""
    from perlhf.reward import fits_backbone, load_reward_model, reward_adapter

    if spec == "gold":
        from perlhf.demo import gold_preference

        return lambda prompts, texts: [gold_preference(p, t) for p, t in zip(prompts, texts)]
    if fits_backbone(spec, model_name, quantization):
        adapter = f"judge{index}"
        reward = reward_adapter(backbone, adapter, spec, tokenizer)

        def on_backbone(prompts, texts):
            with backbone.role(adapter):
                return reward.score(prompts, texts)
        return on_backbone
    separate = load_reward_model(spec, device=config.device, dtype=config.dtype)
    return separate.score


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def describe(results: dict) -> str:
    lines = [f"perlhf: {results['prompts']} prompts; policy vs anchor ({results['anchor']}):"]
    for name, j in results["judges"].items():
        controlled = j.get("length_controlled_win_rate")
        lines.append(f"  {name:>14}: win rate {j['win_rate']:.1%} (95% CI {j['ci_low']:.1%}-{j['ci_high']:.1%}; "
                     f"{j['wins']}W {j['ties']}T {j['losses']}L)"
                     + (f", where the policy is not longer: {controlled:.1%}" if controlled is not None else ""))
    lines.append(f"  mean KL(policy || anchor) {results['kl']['mean']:.3f} nats per response (exact per-token KL at "
                 f"temperature {results['kl']['temperature']:g}); mean length policy "
                 f"{results['length']['policy_mean']:.1f} vs anchor {results['length']['anchor_mean']:.1f} tokens")
    lines += [f"  note: {note}" for note in results.get("notes", [])]
    return "\n".join(lines)


def _run(args) -> int:
    results = evaluate_policy(cfg.build(EvalConfig, args))
    print(describe(results))
    return 0


def register_cli(parser) -> None:
    cfg.add_arguments(parser, EvalConfig)
    parser.set_defaults(run=_run)
