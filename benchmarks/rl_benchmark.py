"""One RL iteration, time and peak memory: perlhf's shared-backbone LoRA vs full-parameter RL vs TRL's RLOOTrainer.

  pip install -e '.[bench]'        # trl, psutil (perlhf itself never imports trl)
  python benchmarks/rl_benchmark.py                          # CPU defaults, ~10 min on 2 loaded cores
  python benchmarks/rl_benchmark.py --batch 16 --max-new-tokens 64 --device cuda   # written, not yet run

Configurations, all on the same model, prompts, sequences per iteration and response length:

  perlhf-reinforce  perlhf.rl.trainer.train_policy, algorithm="reinforce": policy LoRA, reward LoRA, value LoRA
                    (a trainable copy of the reward adapter) and the reference (adapters off) on ONE backbone.
  perlhf-rloo       the same with algorithm="rloo" (k = --rloo-k samples per prompt, no value role); each prompt is
                    computed once per group in the log-prob, reference and reward passes (prefix sharing).
  perlhf-rloo-unshared   the same with --share-prefix false: every sample runs its prompt again.
  full-reinforce    the "classic" layout, written here from perlhf's own rollout/objective functions: a trainable
                    full policy (AdamW over every weight), a frozen full reference copy, the reward model as a
                    separate *ForSequenceClassification model and a separate, fully trainable value model
                    initialised from it. The iteration is perlhf's update_reinforce step for step (generate ->
                    score -> policy and reference log-probs -> value V(prompt) as the baseline -> value + policy
                    losses -> one clipped AdamW step), so the two differ only in where the weights live.
  trl-rloo          trl.RLOOTrainer with a LoRA policy (peft_config: same rank, alpha, q/k/v/o targets; the
                    reference is the adapter-disabled policy, as in perlhf) and the reward model as a separate
                    AutoModelForSequenceClassification, k=2 (RLOO needs groups).

The reward model is trained once with `perlhf rm train` (a few steps on synthetic pairs: its quality does not
matter here) and merged with `perlhf export --merge` into a verified sequence-classification model, so all four
configurations score with the same reward function: perlhf as an adapter on the shared backbone, the others as a
separate model. The prompts are chat messages that all render to the same number of tokens; every iteration
generates --batch sequences (perlhf-reinforce and full: --batch prompts x 1; the RLOO configurations: --batch/2
prompts x 2) of exactly --max-new-tokens tokens: generation runs with min_new_tokens = max_new_tokens, which
suppresses EOS until the length is reached (perlhf and the full baseline through a benchmark-side wrapper around
the GenerationConfig that perlhf.rl.rollout.generate builds; TRL through its generation_kwargs). Every
configuration therefore pushes the same tensor shapes through every forward and backward pass.

Each configuration runs in its own child process (peak RSS is per process; the parent imports only the standard
library), the same for every tool:
  * seconds per iteration: a timestamp at the end of every iteration (perlhf: MetricsLogger.advance, called once
    per iteration after its optimizer step and logging; full: the end of its loop body; TRL: the on_step_end
    callback, after optimizer.step and zero_grad). Iteration 1 (warm-up) is excluded: the figure is the median of
    the intervals between consecutive iteration ends, i.e. of iterations 2..N. The CPU time of the process over
    the same intervals is a cross-check that a loaded machine disturbs less than wall time.
  * peak memory: ru_maxrss of the child at the end of the last iteration on CPU (loading included: that is the
    process's real high-water mark), with the RSS after imports and after setup (models loaded, before iteration 1)
    beside it; torch.cuda.max_memory_allocated on CUDA.
  * trainable parameters: numel of the parameters the optimizer updates.
  * where the time goes, in wall and CPU seconds, timed by wrappers the same way everywhere: generate (sampling),
    score (reward model), reference (the policy's log-probs at sampling time + the reference's), update (losses,
    backward, optimizer step), other (the rest of the interval). perlhf: wrappers around trainer.generate,
    Roles.scores, Roles.policy_logprobs / reference_logprobs and UPDATES[algorithm] (its own time/* metrics are kept
    in the JSON as a cross-check); full: its loop; TRL: wrappers around _generate, _calculate_rewards and
    _generate_and_score_completions, the rest of the step being its update.
  * why wall time exceeds CPU time: involuntary context switches (the scheduler running another process) and major
    page faults per iteration.

Repeats are interleaved to cancel load drift: round 1 runs A B C D, round 2 D C B A, round 3 A B C D, ...; each
figure is the median over rounds. The 1-minute load average is sampled before every child and reported.

The GPU path (--device cuda: bf16 weights for every configuration, no autocast, torch.cuda.max_memory_allocated,
synchronisation before every timestamp) is in the code but has not been run yet.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # perlhf.models.DEFAULT_MODEL; the parent imports no perlhf
CONFIGS = ("perlhf-reinforce", "perlhf-rloo", "perlhf-rloo-unshared", "full-reinforce", "trl-rloo", "perlhf-reinforce-4bit",
           "perlhf-rloo-4bit")
LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # what perlhf's "attention" target resolves to here
TOPICS = ["rain", "tea", "cats", "jazz", "bread", "rivers", "clouds", "lamps", "stone", "music", "trains", "maps",
          "snow", "birds", "salt", "glass"]
# ratio name: (numerator config, denominator config, metric, goal, comparison)
RATIOS = {
    "perlhf/full memory": ("perlhf-reinforce", "full-reinforce", "peak_mb", 0.35, "<="),
    "perlhf/TRL memory": ("perlhf-rloo", "trl-rloo", "peak_mb", 0.60, "<="),
    "full/perlhf time": ("full-reinforce", "perlhf-reinforce", "seconds_per_iteration", 1.3, ">="),
    "TRL/perlhf time": ("trl-rloo", "perlhf-rloo", "seconds_per_iteration", 1.0, ">="),
    "perlhf 4bit/full memory": ("perlhf-reinforce-4bit", "full-reinforce", "peak_mb", 0.15, "<="),
    "perlhf 4bit/TRL memory": ("perlhf-rloo-4bit", "trl-rloo", "peak_mb", 0.45, "<="),
    "unshared/shared time": ("perlhf-rloo-unshared", "perlhf-rloo", "seconds_per_iteration", 1.25, ">="),
    "shared/unshared memory": ("perlhf-rloo", "perlhf-rloo-unshared", "peak_mb", 1.0, "<="),
}
EXTRA_RATIOS = {  # reported, no goal: the other pairings
    "perlhf-reinforce/TRL memory": ("perlhf-reinforce", "trl-rloo", "peak_mb"),
    "TRL/perlhf-reinforce time": ("trl-rloo", "perlhf-reinforce", "seconds_per_iteration"),
    "perlhf/full growth above imports": ("perlhf-reinforce", "full-reinforce", "peak_above_imports_mb"),
    "perlhf/TRL growth above imports": ("perlhf-rloo", "trl-rloo", "peak_above_imports_mb"),
    "full/perlhf 4bit time": ("full-reinforce", "perlhf-reinforce-4bit", "seconds_per_iteration"),
    "perlhf 4bit/full growth above imports": ("perlhf-reinforce-4bit", "full-reinforce", "peak_above_imports_mb"),
}


# ---------------------------------------------------------------------------------------------------------------
# Children: each runs in a fresh interpreter and writes one JSON result


class Marks:
    """Timestamps, CPU time and peak memory at the end of every iteration, and the memory milestones before."""

    def __init__(self, device: str):
        self.device, self.rows, self.phases = device, [], []
        self.rss_after_imports = self.rss_after_setup = None
        self._phase: dict[str, tuple[float, float]] = {}  # phase -> (wall, CPU) seconds

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def peak_mb(self) -> float:
        from perlhf.metrics import peak_memory_mb  # the measure perlhf's own metrics report

        return peak_memory_mb(self.device)

    def current_mb(self) -> float:
        if self.device.startswith("cuda"):
            import torch

            return torch.cuda.memory_allocated() / 2**20
        return status_mb()

    def imported(self) -> None:
        self.rss_after_imports = self.current_mb()

    def setup_done(self) -> None:
        if self.rss_after_setup is None:
            self.rss_after_setup = self.current_mb()

    def timed(self, name: str, fn, *args, **kwargs):
        """Run fn, adding its wall and CPU seconds to phase `name` of the current iteration."""
        self._sync()
        wall, cpu = time.perf_counter(), cpu_seconds()
        out = fn(*args, **kwargs)
        self._sync()
        previous = self._phase.get(name, (0.0, 0.0))
        self._phase[name] = (previous[0] + time.perf_counter() - wall, previous[1] + cpu_seconds() - cpu)
        return out

    def step_end(self) -> None:
        import resource

        self._sync()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.rows.append((time.perf_counter(), cpu_seconds(), self.peak_mb(), usage.ru_majflt, usage.ru_nivcsw))
        self.phases.append(self._phase)
        self._phase = {}

    def figures(self) -> dict:
        import torch

        wall, cpu, peak, major_faults, preempted = zip(*self.rows)
        intervals = [b - a for a, b in zip(wall, wall[1:])]
        cpu_intervals = [b - a for a, b in zip(cpu, cpu[1:])]
        per_iteration = lambda xs: statistics.median(b - a for a, b in zip(xs, xs[1:]))  # noqa: E731
        return {"iterations": len(wall), "timed_iterations": len(intervals),
                # why wall time exceeds CPU time: pages read from disk (e.g. memory-mapped weights evicted under
                # memory pressure) or the scheduler giving the core to another process
                "major_page_faults_per_iteration": per_iteration(major_faults),
                "involuntary_switches_per_iteration": per_iteration(preempted),
                "seconds_per_iteration": statistics.median(intervals), "iteration_seconds": intervals,
                "cpu_seconds_per_iteration": statistics.median(cpu_intervals), "iteration_cpu_seconds": cpu_intervals,
                "peak_mb": peak[-1], "peak_kind": "cuda max_memory_allocated" if self.device.startswith("cuda")
                else "ru_maxrss", "peak_after_iteration_mb": list(peak),
                "rss_after_imports_mb": self.rss_after_imports, "rss_after_setup_mb": self.rss_after_setup,
                "peak_above_imports_mb": peak[-1] - (self.rss_after_imports or 0.0),
                "vmhwm_at_exit_mb": None if self.device.startswith("cuda") else status_mb("VmHWM"),
                "torch_threads": torch.get_num_threads()}


def phase_medians(marks: Marks, figures: dict, nested: dict[str, tuple[str, ...]] | None = None) -> dict:
    """{phase: {"wall": s, "cpu": s}}, medians over iterations 2..N. `other` is the rest of each iteration's interval;
    `nested` names phases timed around others (TRL's rollout holds its generate and score): they are replaced by
    their own part, e.g. {"reference": ("rollout", "generate", "score")} -> reference = rollout - generate - score."""
    rows = []
    for row, wall, cpu in zip(marks.phases[1:], figures["iteration_seconds"], figures["iteration_cpu_seconds"]):
        row = dict(row)
        for name, (outer, *inner) in (nested or {}).items():
            total = row.pop(outer, (0.0, 0.0))
            row[name] = tuple(total[i] - sum(row.get(n, (0.0, 0.0))[i] for n in inner) for i in (0, 1))
        row["other"] = (wall - sum(v[0] for v in row.values()), cpu - sum(v[1] for v in row.values()))
        rows.append(row)
    names = sorted({k for row in rows for k in row})
    return {name: {kind: statistics.median(row.get(name, (0.0, 0.0))[i] for row in rows)
                   for i, kind in enumerate(("wall", "cpu"))} for name in names}


def fixed_length_generation() -> None:
    """Make perlhf.rl.rollout.generate sample exactly max_new_tokens tokens: min_new_tokens = max_new_tokens, so
    EOS is suppressed until then. Benchmark-side only; perlhf's code is unchanged."""
    import perlhf.rl.rollout as rollout

    original = rollout.GenerationConfig

    def generation_config(**kwargs):
        if "max_new_tokens" in kwargs:
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
        return original(**kwargs)

    rollout.GenerationConfig = generation_config


def child_perlhf(spec: dict, algorithm: str, quantize: str | None = None, share_prefix: bool = True) -> dict:
    """perlhf through its Python API (the CLI runs the same function), with read-only probes."""
    import perlhf.rl.trainer as trainer
    from perlhf.metrics import MetricsLogger, read_metrics

    marks = Marks(spec["device"])
    marks.imported()
    fixed_length_generation()
    counted = {}
    trainable, advance = trainer.Roles.trainable, MetricsLogger.advance

    def counting_trainable(self):  # called once, right after the roles are built and before the optimizer
        policy, value = trainable(self)
        counted.update(policy=sum(p.numel() for p in policy), value=sum(p.numel() for p in value),
                       shared_reward=self.shared_reward)
        marks.setup_done()
        return policy, value

    def timed_advance(self, steps=1):  # once per iteration, after the update and the metrics record
        marks.step_end()
        advance(self, steps)

    trainer.Roles.trainable, MetricsLogger.advance = counting_trainable, timed_advance
    # Phases, timed the same way as the other configurations (perlhf's own time/* metrics are kept as a cross-check)
    in_update = []
    generate, scores = trainer.generate, trainer.Roles.scores
    policy_logprobs, reference_logprobs = trainer.Roles.policy_logprobs, trainer.Roles.reference_logprobs
    update = trainer.UPDATES[algorithm]

    def timed_policy_logprobs(self, *args, **kwargs):  # outside the update: the log-probs at sampling time
        if in_update:
            return policy_logprobs(self, *args, **kwargs)
        return marks.timed("reference", policy_logprobs, self, *args, **kwargs)

    def timed_update(*args, **kwargs):
        in_update.append(True)
        try:
            return marks.timed("update", update, *args, **kwargs)
        finally:
            in_update.clear()

    trainer.generate = lambda *args, **kwargs: marks.timed("generate", generate, *args, **kwargs)
    trainer.Roles.scores = lambda self, *args, **kwargs: marks.timed("score", scores, self, *args, **kwargs)
    trainer.Roles.policy_logprobs = timed_policy_logprobs
    trainer.Roles.reference_logprobs = lambda self, *a, **kw: marks.timed("reference", reference_logprobs, self, *a, **kw)
    trainer.UPDATES[algorithm] = timed_update

    k = spec["rloo_k"] if algorithm == "rloo" else 1
    config = trainer.RLConfig(
        model=spec["model"], reward_model=spec["reward_adapter_4bit" if quantize else "reward_adapter"],
        prompts=spec["prompts_file"], algorithm=algorithm, quantize=quantize,
        output_dir=spec["run_dir"], overwrite_output_dir=True, max_steps=spec["steps"],
        batch_size=spec["batch"] // k, samples_per_prompt=k, learning_rate=spec["lr"], value_learning_rate=spec["lr"],
        lora_rank=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_target="attention", kl_coef=spec["kl_coef"],
        max_new_tokens=spec["max_new_tokens"], temperature=1.0, top_p=1.0, save_steps=10**9, seed=spec["seed"],
        device=spec["device"], dtype=spec["dtype"], gradient_checkpointing=spec["gradient_checkpointing"],
        share_prefix=share_prefix)
    summary = trainer.train_policy(config)
    if not counted.get("shared_reward"):
        raise SystemExit("perlhf loaded the reward model as a separate model: the benchmark needs it on the backbone")
    figures = marks.figures()
    records = read_metrics(spec["run_dir"])[1:]  # perlhf's own per-iteration timings, iteration 1 left out
    own = {key.removeprefix("time/"): statistics.median(r[key] for r in records)
           for key in ("time/generate", "time/score", "time/reference", "time/update")}
    return {**figures, "trainable_parameters": counted["policy"] + counted["value"], "trainable_detail": counted,
            "phases": phase_medians(marks, figures),
            "response_length": statistics.median(r["policy/response_length"] for r in records),
            "tool_reported": {"peak_memory_mb": summary["peak_memory_mb"], "phase_seconds": own}}


def child_full(spec: dict) -> dict:
    """Full-parameter RL in the classic four-model layout, running perlhf.rl.trainer.update_reinforce's steps."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from perlhf.backbone import last_hidden, last_token_scores
    from perlhf.data import load_prompts
    from perlhf.models import load_model
    from perlhf.reward import pad_right
    from perlhf.rl import objectives as obj
    from perlhf.rl.rollout import encode_prompts, generate, prompt_and_response_lists, prompt_values, response_logprobs

    device = spec["device"]
    marks = Marks(device)
    marks.imported()
    fixed_length_generation()
    torch.manual_seed(spec["seed"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]

    loaded = load_model(spec["model"], device=device, dtype=spec["dtype"])
    tokenizer, policy = loaded.tokenizer, loaded.model
    policy.requires_grad_(True)
    reference = load_model(spec["model"], device=device, dtype=spec["dtype"], verbose=False).model
    reference.requires_grad_(False).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_merged"], dtype=dtype).to(device)
    reward.requires_grad_(False).eval()
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_merged"], dtype=dtype).to(device)
    value.requires_grad_(True)  # the critic starts as a copy of the reward model, as perlhf's value adapter does
    policy_params, value_params = list(policy.parameters()), list(value.parameters())
    optimizer = torch.optim.AdamW([{"params": policy_params, "lr": spec["full_lr"]},
                                   {"params": value_params, "lr": spec["full_lr"]}], weight_decay=0.0)
    all_params = policy_params + value_params
    prompts, _ = load_prompts(spec["prompts_file"])
    encoded, _ = encode_prompts(tokenizer, prompts, 256)
    marks.setup_done()

    timed = marks.timed
    batch = spec["batch"]
    lengths = []
    for iteration in range(spec["steps"]):
        chosen = [(iteration * batch + j) % len(encoded) for j in range(batch)]
        rollout = timed("generate", lambda: generate(policy, tokenizer, [encoded[i] for i in chosen],
                                                     spec["max_new_tokens"], 1.0))

        def score():
            prompt_ids, response_ids = prompt_and_response_lists(rollout)
            ids, mask = pad_right([p + r for p, r in zip(prompt_ids, response_ids)], tokenizer.pad_token_id,
                                  rollout.prompt_ids.device)
            with torch.no_grad():
                return last_token_scores(last_hidden(reward, ids, mask), reward.score, mask)

        scores = timed("score", score)

        def reference_pass():
            with torch.no_grad():
                policy.eval()
                old_logp, entropy = response_logprobs(policy, rollout, with_entropy=True)
                return old_logp, entropy, response_logprobs(reference, rollout)

        old_logp, _, ref_logp = timed("reference", reference_pass)
        mask = rollout.response_mask
        kl = obj.kl_per_token(old_logp, ref_logp, "k1") * mask
        returns = obj.sequence_returns(scores, kl, mask, spec["kl_coef"])

        def update():  # perlhf.rl.trainer.update_reinforce with one mini-batch = the whole rollout, one epoch
            policy.train()
            value.train()
            predicted = prompt_values(value, value.score, rollout)
            v_loss = obj.value_loss(predicted, returns, torch.ones_like(predicted))
            (0.5 * v_loss).backward()
            advantages = obj.baseline_advantages(returns, predicted.detach())
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            loss = obj.policy_gradient_loss(response_logprobs(policy, rollout), advantages, mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(all_params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item(), v_loss.item()

        timed("update", update)
        lengths.append(mask.sum(dim=1).float().mean().item())
        marks.step_end()
        print(f"full: iteration {iteration + 1}/{spec['steps']} done", flush=True)
    figures = marks.figures()
    return {**figures, "trainable_parameters": sum(p.numel() for p in all_params),
            "trainable_detail": {"policy": sum(p.numel() for p in policy_params),
                                 "value": sum(p.numel() for p in value_params)},
            "phases": phase_medians(marks, figures), "response_length": statistics.median(lengths[1:])}


def child_trl(spec: dict) -> dict:
    """trl.RLOOTrainer, LoRA policy + separate sequence-classification reward model, with timing probes."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    device = spec["device"]
    marks = Marks(device)
    marks.imported()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    lengths = []

    timed = marks.timed

    class Probe(trl.RLOOTrainer):
        def _generate(self, prompts):
            return timed("generate", super()._generate, prompts)

        def _calculate_rewards(self, *args, **kwargs):
            return timed("score", super()._calculate_rewards, *args, **kwargs)

        def _generate_and_score_completions(self, inputs):
            out = timed("rollout", super()._generate_and_score_completions, inputs)
            lengths.append(out["completion_mask"].sum(dim=1).float().mean().item())
            return out

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.setup_done()

        def on_step_end(self, args, state, control, **kwargs):  # after optimizer.step, scheduler, zero_grad
            marks.step_end()

    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts_file"]).read_text().splitlines() if line]
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    t = spec["max_new_tokens"]
    args = trl.RLOOConfig(
        output_dir=spec["run_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        num_generations=spec["rloo_k"], steps_per_generation=1, num_iterations=1, max_completion_length=t,
        generation_kwargs={"min_new_tokens": t}, temperature=1.0, top_p=1.0, top_k=0, beta=spec["kl_coef"],
        normalize_advantages=True,  # perlhf whitens advantages too
        learning_rate=spec["lr"], lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0,
        optim="adamw_torch",  # torch.optim.AdamW, as perlhf
        # checkpointing as perlhf's (both on by default); bf16 autocast (TRL's default) off: fp32 like the others
        gradient_checkpointing=spec["gradient_checkpointing"], bf16=False, fp16=False,
        model_init_kwargs={"dtype": dtype}, use_cpu=device == "cpu", save_strategy="no", eval_strategy="no",
        logging_steps=1, report_to="none", dataloader_num_workers=0, seed=spec["seed"], disable_dropout=True)
    lora = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                      target_modules=LLAMA_ATTENTION, bias="none", task_type="CAUSAL_LM")
    trainer = Probe(model=spec["model_dir"], reward_funcs=spec["reward_merged"], args=args, train_dataset=dataset,
                    processing_class=tokenizer, peft_config=lora, callbacks=[StepTimer()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    figures = marks.figures()
    # TRL's rollout = generate + score + the policy's and the reference's log-probs; the rest of the step (`other`)
    # is its loss forward, backward, optimizer step and logging
    phases = phase_medians(marks, figures, nested={"reference": ("rollout", "generate", "score")})
    phases["update"] = phases.pop("other")
    own = [row["step_time"] for row in trainer.state.log_history if "step_time" in row][1:]
    return {**figures, "trainable_parameters": trainable, "phases": phases,
            "response_length": statistics.median(lengths[1:]), "trl_version": trl.__version__,
            "tool_reported": {"step_time_median": statistics.median(own) if own else None}}


def run_child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    if args.child.startswith("perlhf-"):  # perlhf-reinforce, perlhf-rloo, and the same on a 4-bit base (-4bit)
        algorithm, _, variant = args.child.removeprefix("perlhf-").partition("-")
        result = child_perlhf(spec, algorithm, None if variant in ("", "unshared") else variant,
                              share_prefix=variant != "unshared")
    elif args.child == "full-reinforce":
        result = child_full(spec)
    elif args.child == "trl-rloo":
        result = child_trl(spec)
    else:
        raise SystemExit(f"unknown child {args.child}")
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parent: stdlib only, so children inherit nothing large


def run_logged(command: list[str], log_path: Path, env: dict, what: str) -> None:
    with open(log_path, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"{what} failed (exit {code}); log {log_path}:\n{log_path.read_text(errors='replace')[-3000:]}")


def prepare(args, work: Path, env: dict, log) -> dict:
    """Prompts (chat messages of equal token length), a tiny LoRA reward model and its merged export."""
    n = args.prompts
    if n > len(TOPICS):
        raise SystemExit(f"--prompts must be <= {len(TOPICS)}")
    prompts_file = work / "prompts.jsonl"
    prompts = [[{"role": "user", "content": f"Write a short note about {topic}."}] for topic in TOPICS[:n]]
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    reward_adapter, reward_merged = Path(args.reward_model) if args.reward_model else work / "reward", work / "reward-merged"
    perlhf = [sys.executable, "-m", "perlhf.cli"]
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": f"{t.capitalize()} is worth a closer look today.",
                                         "rejected": "No."}) + "\n" for p, t in zip(prompts, TOPICS)))
    if not (reward_adapter / "adapter_config.json").exists():
        if args.reward_model:
            raise SystemExit(f"--reward-model {reward_adapter}: no adapter_config.json (a LoRA reward model is needed)")
        log(f"training a throw-away LoRA reward model ({args.rm_steps} steps) -> {reward_adapter}")
        run_logged([*perlhf, "rm", "train", "--model", args.model, "--data", str(pairs), "--validation-fraction", "0",
                    "--output-dir", str(reward_adapter), "--overwrite-output-dir", "--max-steps", str(args.rm_steps),
                    "--per-device-train-batch-size", "4", "--eval-steps", "0", "--save-steps", "1000",
                    "--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_alpha), "--lora-target", "attention",
                    "--max-length", "128", "--device", args.device], work / "rm-train.log", env, "perlhf rm train")
    reward_4bit = work / "reward-4bit"  # the same reward model trained on the 4-bit base, for the 4-bit rows
    if any(name.endswith("-4bit") for name in args.only) and not (reward_4bit / "adapter_config.json").exists():
        log(f"training the same reward model on the 4-bit base -> {reward_4bit}")
        run_logged([*perlhf, "rm", "train", "--model", args.model, "--data", str(work / "pairs.jsonl"),
                    "--validation-fraction", "0", "--output-dir", str(reward_4bit), "--overwrite-output-dir",
                    "--max-steps", str(args.rm_steps), "--per-device-train-batch-size", "4", "--eval-steps", "0",
                    "--save-steps", "1000", "--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_alpha),
                    "--lora-target", "attention", "--max-length", "128", "--device", args.device, "--quantize", "4bit"],
                   work / "rm-train-4bit.log", env, "perlhf rm train --quantize 4bit")
    if not (reward_merged / "config.json").exists():
        log(f"merging it into a sequence-classification model -> {reward_merged}")
        run_logged([*perlhf, "export", "--adapter", str(reward_adapter), "--output-dir", str(reward_merged),
                    "--merge", "--overwrite"], work / "export.log", env, "perlhf export --merge")
    probe = ("import json, sys\nfrom transformers import AutoTokenizer\n"
             "from perlhf.models import resolve_model_path\nfrom perlhf.data import render_prompt\n"
             "path = resolve_model_path(sys.argv[1])[0]\ntok = AutoTokenizer.from_pretrained(path)\n"
             "prompts = [json.loads(l)['prompt'] for l in open(sys.argv[2]) if l.strip()]\n"
             "n = [len(tok(render_prompt(tok, p), add_special_tokens=False)['input_ids']) for p in prompts]\n"
             "print(json.dumps({'model_dir': path, 'prompt_tokens': [min(n), max(n)]}))\n")
    out = subprocess.run([sys.executable, "-c", probe, args.model, str(prompts_file)], capture_output=True, text=True,
                         env=env, check=True).stdout.strip().splitlines()[-1]
    info = json.loads(out)
    if info["prompt_tokens"][0] != info["prompt_tokens"][1]:
        log(f"note: prompts render to {info['prompt_tokens'][0]}-{info['prompt_tokens'][1]} tokens (not all equal)")
    return {**info, "prompts_file": str(prompts_file), "reward_adapter": str(reward_adapter),
            "reward_adapter_4bit": str(reward_4bit),
            "reward_merged": str(reward_merged)}


