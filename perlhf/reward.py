"""Reward modelling: a frozen backbone + a LoRA adapter + a scalar head, trained on preference pairs or ratings.

Read top to bottom: config, losses and metrics (pure functions), the model, batching, the training loop,
evaluation and scoring, the command line. `--full` trains every weight with the same loop (the paper's baseline).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from perlhf import config as cfg
from perlhf import parallel
from perlhf.config import check, field
from perlhf.models import DEFAULT_MODEL

# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class RewardConfig:
    model: str = field(DEFAULT_MODEL, "Hugging Face model id or local directory of the backbone")
    data: str = field("", "preference data: file, directory or Hugging Face dataset id (id:split)")
    validation_data: str | None = field(None, "separate validation data; default: split --data")
    validation_fraction: float = field(0.1, "fraction of --data held out for validation when no --validation-data")
    kind: str | None = field(None, "pairs or pointwise; default: detected from the columns")
    columns: dict = field({}, "column mapping, e.g. prompt=instruction chosen=good rejected=bad")
    limit: int | None = field(None, "read at most this many records")
    output_dir: str = field("runs/reward", "run directory: adapter, checkpoints, logs")
    overwrite_output_dir: bool = field(False, "start over instead of resuming from the last checkpoint")
    full: bool = field(False, "train every weight (full fine-tuning baseline) instead of a LoRA adapter")
    lora_rank: int = field(8, "LoRA rank")
    lora_alpha: float = field(16.0, "LoRA alpha")
    lora_dropout: float = field(0.0, "LoRA dropout")
    lora_target: str = field("attention", "attention, all-linear, or comma-separated module names")
    learning_rate: float | None = field(None, "default 2e-4 with LoRA, 1e-5 with --full (the paper's ranges)")
    weight_decay: float = field(0.0, "AdamW weight decay")
    lr_scheduler_type: str = field("cosine", "transformers scheduler name: linear, cosine, constant, ...")
    warmup_ratio: float = field(0.05, "fraction of steps spent warming the learning rate up")
    max_grad_norm: float = field(1.0, "gradient clipping norm")
    margin: float = field(0.0, "Bradley-Terry margin: the chosen must beat the rejected by this much")
    max_steps: int = field(200, "optimizer steps")
    per_device_train_batch_size: int = field(8, "pairs (or rated replies) per device per micro-batch")
    per_device_eval_batch_size: int = field(16, "pairs per device per evaluation batch")
    gradient_accumulation_steps: int = field(1, "micro-batches per optimizer step")
    max_length: int = field(512, "tokens per prompt+response; longer prompts are cut from the left")
    eval_steps: int = field(50, "evaluate every N steps (0: only at the end)")
    save_steps: int = field(50, "checkpoint every N steps")
    save_total_limit: int = field(2, "checkpoints kept")
    logging_steps: int = field(5, "log training metrics every N steps")
    seed: int = field(42, "random seed (data split, order, initialisation)")
    device: str | None = field(None, "cpu, cuda, cuda:1 ...; default: cuda if available")
    dtype: str | None = field(None, "float32, bfloat16, float16; default: bf16 on CUDA, fp32 on CPU")
    gradient_checkpointing: bool = field(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = field(False, "allow model code from the model repository")
    allow_pickle: bool = field(False, "allow pickle-based weight files (can run code when loaded)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check(bool(self.data), "data", "is required")
        check(self.lora_rank >= 1, "lora_rank", f"must be >= 1 (got {self.lora_rank})")
        check(self.lora_alpha > 0, "lora_alpha", f"must be > 0 (got {self.lora_alpha})")
        check(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1) (got {self.lora_dropout})")
        check(self.learning_rate is None or self.learning_rate > 0, "learning_rate",
              f"must be > 0 (got {self.learning_rate})")
        check(self.max_steps >= 1, "max_steps", f"must be >= 1 (got {self.max_steps})")
        check(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
        check(self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", "must be >= 1")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        check(self.max_length >= 8, "max_length", f"must be >= 8 tokens (got {self.max_length})")
        check(0 <= self.validation_fraction < 1, "validation_fraction", "must be in [0, 1)")
        check(self.kind in (None, "pairs", "pointwise"), "kind", f"must be pairs or pointwise (got {self.kind!r})")
        check(self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        check(self.eval_steps >= 0 and self.save_steps >= 1 and self.logging_steps >= 1, "save_steps",
              "--eval-steps must be >= 0, --save-steps and --logging-steps >= 1")
        check(self.margin >= 0, "margin", "must be >= 0")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0 (got {self.max_grad_norm})")
        check(0 <= self.warmup_ratio <= 1, "warmup_ratio", f"must be in [0, 1] (got {self.warmup_ratio})")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {self.weight_decay})")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 (got {self.limit})")
        cfg.check_dtype(self.dtype)
        cfg.check_scheduler(self.lr_scheduler_type)

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (1e-5 if self.full else 2e-4)


# ---------------------------------------------------------------------------------------------------------------
# Losses and metrics: pure functions, unit-tested against hand-computed values


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def pointwise_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(score) against thumbs up (1) / down (0)."""
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen scores higher; ties count half."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()


