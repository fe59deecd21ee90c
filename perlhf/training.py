"""The supervised training loop that reward modelling (`perlhf.reward`) and SFT (`perlhf.sft`) share.

A trainer loads its backbone with `start_run`, builds its model and encoded examples, and hands them over as a
`Task`: how a micro-batch gives a loss, how the model is evaluated, which metric picks the best checkpoint. The loop
does the rest the same way for both: length-grouped batches of the global batch split over processes, gradient
accumulation, clipping, the non-finite guard, logging, evaluation with `RUN/best` kept, resumable checkpoints,
stop signals, and the final files. The model must have `save(directory, extra)` and `load_weights(directory)`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from perlhf import config as cfg
from perlhf import parallel
from perlhf.config import check
from perlhf.config import field as option
from perlhf.models import DEFAULT_MODEL


@dataclass
class SupervisedConfig:
    """The options every supervised trainer has (`RewardConfig`, `SFTConfig` add their own)."""
    model: str = option(DEFAULT_MODEL, "Hugging Face model id or local directory of the backbone")
    data: str = option("", "training data: file, directory or Hugging Face dataset id (id:split)")
    validation_data: str | None = option(None, "separate validation data; default: split --data")
    validation_fraction: float = option(0.1, "fraction of --data held out for validation when no --validation-data")
    columns: dict = option({}, "column mapping, e.g. prompt=instruction chosen=good rejected=bad")
    limit: int | None = option(None, "read at most this many records")
    output_dir: str = option("runs/train", "run directory: adapter, checkpoints, logs")
    overwrite_output_dir: bool = option(False, "start over instead of resuming from the last checkpoint")
    full: bool = option(False, "train every weight (full fine-tuning baseline) instead of a LoRA adapter")
    lora_rank: int = option(8, "LoRA rank")
    lora_alpha: float = option(16.0, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target: str = option("attention", "attention, all-linear, or comma-separated module names")
    lora_rslora: bool = option(False, "scale LoRA by alpha/sqrt(rank) (rsLoRA) instead of alpha/rank")
    learning_rate: float | None = option(None, "default: the trainer's for LoRA or --full")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_scheduler_type: str = option("cosine", "transformers scheduler name: linear, cosine, constant, ...")
    warmup_ratio: float = option(0.05, "fraction of steps spent warming the learning rate up")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    max_steps: int = option(200, "optimizer steps")
    per_device_train_batch_size: int = option(8, "examples per device per micro-batch")
    per_device_eval_batch_size: int = option(16, "examples per device per evaluation batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    max_length: int = option(512, "tokens per example; longer prompts are cut from the left")
    eval_steps: int = option(50, "evaluate every N steps (0: only at the end)")
    save_steps: int = option(50, "checkpoint every N steps")
    save_total_limit: int = option(2, "checkpoints kept")
    logging_steps: int = option(5, "log training metrics every N steps")
    seed: int = option(42, "random seed (data split, order, initialisation)")
    device: str | None = option(None, "cpu, cuda, cuda:1 ...; default: cuda if available")
    dtype: str | None = option(None, "float32, bfloat16, float16; default: bf16 on CUDA, fp32 on CPU")
    quantize: str | None = option(None, cfg.QUANTIZE_HELP)
    fsdp: bool = option(False, cfg.FSDP_HELP)
    gradient_checkpointing: bool | None = option(None, "recompute activations in backward to save memory; default: "
                                                       "on when the run would not fit otherwise (perlhf plan)")
    trust_remote_code: bool = option(False, "allow model code from the model repository")
    allow_pickle: bool = option(False, "allow pickle-based weight files (can run code when loaded)")

    DEFAULT_LEARNING_RATES = (2e-4, 1e-5)  # (LoRA, --full)

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
        check(self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        check(self.eval_steps >= 0 and self.save_steps >= 1 and self.logging_steps >= 1, "save_steps",
              "--eval-steps must be >= 0, --save-steps and --logging-steps >= 1")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0 (got {self.max_grad_norm})")
        check(0 <= self.warmup_ratio <= 1, "warmup_ratio", f"must be in [0, 1] (got {self.warmup_ratio})")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {self.weight_decay})")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 (got {self.limit})")
        cfg.check_dtype(self.dtype)
        cfg.check_quantize(self.quantize, self.full)
        cfg.check_fsdp(self.fsdp, self.full, self.quantize)
        cfg.check_scheduler(self.lr_scheduler_type)

    @property
    def lr(self) -> float:
        lora, full = self.DEFAULT_LEARNING_RATES
        return self.learning_rate if self.learning_rate is not None else (full if self.full else lora)


def trainable_body(config: SupervisedConfig, loaded, adapter: str) -> nn.Module:
    """The module a supervised trainer trains: the backbone with a new LoRA adapter `adapter` (PEFT), or with
    --full the whole backbone; with --gradient-checkpointing, recomputing activations in backward."""
    from perlhf.backbone import Backbone, enable_gradient_checkpointing, lora_config

    base = loaded.model
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(base)
        base.enable_input_require_grads()
    if config.full:
        return base.requires_grad_(True)
    lora = lora_config(base, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target,
                       rslora=config.lora_rslora)
    return Backbone.with_adapter(base, adapter, lora).model


def say_what_trains(config: SupervisedConfig, model: nn.Module, extra: str = "") -> None:
    """The one line a trainer prints before training: how many parameters train, how, at which learning rate."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    how = "full fine-tuning" if config.full else f"LoRA r={config.lora_rank} on {config.lora_target}"
    print(f"perlhf: training {trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters "
          f"({how}{extra}), lr {config.lr:g}")