def spawn(name: str, tag: str, spec: dict, work: Path, env: dict, log) -> dict:
    spec_path, result_path, log_path = work / f"{tag}.spec.json", work / f"{tag}.result.json", work / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    run_logged([sys.executable, __file__, "--child", name, "--spec", str(spec_path), "--result", str(result_path)],
               log_path, env, tag)
    result = {**json.loads(result_path.read_text()), "wall_seconds": time.perf_counter() - started,
              "load_1min_at_start": load}
    log(f"  {tag}: {result['seconds_per_iteration']:.2f} s/iteration ({result['cpu_seconds_per_iteration']:.2f} CPU-s), "
        f"peak {result['peak_mb']:.0f} MiB (child {result['wall_seconds']:.0f}s, load {load:.1f}, "
        f"{result['major_page_faults_per_iteration']:.0f} major faults and "
        f"{result['involuntary_switches_per_iteration']:.0f} preemptions per iteration)")
    return result


def ratios(summary: dict, metric_override: str | None = None) -> dict:
    out = {}
    for name, (num, den, metric, goal, sense) in RATIOS.items():
        if num in summary and den in summary:
            key = metric_override if metric_override and "time" in name else metric
            value = summary[num][key] / summary[den][key]
            out[name] = {"value": value, "goal": f"{sense} {goal}", "met": value <= goal if sense == "<=" else value >= goal,
                         "of": f"{num} / {den}"}
    return out