def shorter_baseline_accuracy(chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor) -> float:
    """Accuracy of 'prefer the shorter response' on the same pairs; equal lengths count half."""
    return pairwise_accuracy(-chosen_lengths.float(), -rejected_lengths.float())


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties half): the Mann-Whitney U form."""
    positives, negatives = scores[labels > 0.5], scores[labels <= 0.5]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    diff = positives[:, None] - negatives[None, :]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


# ---------------------------------------------------------------------------------------------------------------
# The model


class RewardModel(nn.Module):
    """body (a PeftModel with a `reward` adapter, or a fully trainable causal LM) + a scalar head."""

    ADAPTER = "reward"

    def __init__(self, body: nn.Module, head: nn.Linear, tokenizer, max_length: int = 512, base_model: str = ""):
        super().__init__()
        self.body, self.head, self.tokenizer = body, head, tokenizer
        self.max_length, self.base_model = max_length, base_model

    @property
    def is_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.body, PeftModel)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from perlhf.backbone import last_hidden, last_token_scores

        return last_token_scores(last_hidden(self.body, input_ids, attention_mask), self.head, attention_mask)

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str], batch_size: int = 16) -> list[float]:
        """Scores for prompt/response pairs (prompt: text or chat messages), in order."""
        from perlhf.data import encode_example

        self.eval()
        device = next(self.parameters()).device
        encoded = [encode_example(self.tokenizer, p, r, self.max_length).input_ids for p, r in zip(prompts, responses)]
        out: list[float] = []
        for start in range(0, len(encoded), batch_size):
            ids, mask = pad_right(encoded[start:start + batch_size], self.tokenizer.pad_token_id, device)
            out += self(ids, mask).tolist()
        return out

    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        from perlhf.backbone import HEAD_KEY, save_adapter
        from safetensors.torch import save_file

        directory = Path(directory)
        info = {"base_model_name_or_path": self.base_model, "perlhf_max_length": self.max_length, **(extra or {})}
        if self.is_lora:
            save_adapter(self.body, self.ADAPTER, directory, self.head, info)
        else:
            self.body.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
            save_file({HEAD_KEY: self.head.weight.detach().contiguous().cpu()}, str(directory / "score.safetensors"))
            (directory / "perlhf_reward.json").write_text(json.dumps(info, indent=2), encoding="utf-8")

    def load_weights(self, directory: str | Path) -> None:
        """Put the weights saved by `save` back into this model (used when resuming)."""
        from peft import set_peft_model_state_dict
        from perlhf.backbone import ADAPTER_WEIGHTS, HEAD_KEY
        from safetensors.torch import load_file

        directory = Path(directory)
        if self.is_lora:
            weights = load_file(str(directory / ADAPTER_WEIGHTS))
            head = weights.pop(HEAD_KEY)
            set_peft_model_state_dict(self.body, weights, adapter_name=self.ADAPTER)
        else:
            from safetensors.torch import load_model

            load_model(self.body, str(directory / "model.safetensors"), strict=False)
            head = load_file(str(directory / "score.safetensors"))[HEAD_KEY]
        self.head.weight.data.copy_(head)


def build_reward_model(config: RewardConfig, loaded) -> RewardModel:
    from perlhf.backbone import Backbone, enable_gradient_checkpointing, lora_config, new_head

    base = loaded.model
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(base)
        base.enable_input_require_grads()
    if config.full:
        base.requires_grad_(True)
        body = base
    else:
        lora = lora_config(base, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target)
        body = Backbone.with_adapter(base, RewardModel.ADAPTER, lora).model
    head = new_head(base)  # fp32 even over a bf16 base: a trained weight needs fp32 for AdamW's small updates
    return RewardModel(body, head, loaded.tokenizer, config.max_length, config.model)


def load_reward_model(directory: str | Path, model: str | None = None, device: str | None = None,
                      dtype: str | None = None, loaded=None, verbose: bool = True) -> RewardModel:
    """Load a reward model saved by `perlhf rm train` (LoRA adapter + head, or a full model + head)."""
    from perlhf.backbone import HEAD_KEY, ADAPTER_CONFIG, Backbone
    from perlhf.models import load_model
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / ADAPTER_CONFIG).exists():
        info = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if loaded is None:
            loaded = load_model(model or info["base_model_name_or_path"], device=device, dtype=dtype, verbose=verbose)
        backbone = Backbone(loaded.model)
        backbone.load_adapter(RewardModel.ADAPTER, directory, trainable=False)
        body, head = backbone.model, backbone.heads[RewardModel.ADAPTER]
    elif (directory / "score.safetensors").exists():
        info = json.loads((directory / "perlhf_reward.json").read_text(encoding="utf-8"))
        loaded = load_model(str(directory), device=device, dtype=dtype, verbose=verbose)
        body = loaded.model
        weight = load_file(str(directory / "score.safetensors"))[HEAD_KEY]
        head = nn.Linear(weight.shape[1], 1, bias=False).to(weight.dtype)
        head.weight.data.copy_(weight)
        head = head.to(next(body.parameters()).device, next(body.parameters()).dtype)
    else:
        raise FileNotFoundError(f"{directory}: not a reward model directory (no adapter_config.json or score.safetensors)")
    reward = RewardModel(body, head, loaded.tokenizer, int(info.get("perlhf_max_length", 512)),
                         info.get("base_model_name_or_path", ""))
    reward.requires_grad_(False)
    return reward.eval()


# ---------------------------------------------------------------------------------------------------------------
# Batching


def pad_right(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           group: int = 32) -> list[list[int]]:
    """Shuffled batches of similar lengths, so little compute goes to padding.

    Indices are shuffled, cut into chunks of `group` batches, sorted by length inside each chunk, cut into
    batches, and the batches shuffled. Same (seed, epoch) -> same batches, which is what makes resuming exact.
    The last incomplete batch is dropped so every step sees the same number of examples.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    chunk = batch_size * group
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [part[i:i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Encoded:
    """One tokenized example: a pair (chosen + rejected) or a rated reply (chosen only, with a label)."""
    chosen: list[int]
    rejected: list[int] | None
    label: float | None
    chosen_response_tokens: int
    rejected_response_tokens: int


def encode_records(records: list, tokenizer, max_length: int) -> tuple[list[Encoded], int]:
    """Tokenize pairs or rated replies; returns the examples and how many were truncated."""
    from perlhf.data import PreferencePair, encode_example

    out, truncated = [], 0
    for record in records:
        if isinstance(record, PreferencePair):
            chosen = encode_example(tokenizer, record.prompt, record.chosen, max_length)
            rejected = encode_example(tokenizer, record.prompt, record.rejected, max_length)
            truncated += chosen.truncated or rejected.truncated
            out.append(Encoded(chosen.input_ids, rejected.input_ids, None,
                               len(chosen.input_ids) - chosen.response_start,
                               len(rejected.input_ids) - rejected.response_start))
        else:
            example = encode_example(tokenizer, record.prompt, record.response, max_length)
            truncated += example.truncated
            out.append(Encoded(example.input_ids, None, float(record.label),
                               len(example.input_ids) - example.response_start, 0))
    return out, truncated


def forward_batch(model: nn.Module, batch: list[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Scores for a batch. Pairs: chosen and rejected go through the model in ONE forward pass."""
    if batch[0].rejected is not None:
        ids, mask = pad_right([e.chosen for e in batch] + [e.rejected for e in batch], pad_id, device)
        scores = model(ids, mask)
        return {"chosen": scores[:len(batch)], "rejected": scores[len(batch):], "tokens": mask.sum()}
    ids, mask = pad_right([e.chosen for e in batch], pad_id, device)
    labels = torch.tensor([e.label for e in batch], device=device)
    return {"scores": model(ids, mask), "labels": labels, "tokens": mask.sum()}


def batch_loss(out: dict[str, torch.Tensor], margin: float) -> tuple[torch.Tensor, float]:
    if "chosen" in out:
        return bradley_terry_loss(out["chosen"], out["rejected"], margin), pairwise_accuracy(out["chosen"], out["rejected"])
    accuracy = ((out["scores"] > 0).float() == out["labels"]).float().mean().item()
    return pointwise_loss(out["scores"], out["labels"]), accuracy


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Encoded], pad_id: int, batch_size: int, accelerator=None) -> dict:
    """Validation metrics. Pairs: accuracy, mean margin, loss and the shorter-response baseline on the same pairs.
    Ratings: accuracy (score > 0 means thumbs up), ROC-AUC, and the majority-class baseline."""
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = next(model.parameters()).device
    mine = list(range(rank, len(examples), world))
    rows = []
    for start in range(0, len(mine), batch_size):
        index = mine[start:start + batch_size]
        out = forward_batch(model, [examples[i] for i in index], pad_id, device)
        if "chosen" in out:
            rows += list(zip(index, out["chosen"].tolist(), out["rejected"].tolist()))
        else:
            rows += list(zip(index, out["scores"].tolist(), out["labels"].tolist()))
    if world > 1:
        rows = gather_object(rows)
    rows = sorted(dict((r[0], r) for r in rows).values())
    model.train(was_training)
    if not rows:
        return {}
    a, b = torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])
    if examples[0].rejected is not None:
        chosen_len = torch.tensor([examples[r[0]].chosen_response_tokens for r in rows])
        rejected_len = torch.tensor([examples[r[0]].rejected_response_tokens for r in rows])
        return {"eval/accuracy": pairwise_accuracy(a, b), "eval/margin": (a - b).mean().item(),
                "eval/loss": bradley_terry_loss(a, b).item(),
                "eval/shorter_baseline": shorter_baseline_accuracy(chosen_len, rejected_len), "eval/examples": len(rows)}
    positive_rate = b.mean().item()
    return {"eval/accuracy": ((a > 0).float() == b).float().mean().item(), "eval/roc_auc": roc_auc(a, b),
            "eval/loss": pointwise_loss(a, b).item(), "eval/majority_baseline": max(positive_rate, 1 - positive_rate),
            "eval/examples": len(rows)}


# ---------------------------------------------------------------------------------------------------------------
# Training


def load_split(config: RewardConfig, run_dir: Path | None, verbose: bool = True) -> tuple[list, list]:
    """Training and validation records, with every skipped record counted and written to rejects files."""
    from perlhf.data import load_preferences, split_train_validation

    def load(source: str, name: str):
        records, report = load_preferences(source, columns=config.columns or None, kind=config.kind,
                                           rejects_path=run_dir / f"rejects-{name}.jsonl" if run_dir else None,
                                           limit=config.limit)
        if verbose:
            print(f"perlhf: {name} data: {report.summary()}")
        return records

    records = load(config.data, "train")
    if config.validation_data:
        return records, load(config.validation_data, "validation")
    return split_train_validation(records, config.validation_fraction, config.seed)


def train_reward_model(config: RewardConfig) -> dict:
    """Train (or resume) a reward model; returns the final and best validation metrics and the run's figures."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from perlhf.checkpoint import (CheckpointManager, apply_learning_rates, capture_rng_state, check_global_batch,
                                   global_batch_meta, load_training_state, restore_rng_state, save_training_state)
    from perlhf.guards import NonFiniteGuard, StopRequest, prepare_run_dir, writing
    from perlhf.metrics import MetricsLogger, peak_memory_mb
    from perlhf.models import load_model

    accelerator = Accelerator(cpu=config.device == "cpu")
    main = accelerator.is_main_process
    run_dir = Path(config.output_dir)
    resuming = prepare_run_dir(run_dir, overwrite=config.overwrite_output_dir) if main else False
    accelerator.wait_for_everyone()
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    with accelerator.main_process_first():  # the first load may convert the embedded model; do it once
        loaded = load_model(config.model, device=str(accelerator.device) if config.device is None else config.device,
                            dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                            allow_pickle=config.allow_pickle, verbose=main)
    tokenizer = loaded.tokenizer
    train_records, val_records = load_split(config, run_dir if main else None, verbose=main)
    train, truncated = encode_records(train_records, tokenizer, config.max_length)
    val, val_truncated = encode_records(val_records, tokenizer, config.max_length)
    kind = "pairs" if train[0].rejected is not None else "pointwise"
    if main:
        print(f"perlhf: {len(train)} training and {len(val)} validation {kind}; truncated to --max-length "
              f"{config.max_length}: {truncated} training, {val_truncated} validation (prompt cut from the left)")

    model = build_reward_model(config, loaded)
    params = [p for p in model.parameters() if p.requires_grad]
    if main:
        total = sum(p.numel() for p in model.parameters())
        print(f"perlhf: training {sum(p.numel() for p in params):,} of {total:,} parameters "
              f"({'full fine-tuning' if config.full else f'LoRA r={config.lora_rank} on {config.lora_target}'}"
              f" + scalar head), lr {config.lr:g}")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=int(config.warmup_ratio *
                              config.max_steps), num_training_steps=config.max_steps)

    checkpoints = CheckpointManager(run_dir, keep_last=config.save_total_limit)
    start_step, best = 0, {"eval/accuracy": -1.0}
    latest = checkpoints.latest() if resuming or not main else None
    world = accelerator.num_processes
    global_batch = config.per_device_train_batch_size * world
    if latest is not None:
        check_global_batch(latest.meta, run_dir, world, config.per_device_train_batch_size,
                           "--per-device-train-batch-size")
        model.load_weights(latest.path / "model")
        state = load_training_state(latest.path / "training_state.pt", optimizer=optimizer, scheduler=scheduler)
        restore_rng_state(state["rng"])
        start_step, best = latest.step, latest.meta.get("best", best)
        apply_learning_rates(optimizer, scheduler, [config.lr], main)
        if main:
            print(f"perlhf: resuming {run_dir} from step {start_step} ({latest.path.name}); "
                  "pass --overwrite-output-dir to start over")
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    lengths = [max(len(e.chosen), len(e.rejected or [])) for e in train]  # chosen and rejected pad to the longer
    batches_per_epoch = len(train) // global_batch
    if batches_per_epoch == 0:
        raise cfg.ConfigError(f"--per-device-train-batch-size: {global_batch} examples per step across "
                              f"{world} process(es) is more than the {len(train)} training examples")

    def micro_batch(index: int) -> list[Encoded]:
        epoch, position = divmod(index, batches_per_epoch)
        batch = length_grouped_batches(lengths, global_batch, config.seed, epoch)[position]
        return [train[i] for i in batch[accelerator.process_index::world]]

    def save_checkpoint(step: int) -> None:
        rng = capture_rng_state()

        def write(directory: Path) -> None:
            unwrapped.save(directory / "model")
            save_training_state(directory / "training_state.pt", optimizer=optimizer, scheduler=scheduler, rng=rng)

        if main:
            with writing(run_dir):
                checkpoints.save(step, write, {"best": best, "micro_batches": step * config.gradient_accumulation_steps,
                                               "guard": guard.state_dict(),
                                               **global_batch_meta(world, config.per_device_train_batch_size)})
        accelerator.wait_for_everyone()

    logger = MetricsLogger(run_dir, config.max_steps, start_step, enabled=main, description="reward model")
    guard = NonFiniteGuard(max_in_row=3)
    if latest is not None:
        guard.load_state_dict(latest.meta.get("guard", {}))
    tokens_seen, started = 0, time.perf_counter()
    step, last_eval = start_step, None
    with StopRequest() as stop:
        while step < config.max_steps:
            model.train()
            losses, accuracies, tokens = [], [], []
            for micro in range(config.gradient_accumulation_steps):
                batch = micro_batch(step * config.gradient_accumulation_steps + micro)
                sync = micro == config.gradient_accumulation_steps - 1
                with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                    out = forward_batch(model, batch, tokenizer.pad_token_id, accelerator.device)
                    loss, accuracy = batch_loss(out, config.margin)
                    accelerator.backward(loss / config.gradient_accumulation_steps)
                losses.append(loss.detach())
                accuracies.append(accuracy)
                tokens.append(out["tokens"])
            # the global batch's loss, so every process skips a non-finite step (or stops) together
            loss = parallel.all_sum(torch.stack(losses).mean()) / world
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            if guard.step_ok(loss, params, step + 1):
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(parallel.all_sum(torch.stack(tokens).sum()).item())
            logger.advance()

            if step % config.logging_steps == 0 or step == config.max_steps:
                elapsed = time.perf_counter() - started
                logger.log(step, {"train/loss": loss.item(),
                                  "train/accuracy": parallel.global_mean(torch.tensor(accuracies)),
                                  "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0],
                                  "train/tokens_per_second": tokens_seen / max(elapsed, 1e-9),
                                  "train/skipped_steps": guard.skipped,
                                  "memory/peak_mb": peak_memory_mb(accelerator.device)},
                           show=("train/loss", "train/accuracy"))
            if (config.eval_steps and step % config.eval_steps == 0) or step == config.max_steps:
                metrics = last_eval = evaluate(model, val, tokenizer.pad_token_id, config.per_device_eval_batch_size,
                                               accelerator)
                logger.log(step, metrics, show=("train/loss", "eval/accuracy"))
                if main and metrics and metrics["eval/accuracy"] > best["eval/accuracy"]:
                    best = {**metrics, "step": step}
                    with writing(run_dir / "best"):
                        unwrapped.save(run_dir / "best", extra={"perlhf_step": step})
                accelerator.wait_for_everyone()
            stopping = parallel.any_process(stop.requested)  # one signalled process stops all
            if step % config.save_steps == 0 or step == config.max_steps or stopping:
                save_checkpoint(step)
            if stopping:
                logger.close()
                if main:
                    print(f"perlhf: stopped at step {step}; checkpoint saved. Re-run the same command to resume.")
                parallel.finish()
                return {"stopped_at": step}
    logger.close()

    fingerprint = parallel.check_identical(params, "reward-model weights")
    elapsed = time.perf_counter() - started
    final = last_eval if last_eval is not None else evaluate(model, val, tokenizer.pad_token_id,
                                                             config.per_device_eval_batch_size, accelerator)
    summary = {"final": final, "best": best, "steps": step, "kind": kind, "train_examples": len(train),
               "validation_examples": len(val), "tokens_per_second": tokens_seen / max(elapsed, 1e-9),
               "peak_memory_mb": peak_memory_mb(accelerator.device), "skipped_steps": guard.skipped,
               "trainable_parameters": sum(p.numel() for p in params), "processes": world,
               "weights_sha256": fingerprint}
    if main:
        with writing(run_dir):
            unwrapped.save(run_dir, extra={"perlhf_step": step})
            cfg.save_yaml(config, run_dir / "training_config.yaml")
            (run_dir / "eval_results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print(f"perlhf: reward model saved to {run_dir} (best step {best.get('step', '-')} in {run_dir / 'best'})")
        print("perlhf: " + _describe(final))
    parallel.finish()
    return summary


def _describe(metrics: dict) -> str:
    if "eval/roc_auc" in metrics:
        return (f"validation accuracy {metrics['eval/accuracy']:.3f}, ROC-AUC {metrics['eval/roc_auc']:.3f} "
                f"(majority-class baseline {metrics['eval/majority_baseline']:.3f}) on {metrics['eval/examples']} replies")
    if "eval/accuracy" in metrics:
        return (f"validation accuracy {metrics['eval/accuracy']:.3f}, mean margin {metrics['eval/margin']:.3f} "
                f"(prefer-the-shorter baseline {metrics['eval/shorter_baseline']:.3f}) on {metrics['eval/examples']} pairs")
    return "no validation examples"


# ---------------------------------------------------------------------------------------------------------------
# Command line: perlhf rm train | eval | score


def _run_train(args) -> int:
    summary = train_reward_model(cfg.build(RewardConfig, args))
    return 0 if "final" in summary or "stopped_at" in summary else 1


def _run_eval(args) -> int:
    from perlhf.data import load_preferences

    reward = load_reward_model(args.rm, model=args.model, device=args.device, dtype=args.dtype)
    records, report = load_preferences(args.data, columns=dict(args.columns or []) or None, kind=args.kind,
                                       rejects_path=args.rejects, limit=args.limit)
    print(f"perlhf: {report.summary()}")
    examples, truncated = encode_records(records, reward.tokenizer, args.max_length or reward.max_length)
    metrics = evaluate(reward, examples, reward.tokenizer.pad_token_id, args.batch_size)
    print(f"perlhf: {_describe(metrics)}; {truncated} truncated")
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return 0


def _run_score(args) -> int:
    reward = load_reward_model(args.rm, model=args.model, device=args.device, dtype=args.dtype, verbose=False)
    if args.data:
        from perlhf.data import load_preferences

        records, report = load_preferences(args.data, kind=args.kind, columns=dict(args.columns or []) or None,
                                           limit=args.limit)
        print(f"perlhf: {report.summary()}")
        if records and hasattr(records[0], "chosen"):
            prompts = [r.prompt for r in records for _ in (0, 1)]
            responses = [x for r in records for x in (r.chosen, r.rejected)]
        else:
            prompts, responses = [r.prompt for r in records], [r.response for r in records]
    else:
        if args.prompt is None or args.response is None:
            raise cfg.ConfigError("--prompt and --response (or --data FILE) are required")
        prompts, responses = [args.prompt], [args.response]
    scores = reward.score(prompts, responses, batch_size=args.batch_size)
    lines = [json.dumps({"prompt": p, "response": r, "score": s}) for p, r, s in zip(prompts, responses, scores)]
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"perlhf: {len(lines)} scores written to {args.output}")
    else:
        print("\n".join(lines))
    return 0


def register_cli(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a LoRA (or --full) reward model")
    cfg.add_arguments(train, RewardConfig)
    train.set_defaults(run=_run_train)

    def common(parser):
        parser.add_argument("--rm", required=True, help="reward model directory written by perlhf rm train")
        parser.add_argument("--model", default=None, help="backbone (default: the one the reward model names)")
        parser.add_argument("--device", default=None)
        parser.add_argument("--dtype", default=None)
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--limit", type=int, default=None, help="use at most N records")
        parser.add_argument("--kind", choices=["pairs", "pointwise"], default=None)
        parser.add_argument("--columns", nargs="+", type=cfg._key_value, default=None, metavar="KEY=VALUE")

    evaluation = subparsers.add_parser("eval", help="accuracy of a reward model on a dataset")
    common(evaluation)
    evaluation.add_argument("--data", required=True)
    evaluation.add_argument("--max-length", type=int, default=None)
    evaluation.add_argument("--rejects", default=None, help="write skipped records here (JSONL)")
    evaluation.add_argument("--output", default=None, help="write the metrics here (JSON)")
    evaluation.set_defaults(run=_run_eval)

    score = subparsers.add_parser("score", help="score prompt/response pairs")
    common(score)
    score.add_argument("--data", default=None, help="file of prompt/response (or pairs) records")
    score.add_argument("--prompt", default=None)
    score.add_argument("--response", default=None)
    score.add_argument("--output", default=None, help="write JSONL scores here")
    score.set_defaults(run=_run_score)