def load_split(config: SupervisedConfig, load: Callable, run_dir: Path | None, verbose: bool = True
               ) -> tuple[list, list]:
    """Training and validation records read by `load(source, columns=, limit=, rejects_path=)`, with every
    skipped record counted and written to RUN/rejects-{train,validation}.jsonl."""
    from perlhf.data import split_train_validation

    def read(source: str, name: str):
        records, report = load(source, columns=config.columns or None, limit=config.limit,
                               rejects_path=run_dir / f"rejects-{name}.jsonl" if run_dir else None)
        if verbose:
            print(f"perlhf: {name} data: {report.summary()}")
        return records

    records = read(config.data, "train")
    if config.validation_data:
        return records, read(config.validation_data, "validation")
    return split_train_validation(records, config.validation_fraction, config.seed)


@dataclass
class Task:
    model: nn.Module
    examples: list                    # encoded training examples
    lengths: list[int]                # padded tokens of each example (length grouping)
    step_loss: Callable[[nn.Module, list], tuple[torch.Tensor, dict, torch.Tensor]]  # -> loss, metrics, tokens
    evaluate: Callable[[nn.Module], dict]
    best_metric: str                  # the eval metric that picks RUN/best
    higher_is_better: bool
    lr: float                         # the body's learning rate
    description: str                  # progress bar and log name
    show: tuple[str, ...]             # metrics shown on the progress bar
    summary: dict = field(default_factory=dict)  # extra figures for the summary and eval_results.json
    own_rates: dict = field(default_factory=dict)  # {module: learning rate} for parts that train at another rate


def start_run(config, task: str):
    """The Accelerator, the run directory (True when it holds a run to resume) and the backbone, loaded once; the
    memory the run expects is printed, and --gradient-checkpointing decided where left to perlhf (`task`: rm, sft)."""
    from accelerate import Accelerator

    from perlhf.guards import prepare_run_dir
    from perlhf.models import load_model

    accelerator = Accelerator(cpu=config.device == "cpu")
    run_dir = Path(config.output_dir)
    resuming = prepare_run_dir(run_dir, overwrite=config.overwrite_output_dir) if accelerator.is_main_process else False
    accelerator.wait_for_everyone()
    torch.manual_seed(config.seed)  # the same on every process: models start equal (DDP broadcasts them too)
    random.seed(config.seed)
    with accelerator.main_process_first():  # the first load may convert the embedded model; do it once
        loaded = load_model(config.model, device=str(accelerator.device) if config.device is None else config.device,
                            dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                            allow_pickle=config.allow_pickle, verbose=accelerator.is_main_process,
                            quantize=config.quantize)
    from perlhf.plan import choose_checkpointing

    config.gradient_checkpointing = choose_checkpointing(config, task, accelerator.device, accelerator.is_main_process,
                                                         batch_size=config.per_device_train_batch_size,
                                                         max_length=config.max_length)
    return accelerator, run_dir, resuming, loaded


