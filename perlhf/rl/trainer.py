"""PERL's RL loop: a policy LoRA adapter trained against a LoRA reward model, all roles on ONE backbone.

Each iteration: sample responses (policy role) -> score them (reward role) -> log-probs under the anchor
(reference role: adapters off, or a frozen copy of the starting adapter) -> the algorithm's update
(`update_reinforce`, `update_rloo` or `update_ppo`, each readable on its own) -> log, checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from perlhf import config as cfg
from perlhf import parallel, prefix_sharing
from perlhf.backbone import Backbone, enable_gradient_checkpointing, lora_config, new_head
from perlhf.config import check, field
from perlhf.models import DEFAULT_MODEL
from perlhf.rl import objectives as obj
from perlhf.prefix_sharing import PackedRollout
from perlhf.rl.rollout import (Rollout, check_logprobs_match_sampler, encode_prompts, generate,
                               ignored_generation_settings, prompt_values, response_logprobs, response_texts,
                               response_values, sequence_seed)

ALGORITHMS = ("reinforce", "rloo", "ppo")


@dataclass
class RLConfig:
    model: str = field(DEFAULT_MODEL, "backbone: Hugging Face model id or local directory")
    reward_model: str = field("", "reward model directory from `perlhf rm train`")
    prompts: str = field("", "prompts: .txt (one per line), JSONL/JSON/Parquet/CSV with a prompt column, or a dataset id")
    prompt_column: str | None = field(None, "column holding the prompt, if not `prompt`")
    limit: int | None = field(None, "use at most this many prompts")
    algorithm: str = field("reinforce", "reinforce (the paper's, with a value baseline), rloo, or ppo")
    policy_adapter: str | None = field(None, "start the policy from this LoRA adapter; the anchor is then a frozen copy of it")
    output_dir: str = field("runs/rl", "run directory: adapters, checkpoints, logs, report")
    overwrite_output_dir: bool = field(False, "start over instead of resuming from the last checkpoint")
    max_steps: int = field(50, "RL iterations (one rollout batch and its update each)")
    batch_size: int = field(8, "prompts per iteration per device")
    samples_per_prompt: int | None = field(None, "responses per prompt (k); default 2 for rloo (which needs k >= 2), else 1")
    mini_batch_size: int | None = field(None, "sequences per optimizer step; default: the whole rollout batch")
    update_epochs: int = field(1, "passes over each rollout batch (PPO often uses 2-4)")
    learning_rate: float = field(1e-4, "policy adapter learning rate")
    value_learning_rate: float = field(1e-4, "value adapter and head learning rate")
    lr_scheduler_type: str = field("constant", "transformers scheduler name")
    max_grad_norm: float = field(1.0, "gradient clipping norm of the policy adapter")
    value_max_grad_norm: float | None = field(None, "gradient clipping norm of the value adapter and head, clipped "
                                                    "apart from the policy's (default: --max-grad-norm)")
    lora_rank: int = field(8, "policy and value LoRA rank")
    lora_alpha: float = field(16.0, "LoRA alpha")
    lora_target: str = field("attention", "attention, all-linear, or comma-separated module names")
    gradient_checkpointing: bool | None = field(None, "recompute activations in backward: much less memory, a third "
                                                      "more compute; default: on when the run would not fit "
                                                      "otherwise (perlhf plan)")
    kl_coef: float = field(0.05, "KL penalty coefficient (the paper's 0.05)")
    kl_estimator: str = field("k1", "k1 or k3")
    target_kl: float | None = field(None, "adapt the KL coefficient towards this summed KL per response")
    kl_horizon: int = field(10000, "adaptive KL controller horizon, in samples")
    max_prompt_length: int = field(256, "prompt tokens kept (cut from the left)")
    max_new_tokens: int = field(48, "maximum tokens per response")
    temperature: float = field(1.0, "sampling temperature; log-probs, KL, ratios and entropy are those of "
                                    "softmax(logits / temperature), the distribution that sampled")
    top_p: float = field(1.0, "must stay 1: RL samples the whole tempered distribution (see --temperature)")
    missing_eos_penalty: float = field(0.0, "subtracted from the reward of responses that never end")
    whiten_advantages: bool = field(True, "normalise advantages over the batch")
    clip_range: float = field(0.2, "PPO policy clip")
    value_clip_range: float = field(0.2, "PPO value clip")
    value_coef: float = field(0.5, "weight of the value loss")
    gamma: float = field(1.0, "PPO discount")
    lam: float = field(0.95, "PPO GAE lambda")
    save_steps: int = field(10, "checkpoint every N iterations")
    save_total_limit: int = field(2, "checkpoints kept")
    seed: int = field(42, "random seed")
    device: str | None = field(None, "cpu, cuda, ...; default: cuda if available")
    dtype: str | None = field(None, "default: bf16 on CUDA, fp32 on CPU")
    quantize: str | None = field(None, cfg.QUANTIZE_HELP)
    fsdp: bool = field(False, cfg.FSDP_HELP)
    trust_remote_code: bool = field(False, "allow model code from the model repository")
    allow_pickle: bool = field(False, "allow pickle-based weight files")
    share_prefix: bool = field(True, "with k > 1 samples per prompt, compute each prompt once per group in the "
                                     "log-prob, reference and value passes; exact, and off by itself where a "
                                     "model cannot do it exactly")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check(bool(self.reward_model), "reward_model", "is required")
        check(bool(self.prompts), "prompts", "is required")
        check(self.algorithm in ALGORITHMS, "algorithm", f"must be one of {', '.join(ALGORITHMS)} (got {self.algorithm!r})")
        if self.samples_per_prompt is None:
            self.samples_per_prompt = 2 if self.algorithm == "rloo" else 1
        check(self.algorithm != "rloo" or self.samples_per_prompt >= 2, "samples_per_prompt",
              f"rloo needs k >= 2 samples per prompt (got {self.samples_per_prompt})")
        check(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
        check(self.max_steps >= 1, "max_steps", f"must be >= 1 (got {self.max_steps})")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        rollout = self.batch_size * self.samples_per_prompt
        check(self.mini_batch_size is None or 1 <= self.mini_batch_size <= rollout, "mini_batch_size",
              f"must be between 1 and the rollout batch {rollout}")
        check(self.update_epochs >= 1, "update_epochs", "must be >= 1")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0 (got {self.learning_rate})")
        check(self.value_learning_rate > 0, "value_learning_rate", "must be > 0")
        check(self.lora_rank >= 1, "lora_rank", f"must be >= 1 (got {self.lora_rank})")
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        check(self.kl_estimator in ("k1", "k3"), "kl_estimator", "must be k1 or k3")
        check(self.target_kl is None or self.target_kl > 0, "target_kl", "must be > 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.max_prompt_length >= 1, "max_prompt_length", "must be >= 1")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(self.top_p == 1.0, "top_p", "must be 1 for RL: a nucleus gives zero probability to tokens the updated "
              "policy and the reference still assign mass to, so log-probs, PPO ratios and the KL would be infinite or "
              "wrong; sharpen sampling with --temperature instead, which the log-probs follow exactly")
        check(self.save_steps >= 1 and self.save_total_limit >= 1, "save_steps", "--save-steps and --save-total-limit must be >= 1")
        check(self.lora_alpha > 0, "lora_alpha", f"must be > 0 (got {self.lora_alpha})")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0 (got {self.max_grad_norm})")
        check(self.value_max_grad_norm is None or self.value_max_grad_norm > 0, "value_max_grad_norm",
              f"must be > 0 (got {self.value_max_grad_norm})")
        check(self.clip_range > 0, "clip_range", f"must be > 0 (got {self.clip_range})")
        check(self.value_clip_range > 0, "value_clip_range", f"must be > 0 (got {self.value_clip_range})")
        check(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1] (got {self.gamma})")
        check(0 <= self.lam <= 1, "lam", f"must be in [0, 1] (got {self.lam})")
        check(self.value_coef >= 0, "value_coef", f"must be >= 0 (got {self.value_coef})")
        check(self.kl_horizon >= 1, "kl_horizon", f"must be >= 1 (got {self.kl_horizon})")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 (got {self.limit})")
        cfg.check_dtype(self.dtype)
        cfg.check_quantize(self.quantize)
        cfg.check_fsdp(self.fsdp, False, self.quantize)
        cfg.check_scheduler(self.lr_scheduler_type)

    @property
    def uses_value(self) -> bool:
        return self.algorithm in ("reinforce", "ppo")


# ---------------------------------------------------------------------------------------------------------------
# The roles on one backbone


class Roles:
    """Policy, reference, reward and value over one backbone. `reference` is None (adapters off) unless the
    policy started from an adapter, in which case it is a frozen copy of that adapter."""

    def __init__(self, config: RLConfig, loaded, verbose: bool = True):
        from perlhf.reward import fits_backbone, load_reward_model, reward_adapter

        self.config, self.tokenizer = config, loaded.tokenizer
        self.backbone = Backbone(loaded.model)
        base = loaded.model
        if config.policy_adapter:
            self.backbone.load_adapter("policy", config.policy_adapter, trainable=True)
            self.backbone.copy_adapter("policy", "reference", trainable=False)
            self.reference: str | None = "reference"
        else:
            self.backbone.add_adapter("policy", lora_config(base, config.lora_rank, config.lora_alpha, 0.0,
                                                            config.lora_target), trainable=True)
            self.reference = None

        self.shared_reward = fits_backbone(config.reward_model, config.model, loaded.quantization)
        if self.shared_reward:  # the reward role, read as `perlhf rm score` reads it
            self.reward = reward_adapter(self.backbone, "reward", config.reward_model, self.tokenizer)
        else:
            before = _parameter_bytes(base)
            self.reward = load_reward_model(config.reward_model, device=str(next(base.parameters()).device),
                                            dtype=config.dtype, verbose=verbose)
            if verbose:
                print(f"perlhf: the reward model was trained on another base "
                      f"({self.reward.base_model or config.reward_model}, or quantized otherwise); it is loaded as it "
                      f"was trained, as a separate model, "
                      f"costing {_parameter_bytes(self.reward) / 2**20:.0f} MiB of weights beside the "
                      f"{before / 2**20:.0f} MiB shared backbone")

        if config.uses_value:
            if self.shared_reward:  # the value adapter and head start as a trainable copy of the reward model's
                self.backbone.copy_adapter("reward", "value", trainable=True)
            else:
                self.backbone.add_adapter("value", lora_config(base, config.lora_rank, config.lora_alpha, 0.0,
                                                               config.lora_target), trainable=True)
                self.backbone.heads["value"] = new_head(base)
                self.backbone.set_trainable("value", True)
        disable_dropout(self.backbone.model)
        self.share_prefix: bool | None = None if config.share_prefix else False  # None: decided at the first rollout
        if not config.share_prefix:
            self.reward.share_prefix = False  # the reward model scores the k samples of a prompt plainly too

    def scores(self, rollout: Rollout, prompts: list) -> torch.Tensor:
        """Reward-model scores of each (prompt, response text): exactly what `perlhf rm score` gives, whichever
        EOS id ended the response (the text is read without it, and the reward model's own EOS closes it)."""
        texts = response_texts(self.tokenizer, rollout)
        with self.backbone.role("reward") if self.shared_reward else contextlib.nullcontext():
            return torch.tensor(self.reward.score(prompts, texts), device=rollout.prompt_ids.device)

    def packed(self, rollout: Rollout) -> PackedRollout | None:
        """The rollout with each group's prompt computed once, where sharing is on and a prompt repeats."""
        if not self.share_prefix:
            return None
        return prefix_sharing.pack_rollout(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                           rollout.response_mask, prefix_sharing.attention_of(self.backbone.model),
                                           next(self.backbone.model.parameters()).dtype)

    def decide_sharing(self, rollout: Rollout, verbose: bool) -> None:
        """At the first rollout: prefix sharing stays on only where it is exact on this model, and the packed
        reference log-probs of that rollout equal the plain ones. Said in one line."""
        if self.share_prefix is not None:
            return
        if self.config.samples_per_prompt == 1:  # nothing to share (and under FSDP every process must agree)
            self.share_prefix = False
            return
        reason = prefix_sharing.sharing_failure(self.backbone.model, self.config.max_prompt_length
                                                + self.config.max_new_tokens)
        self.share_prefix = reason is None
        packed = self.packed(rollout) if reason is None else None
        if packed is not None:
            with torch.no_grad(), self.backbone.role(self.reference):
                shared = response_logprobs(self.backbone.model, rollout, self.config.temperature, packed=packed)
                plain = response_logprobs(self.backbone.model, rollout, self.config.temperature)
            if not prefix_sharing.agrees(shared, plain, next(self.backbone.model.parameters()).dtype):
                reason = f"packed log-probs differ from the plain ones by {(shared - plain).abs().max().item():.2g}"
                self.share_prefix = False
        if verbose:
            print("perlhf: each prompt's forward pass is shared by its group of samples (prefix sharing, checked "
                  "equal on the first rollout; --share-prefix false turns it off)" if reason is None else
                  f"perlhf: prefix sharing is off for this model: {reason}")

    def policy_logprobs(self, rollout: Rollout, with_entropy: bool = False, train: bool = False):
        with self.backbone.role("policy", train=train):
            return response_logprobs(self.backbone.model, rollout, self.config.temperature, with_entropy,
                                     self.packed(rollout))

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        with torch.no_grad(), self.backbone.role(self.reference):
            return response_logprobs(self.backbone.model, rollout, self.config.temperature,
                                     packed=self.packed(rollout))

    def values(self, rollout: Rollout, train: bool = False) -> torch.Tensor:
        with self.backbone.role("value", train=train):
            return response_values(self.backbone.model, self.backbone.heads["value"], rollout, self.packed(rollout))

    def prompt_values(self, rollout: Rollout, train: bool = False) -> torch.Tensor:
        with self.backbone.role("value", train=train):
            return prompt_values(self.backbone.model, self.backbone.heads["value"], rollout, bool(self.share_prefix))

    def backward(self, role: str, loss: torch.Tensor) -> None:
        """Backward inside the role that ran the forward: gradient checkpointing recomputes each layer during
        backward with whatever adapter is active then, so outside the role it would use the wrong adapter."""
        with self.backbone.role(role, train=True):
            loss.backward()

    def trainable(self) -> tuple[list, list]:
        value = self.backbone.trainable_parameters("value") if self.config.uses_value else []
        return self.backbone.trainable_parameters("policy"), value


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout probability: of the backbone, of its config, and of the LoRA adapters loaded on it.

    RL passes must compute the log-probs of the policy that sampled, and sampling runs without dropout. Train
    mode cannot simply be left off, because transformers' gradient checkpointing only runs in train mode; so
    dropout is removed instead (nn.Dropout modules, and the float rates attention layers read in forward).
    """
    configs = [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]
    for config in {id(c): c for c in configs if c is not None}.values():
        for key, value in vars(config).items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, 0.0)


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# The algorithms: each turns one scored rollout batch into optimizer steps


@dataclass
class Batch:
    rollout: Rollout
    old_logp: torch.Tensor    # policy log-probs at sampling time [B, T]
    kl: torch.Tensor          # per-token KL estimate to the reference [B, T]
    rewards: torch.Tensor     # reward-model scores less the missing-EOS penalty [B]
    returns: torch.Tensor     # rewards - kl_coef * KL [B]
    kl_coef: float            # the coefficient in force when this batch was sampled
    live_logp: torch.Tensor | None = None  # old_logp with its graph, when the update may reuse that pass


def minibatches(size: int, mini: int, epochs: int, generator: torch.Generator):
    for _ in range(epochs):
        order = torch.randperm(size, generator=generator)
        for start in range(0, size, mini):
            yield order[start:start + mini]


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Advantages normalised over the global batch (every process's sequences), as one process would."""
    mask = torch.ones_like(values) if mask is None else mask
    if parallel.all_sum(mask.sum()).item() < 2:  # one sequence: nothing to normalise against
        return values
    return obj.masked_whiten(values, mask, total=parallel.all_sum)


def update_reinforce(roles: Roles, batch: Batch, step, config: RLConfig, generator) -> dict:
    """The paper's REINFORCE with a learned value baseline: A = R - V(prompt); value regressed on R."""
    stats = []
    for index in minibatches(len(batch.returns), config.mini_batch_size or len(batch.returns), config.update_epochs, generator):
        part = batch.rollout.select(index)
        predicted = roles.prompt_values(part, train=True)  # the baseline, and what the value loss fits
        v_loss = obj.value_loss(predicted, batch.returns[index], torch.ones_like(predicted))
        roles.backward("value", config.value_coef * v_loss)
        advantages = obj.baseline_advantages(batch.returns[index], predicted.detach())
        if config.whiten_advantages:
            advantages = whiten(advantages)
        policy_loss = obj.policy_gradient_loss(_policy_logprobs(roles, batch, index), advantages, part.response_mask)
        roles.backward("policy", policy_loss)
        stats.append({"loss/policy": policy_loss.item(), "loss/value": v_loss.item(), **step(policy_loss + v_loss)})
    return _mean(stats)


def update_rloo(roles: Roles, batch: Batch, step, config: RLConfig, generator) -> dict:
    """RLOO: k samples per prompt, each compared with the mean of the other k-1; no critic."""
    advantages = obj.rloo_advantages(batch.returns, config.samples_per_prompt)
    if config.whiten_advantages:
        advantages = whiten(advantages)
    stats = []
    for index in minibatches(len(batch.returns), config.mini_batch_size or len(batch.returns), config.update_epochs, generator):
        part = batch.rollout.select(index)
        loss = obj.policy_gradient_loss(_policy_logprobs(roles, batch, index), advantages[index], part.response_mask)
        roles.backward("policy", loss)
        stats.append({"loss/policy": loss.item(), **step(loss)})
    return _mean(stats)


def update_ppo(roles: Roles, batch: Batch, step, config: RLConfig, generator) -> dict:
    """PPO: per-token rewards (KL on every token, the reward on the last), GAE with the value adapter, clipped losses."""
    mask = batch.rollout.response_mask
    with torch.no_grad():
        old_values = roles.values(batch.rollout) * mask
    rewards = obj.token_rewards(batch.rewards, batch.kl, mask, batch.kl_coef)
    advantages, returns = obj.gae(rewards, old_values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)
    stats = []
    for index in minibatches(len(batch.returns), config.mini_batch_size or len(batch.returns), config.update_epochs, generator):
        part = batch.rollout.select(index)
        # Token means over the global mini-batch: each process divides its sum by (global tokens / processes),
        # so the average over processes that the gradient all-reduce takes is the one-process loss.
        tokens = parallel.all_sum(part.response_mask.sum()).clamp(min=1) / parallel.world_size()
        logp = roles.policy_logprobs(part, train=True)
        policy_loss, clip_fraction = obj.ppo_policy_loss(logp, batch.old_logp[index], advantages[index],
                                                         part.response_mask, config.clip_range, tokens)
        roles.backward("policy", policy_loss)
        values = roles.values(part, train=True)
        v_loss = obj.value_loss(values, returns[index], part.response_mask, old_values[index], config.value_clip_range,
                                tokens)
        roles.backward("value", config.value_coef * v_loss)
        stats.append({"loss/policy": policy_loss.item(), "loss/value": v_loss.item(),
                      "ppo/clip_fraction": clip_fraction.item(), **step(policy_loss + v_loss)})
    return _mean(stats)


UPDATES = {"reinforce": update_reinforce, "rloo": update_rloo, "ppo": update_ppo}


def _policy_logprobs(roles: Roles, batch: Batch, index: torch.Tensor) -> torch.Tensor:
    if batch.live_logp is not None:  # one pass over the whole batch: the sampling-time forward is this one
        return batch.live_logp[index]
    return roles.policy_logprobs(batch.rollout.select(index), train=True)


def compute_shares(rollout: Rollout, packed: PackedRollout | None) -> dict[str, float]:
    """Where the passes over a rollout spend their compute: the share of padded positions, and the share of the
    sequences' tokens that prefix sharing did not need to compute."""
    real = int(rollout.attention_mask.sum())
    if packed is None:
        return {"perf/padding_share": 1 - real / rollout.input_ids.numel(), "perf/prefix_saved_share": 0.0}
    return {"perf/padding_share": 1 - packed.tokens / packed.input_ids.numel(),
            "perf/prefix_saved_share": 1 - packed.tokens / packed.plain_tokens}


def reuses_sampling_pass(config: RLConfig) -> bool:
    """REINFORCE and RLOO with one epoch over one mini-batch update the same weights that scored the samples,
    so the log-probs at sampling time, kept with their graph, are the update's forward pass: one forward less. The
    graph lives through the reward and reference passes (no graph of their own) and beside the value's, which
    covers the prompts alone, so the peak stays about the update's own, with or without checkpointing."""
    rollout = config.batch_size * config.samples_per_prompt
    return (config.algorithm in ("reinforce", "rloo") and config.update_epochs == 1
            and (config.mini_batch_size or rollout) >= rollout)


def _mean(rows: list[dict]) -> dict:
    """Per-key means over optimizer steps, then over processes (one collective for all keys)."""
    if not rows:
        return {}
    keys = list(rows[0])
    local = torch.tensor([sum(r[k] for r in rows) / len(rows) for k in keys], dtype=torch.float64)
    return dict(zip(keys, (parallel.all_sum(local) / parallel.world_size()).tolist()))


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train_policy(config: RLConfig) -> dict:
    from accelerate import Accelerator
    from transformers import get_scheduler

    from perlhf.checkpoint import (CheckpointManager, apply_learning_rates, check_global_batch, global_batch_meta,
                                   load_training_state, restore_rng_state, save_training_state)
    from perlhf.data import load_prompts
    from perlhf.guards import NonFiniteGuard, StopRequest, prepare_run_dir, writing
    from perlhf.metrics import MetricsLogger, peak_memory_mb
    from perlhf.models import RL_MMAP_THRESHOLD, load_model, return_freed_memory
    from perlhf.plan import choose_checkpointing

    accelerator = Accelerator(cpu=config.device == "cpu")
    if torch.device(config.device or accelerator.device).type == "cpu":
        return_freed_memory(RL_MMAP_THRESHOLD)  # from the start, the load included: measured for RL (its docstring)
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    run_dir = Path(config.output_dir)
    resuming = prepare_run_dir(run_dir, overwrite=config.overwrite_output_dir) if main else False
    accelerator.wait_for_everyone()
    # The same seed on every process, so adapters and heads start equal (and are broadcast below to be sure);
    # sampling does not use this generator: each sequence has its own seed (`sequence_seed`).
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    with accelerator.main_process_first():
        loaded = load_model(config.model, device=config.device or str(accelerator.device), dtype=config.dtype,
                            trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle, verbose=main,
                            quantize=config.quantize)
    tokenizer = loaded.tokenizer
    prompts, report = load_prompts(config.prompts, column=config.prompt_column,
                                   rejects_path=run_dir / "rejects-prompts.jsonl" if main else None, limit=config.limit)
    encoded, cut = encode_prompts(tokenizer, prompts, config.max_prompt_length)
    global_batch = config.batch_size * world
    if len(encoded) < global_batch:
        raise cfg.ConfigError(f"--batch-size: {global_batch} prompts per iteration across {world} "
                              f"process(es) is more than the {len(encoded)} prompts")
    if main:
        print(f"perlhf: prompts: {report.summary()}; {cut} cut to --max-prompt-length {config.max_prompt_length}")
        if world > 1:
            print(f"perlhf: data parallel over {world} processes: {global_batch} prompts per iteration "
                  f"({config.batch_size} per process)")
    roles = Roles(config, loaded, verbose=main)
    with roles.backbone.role("policy"):
        logit_error = check_logprobs_match_sampler(roles.backbone.model, tokenizer, encoded[0])
    ignored = ignored_generation_settings(loaded.model)
    if main:
        print(f"perlhf: log-probs checked against generate() for {type(loaded.model).__name__} "
              f"(max |error| {logit_error:.1e} nats); sampling softmax(logits / {config.temperature:g})"
              + ("; not applied from the model's generation_config.json: "
                 + ", ".join(f"{k}={v}" for k, v in ignored.items()) if ignored else ""))
    config.gradient_checkpointing = choose_checkpointing(config, "rl", accelerator.device, main,
                                                         batch_size=config.batch_size,
                                                         max_prompt_length=config.max_prompt_length,
                                                         max_new_tokens=config.max_new_tokens,
                                                         samples_per_prompt=config.samples_per_prompt,
                                                         algorithm=config.algorithm)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model)
    single_pass = reuses_sampling_pass(config)
    checkpoints = CheckpointManager(run_dir, keep_last=config.save_total_limit)
    latest = checkpoints.latest() if (resuming or not main) else None
    if latest is not None:  # the weights first: sharding below splits the base they are loaded over
        check_global_batch(latest.meta, run_dir, world, config.batch_size, "--batch-size")
        roles.backbone.load_adapter_weights("policy", latest.path / "policy")
        if config.uses_value:
            roles.backbone.load_adapter_weights("value", latest.path / "value")
    if parallel.sharding(config, accelerator):
        parallel.shard(roles.backbone)
    policy_params, value_params = roles.trainable()
    parallel.broadcast_parameters(policy_params + value_params)
    groups = [{"params": policy_params, "lr": config.learning_rate}]
    if value_params:
        groups.append({"params": value_params, "lr": config.value_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    rollout_size = config.batch_size * config.samples_per_prompt
    steps_per_iteration = config.update_epochs * -(-rollout_size // (config.mini_batch_size or rollout_size))
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=0,
                              num_training_steps=config.max_steps * steps_per_iteration)
    kl_control = obj.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon) \
        if config.target_kl else obj.FixedKLController(config.kl_coef)
    if main:
        n_policy, n_value = sum(p.numel() for p in policy_params), sum(p.numel() for p in value_params)
        total = sum(p.numel() for p in roles.backbone.parameters())
        print(f"perlhf: {config.algorithm} on one backbone: policy adapter {n_policy:,} + value {n_value:,} trainable "
              f"of {total:,} parameters; reference = {'frozen copy of ' + config.policy_adapter if roles.reference else 'backbone with adapters off'}; "
              f"reward = {'adapter on the same backbone' if roles.shared_reward else 'separate model'}")

    start = 0
    if latest is not None:
        state = load_training_state(latest.path / "training_state.pt", optimizer=optimizer, scheduler=scheduler)
        rng = state["rng"]
        if not isinstance(rng, list):
            restore_rng_state(rng)
        elif len(rng) == world:
            restore_rng_state(rng[rank])
        # else: another process count; sampling is seeded per sequence, so nothing drawn later depends on it
        kl_control.load_state_dict(latest.meta["kl_controller"])
        apply_learning_rates(optimizer, scheduler, [config.learning_rate, config.value_learning_rate][:len(groups)], main)
        start = latest.step
        if main:
            print(f"perlhf: resuming {run_dir} from iteration {start}; pass --overwrite-output-dir to start over")

    def save_checkpoint(iteration: int) -> None:
        rngs = _gather_rng(accelerator)

        def write(directory: Path) -> None:
            roles.backbone.save_adapter("policy", directory / "policy")
            if config.uses_value:
                roles.backbone.save_adapter("value", directory / "value")
            save_training_state(directory / "training_state.pt", optimizer=optimizer, scheduler=scheduler, rng=rngs)

        if main:
            with writing(run_dir):
                checkpoints.save(iteration, write, {"kl_controller": kl_control.state_dict(), "guard": guard.state_dict(),
                                                    "prompts_seen": iteration * global_batch,
                                                    **global_batch_meta(world, config.batch_size)})
        accelerator.wait_for_everyone()

    guard = NonFiniteGuard(max_in_row=3)
    if latest is not None:
        guard.load_state_dict(latest.meta.get("guard", {}))
    all_params = policy_params + value_params
    value_norm_limit = config.value_max_grad_norm or config.max_grad_norm

    def optimizer_step(loss: torch.Tensor) -> dict:
        # The roles share one module, so DDP's hooks cannot serve them; gradients are averaged in buckets instead.
        parallel.average_gradients(all_params)
        # Each role clipped on its own: a large value gradient must not shrink the policy's step.
        norms = {"train/grad_norm": float(torch.nn.utils.clip_grad_norm_(policy_params, config.max_grad_norm))}
        if value_params:
            norms["train/value_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(value_params, value_norm_limit))
        # The same loss and gradients on every process, so every process skips (or stops) together.
        ok = guard.step_ok(parallel.all_sum(loss.detach().float()) / world, all_params, current["iteration"])
        if ok:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norms

    current = {"iteration": start}
    generator = torch.Generator().manual_seed(config.seed)
    logger = MetricsLogger(run_dir, config.max_steps, start, enabled=main, description=config.algorithm)
    per_epoch = max(1, len(encoded) // global_batch)
    with StopRequest() as stop:
        for iteration in range(start, config.max_steps):
            current["iteration"] = iteration + 1
            generator.manual_seed(config.seed * 7919 + iteration)
            # -- which prompts: a fixed permutation per epoch, so a resumed run continues where it stopped; each
            # process takes every world-th prompt of the global batch
            epoch, position = divmod(iteration, per_epoch)
            order = list(range(len(encoded)))
            random.Random(config.seed + epoch).shuffle(order)
            chunk = order[position * global_batch:(position + 1) * global_batch][rank::world]
            chosen = [(i, j) for i in chunk for j in range(config.samples_per_prompt)]
            seeds = [sequence_seed(config.seed, iteration, i, j) for i, j in chosen]
            timings = {}

            tick = time.perf_counter()
            with roles.backbone.role("policy"):
                rollout = generate(roles.backbone.model, tokenizer, [encoded[i] for i, _ in chosen],
                                   config.max_new_tokens, config.temperature, seeds)
            timings["time/generate"] = time.perf_counter() - tick
            roles.decide_sharing(rollout, verbose=main)

            tick = time.perf_counter()
            with torch.no_grad():
                scores = roles.scores(rollout, [prompts[i] for i, _ in chosen])
            timings["time/score"] = time.perf_counter() - tick

            tick = time.perf_counter()
            with torch.set_grad_enabled(single_pass):
                live_logp, entropy = roles.policy_logprobs(rollout, with_entropy=True, train=single_pass)
            old_logp = live_logp.detach()
            ref_logp = roles.reference_logprobs(rollout)
            timings["time/reference"] = time.perf_counter() - tick

            mask = rollout.response_mask
            shares = compute_shares(rollout, roles.packed(rollout))
            kl = obj.kl_per_token(old_logp, ref_logp, config.kl_estimator) * mask
            rewards = obj.missing_eos_penalized(scores, rollout.ended, config.missing_eos_penalty)
            returns = obj.sequence_returns(rewards, kl, mask, kl_control.coef)
            batch = Batch(rollout, old_logp, kl, rewards, returns, kl_control.coef, live_logp if single_pass else None)

            tick = time.perf_counter()
            update_stats = UPDATES[config.algorithm](roles, batch, optimizer_step, config, generator)
            timings["time/update"] = time.perf_counter() - tick

            # -- metrics of the global batch, the same on every process
            sequence_kl = obj.masked_sum(kl, mask, dim=1)
            mean_kl = parallel.global_mean(sequence_kl)
            kl_control.update(mean_kl, rollout_size * world)
            lengths = mask.sum(dim=1)
            entropy_sum, tokens = parallel.all_sum(torch.stack([obj.masked_sum(entropy, mask), mask.sum()])).tolist()
            elapsed = sum(timings.values())
            metrics = {
                "reward/score": parallel.global_mean(scores),
                "reward/kl": mean_kl,
                "reward/return": parallel.global_mean(returns),
                "kl/coef": batch.kl_coef,
                "policy/entropy": entropy_sum / max(tokens, 1.0),
                "policy/response_length": parallel.global_mean(lengths),
                "policy/eos_rate": parallel.global_mean(rollout.ended.float()),
                "perf/tokens_per_second": tokens / max(elapsed, 1e-9),
                **{name: parallel.global_mean(torch.tensor([share])) for name, share in shares.items()},
                "memory/peak_mb": peak_memory_mb(accelerator.device),
                "train/skipped_steps": guard.skipped,
                **update_stats, **timings,
            }
            logger.log(iteration + 1, metrics, show=("reward/score", "reward/kl", "policy/response_length"))
            logger.advance()
            stopping = parallel.any_process(stop.requested)  # a signal to one process stops them all, here
            if (iteration + 1) % config.save_steps == 0 or iteration + 1 == config.max_steps or stopping:
                save_checkpoint(iteration + 1)
            if stopping:
                logger.close()
                if main:
                    print(f"perlhf: stopped at iteration {iteration + 1}; checkpoint saved. "
                          "Re-run the same command to resume.")
                parallel.finish()
                return {"stopped_at": iteration + 1}
    logger.close()
    fingerprint = parallel.check_identical(all_params, "policy and value weights")

    if main:
        with writing(run_dir):
            roles.backbone.save_adapter("policy", run_dir / "policy",
                                        extra_config={"base_model_name_or_path": config.model})
            if config.uses_value:
                roles.backbone.save_adapter("value", run_dir / "value",
                                            extra_config={"base_model_name_or_path": config.model})
            cfg.save_yaml(config, run_dir / "training_config.yaml")
        print(f"perlhf: policy adapter saved to {run_dir / 'policy'}")
    parallel.finish()
    return {"iterations": config.max_steps, "policy": str(run_dir / "policy"), "processes": world,
            "weights_sha256": fingerprint, "peak_memory_mb": peak_memory_mb(accelerator.device),
            "skipped_steps": guard.skipped}


def _gather_rng(accelerator) -> list | dict:
    from perlhf.checkpoint import capture_rng_state

    state = capture_rng_state()
    if accelerator.num_processes == 1:
        return state
    from accelerate.utils import gather_object

    return gather_object([state])


def register_cli(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a policy LoRA adapter with RL against a reward model")
    cfg.add_arguments(train, RLConfig)
    train.set_defaults(run=lambda args: train_policy(cfg.build(RLConfig, args)) and 0)