def extra_ratios(summary: dict) -> dict:
    return {name: {"value": summary[num][metric] / summary[den][metric], "of": f"{num} / {den}"}
            for name, (num, den, metric) in EXTRA_RATIOS.items() if num in summary and den in summary}


def render(report: dict) -> str:
    s, rounds, summary = report["settings"], report["rounds"], report["summary"]
    unit = "peak CUDA allocated (MiB)" if s["device"].startswith("cuda") else "peak RSS (MiB)"
    each = lambda name, key, fmt: " / ".join(format(rd[name][key], fmt) for rd in rounds if name in rd)  # noqa: E731
    lines = [f"{s['batch']} sequences per iteration ({s['batch']} prompts x 1 for REINFORCE, {s['batch'] // s.get('rloo_k', 2)} x "
             f"{s.get('rloo_k', 2)} for RLOO), prompt {report['data']['prompt_tokens'][0]} tokens + exactly {s['max_new_tokens']} generated, "
             f"{s['steps']} iterations per run (iteration 1 = warm-up, not timed), LoRA r={s['lora_rank']} "
             f"alpha={s['lora_alpha']:g} on q,k,v,o, perlhf gradient checkpointing "
             f"{'on' if s.get('gradient_checkpointing', True) else 'off'} (and TRL's), {s['device']} {s['dtype']}, "
             f"{len(rounds)} interleaved round(s); glibc mmap threshold: "
             + (f"MALLOC_MMAP_THRESHOLD_={s['malloc_mmap_threshold']} in every child; "
                if s.get("malloc_mmap_threshold") else "glibc's default, perlhf's RL fixing it at 4 MiB itself; ")
             + "each figure is the median over rounds of each run's median, each round's value in brackets.", "",
             f"| configuration | trainable params | s / iteration | CPU-s / iteration | {unit} | RSS after imports | "
             "after setup | preemptions / major faults per iteration |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['trainable_parameters']:,} | {r['seconds_per_iteration']:.2f} "
                     f"({each(name, 'seconds_per_iteration', '.2f')}) | {r['cpu_seconds_per_iteration']:.2f} | "
                     f"{r['peak_mb']:.0f} ({each(name, 'peak_mb', '.0f')}) | {r['rss_after_imports_mb']:.0f} | "
                     f"{r['rss_after_setup_mb']:.0f} | {r['involuntary_switches_per_iteration']:.0f} / "
                     f"{r['major_page_faults_per_iteration']:.0f} |")
    if not s["device"].startswith("cuda"):
        lines += ["", "Peak RSS includes the interpreter and its imports (the RSS after imports column). transformers maps "
                  "safetensors weights into memory and they enter RSS when first used, so the RSS after setup is below "
                  "the weights' size; the peak, taken after the last iteration, holds them all."]
    lines += ["", "Wall time on a shared machine includes time the scheduler gives the core to other processes "
              "(preemptions) and time waiting for pages read from disk (major faults); the CPU-time column and "
              "cross-check below count only this process's own work."]
    lines += ["", "| ratio | of | value (wall) | per round | CPU-time cross-check | goal | met (wall / CPU) |",
              "|---|---|---:|---:|---:|---:|:---:|"]
    yes = lambda met: "yes" if met else "NO"  # noqa: E731
    for name, r in report["ratios"].items():
        per_round = " / ".join(f"{rd[name]['value']:.2f}" for rd in report["round_ratios"] if name in rd)
        cpu = report["cpu_ratios"][name] if "time" in name else None
        lines.append(f"| {name} | {r['of']} | {r['value']:.3f} | {per_round} | "
                     f"{format(cpu['value'], '.3f') if cpu else '-'} | {r['goal']} | "
                     f"{yes(r['met'])}{' / ' + yes(cpu['met']) if cpu else ''} |")
    for name, r in report["extra_ratios"].items():
        lines.append(f"| {name} | {r['of']} | {r['value']:.3f} | | | - | |")
    names = ["generate", "score", "reference", "update", "other"]
    lines += ["", "Where an iteration's time goes: wall / CPU seconds, medians over iterations 2..N and rounds. generate = "
              "sampling with the KV cache; score = the reward model; reference = the policy's log-probs at sampling "
              "time and the reference's; update = value and policy losses, backward, optimizer step; other = the rest "
              "(KL, returns, logging).", "",
              "| configuration | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for name, r in summary.items():
        cells = [f"{r['phases'][p]['wall']:.2f} / {r['phases'][p]['cpu']:.2f}" if p in r["phases"] else "-"
                 for p in names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m, s, loads = report["machine"], report["settings"], report["load_average"]["1min_at_each_child_start"]
    before, after = report["load_average"]["before"][0], report["load_average"]["after"][0]
    header = ["# RL iteration benchmark", "",
              f"- command: `{report['command']}`", f"- date: {report['date']}",
              f"- machine: {m['cpu']}, {m['usable_cores']} usable cores" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
              + f"; shared: 1-min load average {min(loads):.1f}-{max(loads):.1f} at the children's starts "
              f"(median {statistics.median(loads):.1f}), {before:.1f} before, {after:.1f} after",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
              f"- model: {s['model']}; reward model: "
              + (s["reward_model"] or f"a {s['rm_steps']}-step throw-away LoRA from `perlhf rm train`")
              + " (an adapter on perlhf's backbone; merged by `perlhf export --merge` into a separate "
              "sequence-classification model for full and TRL)",
              f"- threads per child: {s['threads'] or 'torch default'}; timings on a shared machine are noisy: "
              "compare the per-round values and the CPU-time cross-check", ""]
    return "\n".join(header + [render(report)]) + "\n"


def summarise(rounds: list[dict], names: list[str]) -> dict:
    keys = ("seconds_per_iteration", "cpu_seconds_per_iteration", "peak_mb", "rss_after_imports_mb",
            "rss_after_setup_mb", "peak_above_imports_mb", "response_length", "major_page_faults_per_iteration",
            "involuntary_switches_per_iteration")
    summary = {}
    for name in names:
        runs = [r[name] for r in rounds if name in r]
        phases = sorted({p for run in runs for p in run["phases"]})
        summary[name] = {**{k: statistics.median(run[k] for run in runs) for k in keys},
                         "trainable_parameters": runs[0]["trainable_parameters"],
                         "phases": {p: {kind: statistics.median(run["phases"][p][kind] for run in runs if p in run["phases"])
                                        for kind in ("wall", "cpu")} for p in phases}}
    return summary


def main() -> int:
    if "--child" in sys.argv:
        return run_child(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--reward-model", default=None,
                        help="an existing LoRA reward model from `perlhf rm train` (default: train a throw-away one)")
    parser.add_argument("--rm-steps", type=int, default=2, help="steps of the throw-away reward model")
    parser.add_argument("--prompts", type=int, default=8, help="distinct chat prompts (<= 16)")
    parser.add_argument("--batch", type=int, default=8, help="generated sequences per iteration (even)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="exact response length (EOS suppressed)")
    parser.add_argument("--rloo-k", type=int, default=2, help="RLOO samples per prompt (perlhf and TRL)")
    parser.add_argument("--steps", type=int, default=4, help="iterations per run; the first is warm-up and not timed")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every configuration")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate (speed does not depend on it)")
    parser.add_argument("--full-lr", type=float, default=1e-6, help="full-parameter learning rate")
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the cuda path has not been run yet)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch (OpenMP) threads per child; 0 = torch's choice. Default 1: on a shared machine with "
                             "2 cores, 2 OpenMP threads spin at every barrier while the other core runs someone else's "
                             "job (measured here: a forward 4x slower in wall time and 4x the CPU time)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="run perlhf and TRL without gradient checkpointing (both default to it; the full baseline "
                             "never uses it)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in every child, the baselines' too (perlhf's RL fixes "
                             "it at 4 MiB on CPU by itself, see perlhf.models.return_freed_memory; this setting wins)")
    parser.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rl_benchmark.json"),
                        help="JSON report; the Markdown table goes next to it (.md)")
    parser.add_argument("--work-dir", default=None,
                        help="prompts, reward model, run dirs, child logs (default: a temp dir, removed); "
                             "a reused --work-dir reuses its reward model")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3 (iteration 1 is warm-up; the median needs >= 2 timed iterations)")
    if args.rloo_k < 2 or args.batch < args.rloo_k or args.batch % args.rloo_k:
        parser.error("--batch must be a multiple of --rloo-k >= 2 (RLOO takes --batch/k prompts x k samples)")

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="perlhf-rl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(ROOT, args.threads)
    if args.malloc_mmap_threshold:  # read by glibc at process start, so it must be in the environment
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    load_before = os.getloadavg()
    started = time.perf_counter()
    log(f"work dir {work}")
    data = prepare(args, work, env, log)
    cuda = args.device.startswith("cuda")
    spec = {"model": args.model, "model_dir": data["model_dir"], "prompts_file": data["prompts_file"],
            "reward_adapter": data["reward_adapter"], "reward_adapter_4bit": data["reward_adapter_4bit"],
            "reward_merged": data["reward_merged"], "batch": args.batch,
            "max_new_tokens": args.max_new_tokens, "steps": args.steps, "lora_rank": args.lora_rank,
            "lora_alpha": args.lora_alpha, "lr": args.lr, "full_lr": args.full_lr, "kl_coef": args.kl_coef,
            "seed": 0, "device": args.device, "dtype": "bfloat16" if cuda else "float32", "threads": args.threads,
            "reward_model": args.reward_model, "rm_steps": args.rm_steps, "rloo_k": args.rloo_k,
            "gradient_checkpointing": not args.no_gradient_checkpointing,
            "malloc_mmap_threshold": args.malloc_mmap_threshold}

    rounds = []
    for index in range(args.rounds):
        order = args.only if index % 2 == 0 else list(reversed(args.only))
        log(f"round {index + 1}/{args.rounds}: {', '.join(order)}")
        rounds.append({name: spawn(name, f"{name}-{index + 1}", {**spec, "run_dir": str(work / f"run-{name}-{index + 1}")},
                                   work, env, log) for name in order})
    load_after = os.getloadavg()
    loads = [r[name]["load_1min_at_start"] for r in rounds for name in r]
    summary = summarise(rounds, args.only)
    report = {"command": shlex.join(["python", *sys.argv]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "load_average": {"before": load_before, "after": load_after, "1min_at_each_child_start": loads},
              "versions": versions(), "settings": spec, "data": data, "summary": summary, "rounds": rounds,
              "ratios": ratios(summary), "round_ratios": [ratios(r) for r in rounds],
              "cpu_ratios": ratios(summary, "cpu_seconds_per_iteration"), "extra_ratios": extra_ratios(summary),
              "total_seconds": time.perf_counter() - started}
    table = render(report)
    log("\n" + table)
    out = Path(args.out)
    write_report(out, report, markdown(report))
    log(f"\nwrote {out} and {out.with_suffix('.md')} ({report['total_seconds'] / 60:.1f} min)")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