def train_supervised(config, task: Task, accelerator, run_dir: Path, resuming: bool) -> dict:
    """Train (or resume) `task.model`; returns the final and best validation metrics and the run's figures."""
    from transformers import get_scheduler

    from perlhf.checkpoint import (CheckpointManager, apply_learning_rates, capture_rng_state, check_global_batch,
                                   global_batch_meta, load_training_state, restore_rng_state, save_training_state)
    from perlhf.guards import NonFiniteGuard, StopRequest, writing
    from perlhf.metrics import MetricsLogger, peak_memory_mb
    from perlhf.reward import length_grouped_batches

    main, world = accelerator.is_main_process, accelerator.num_processes
    model = task.model
    checkpoints = CheckpointManager(run_dir, keep_last=config.save_total_limit)
    start_step, best = 0, {}
    latest = checkpoints.latest() if resuming or not main else None
    if latest is not None:  # the weights first: sharding below splits the base they are loaded over
        check_global_batch(latest.meta, run_dir, world, config.per_device_train_batch_size,
                           "--per-device-train-batch-size")
        model.load_weights(latest.path / "model")
    sharded = parallel.sharding(config, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    own = {id(p): rate for module, rate in task.own_rates.items() for p in module.parameters() if p.requires_grad}
    groups = [{"params": [p for p in params if id(p) not in own], "lr": task.lr}]
    groups += [{"params": [p for p in params if own.get(id(p)) == rate], "lr": rate} for rate in dict.fromkeys(own.values())]
    rates = [group["lr"] for group in groups]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=int(config.warmup_ratio *
                              config.max_steps), num_training_steps=config.max_steps)

    global_batch = config.per_device_train_batch_size * world
    if latest is not None:
        state = load_training_state(latest.path / "training_state.pt", optimizer=optimizer, scheduler=scheduler)
        restore_rng_state(state["rng"])
        start_step, best = latest.step, latest.meta.get("best", best)
        apply_learning_rates(optimizer, scheduler, rates, main)
        if main:
            print(f"perlhf: resuming {run_dir} from step {start_step} ({latest.path.name}); "
                  "pass --overwrite-output-dir to start over")
    if sharded:  # FSDP2 units over the frozen base; the trained parameters' gradients are averaged below
        parallel.shard(model)
        parallel.broadcast_parameters(params)  # what DDP's wrapper does at the start
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    batches_per_epoch = len(task.examples) // global_batch
    if batches_per_epoch == 0:
        raise cfg.ConfigError(f"--per-device-train-batch-size: {global_batch} examples per step across "
                              f"{world} process(es) is more than the {len(task.examples)} training examples")

    def micro_batch(index: int) -> list:
        epoch, position = divmod(index, batches_per_epoch)
        batch = length_grouped_batches(task.lengths, global_batch, config.seed, epoch)[position]
        return [task.examples[i] for i in batch[accelerator.process_index::world]]

    def better(metrics: dict) -> bool:
        if task.best_metric not in best:
            return True
        value, previous = metrics[task.best_metric], best[task.best_metric]
        return value > previous if task.higher_is_better else value < previous

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

    logger = MetricsLogger(run_dir, config.max_steps, start_step, enabled=main, description=task.description)
    guard = NonFiniteGuard(max_in_row=3)
    if latest is not None:
        guard.load_state_dict(latest.meta.get("guard", {}))
    tokens_seen, started, evaluating = 0, time.perf_counter(), 0.0  # evaluation time is not training speed
    step, last_eval = start_step, None
    with StopRequest() as stop:
        while step < config.max_steps:
            model.train()
            losses, logged, tokens = [], [], []
            for micro in range(config.gradient_accumulation_steps):
                batch = micro_batch(step * config.gradient_accumulation_steps + micro)
                sync = micro == config.gradient_accumulation_steps - 1
                with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                    loss, metrics, batch_tokens = task.step_loss(model, batch)
                    accelerator.backward(loss / config.gradient_accumulation_steps)
                losses.append(loss.detach())
                logged.append(metrics)
                tokens.append(batch_tokens)
            # the global batch's loss, so every process skips a non-finite step (or stops) together
            loss = parallel.all_sum(torch.stack(losses).mean()) / world
            if sharded:
                parallel.average_gradients(params)
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            if guard.step_ok(loss, params, step + 1):
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(parallel.all_sum(torch.stack(tokens).sum()).item())
            logger.advance()

            if step % config.logging_steps == 0 or step == config.max_steps:
                elapsed = time.perf_counter() - started - evaluating
                means = {k: parallel.global_mean(torch.tensor([m[k] for m in logged])) for k in logged[0]}
                logger.log(step, {"train/loss": loss.item(), **means,
                                  "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0],
                                  "train/tokens_per_second": tokens_seen / max(elapsed, 1e-9),
                                  "train/skipped_steps": guard.skipped,
                                  "memory/peak_mb": peak_memory_mb(accelerator.device)}, show=task.show)
            if (config.eval_steps and step % config.eval_steps == 0) or step == config.max_steps:
                tick = time.perf_counter()
                metrics = last_eval = task.evaluate(model)
                evaluating += time.perf_counter() - tick
                logger.log(step, metrics, show=("train/loss", task.best_metric))
                if main and metrics and better(metrics):
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
                model = None  # the DDP wrapper: freed before the process group closes (see _finish)
                _finish(accelerator)
                return {"stopped_at": step}
    logger.close()

    fingerprint = parallel.check_identical(params, f"{task.description} weights")
    elapsed = time.perf_counter() - started - evaluating
    final = last_eval if last_eval is not None else task.evaluate(model)
    summary = {"final": final, "best": best, "steps": step, **task.summary,
               "tokens_per_second": tokens_seen / max(elapsed, 1e-9),
               "peak_memory_mb": peak_memory_mb(accelerator.device), "skipped_steps": guard.skipped,
               "trainable_parameters": sum(p.numel() for p in params), "processes": world,
               "weights_sha256": fingerprint}
    if main:
        with writing(run_dir):
            unwrapped.save(run_dir, extra={"perlhf_step": step})
            cfg.save_yaml(config, run_dir / "training_config.yaml")
            (run_dir / "eval_results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    model = None  # the DDP wrapper: freed before the process group closes (see _finish)
    _finish(accelerator)
    return summary


def _finish(accelerator) -> None:
    """Free the DDP wrapper, then close the process group. DDP's reducer holds the group: freed after the group is
    destroyed (when the trainer returns), gloo's destructor waits on its peers forever."""
    accelerator.free_memory()  # drops Accelerate's references to the prepared (DDP) model and optimizer
    gc.collect()
    parallel.finish()
