"""Supervised fine-tuning: the anchor PERL aligns, as a LoRA adapter (or `--full`) trained with next-token loss.

Read top to bottom: config, the loss, the model, the training recipe (on the loop shared with reward modelling,
perlhf.training), evaluation, the command line. The adapter it writes is what `perlhf rl train --policy-adapter`
starts from, with a frozen copy of it as the reference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from perlhf import config as cfg
from perlhf import parallel
from perlhf.config import field
from perlhf.training import SupervisedConfig

# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class SFTConfig(SupervisedConfig):
    data: str = field("", "SFT data: messages, prompt/completion, text, or preference pairs (their chosen side)")
    columns: dict = field({}, "column mapping, e.g. prompt=instruction completion=output")
    output_dir: str = field("runs/sft", "run directory: adapter, checkpoints, logs")
    train_on_prompt: bool = field(False, "next-token loss on the prompt tokens too (default: on the replies only)")
    learning_rate: float | None = field(None, "default 2e-4 with LoRA, 2e-5 with --full")

    DEFAULT_LEARNING_RATES = (2e-4, 2e-5)


# ---------------------------------------------------------------------------------------------------------------
# The loss


def target_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, count) of the target tokens, each predicted from the tokens before it.

    The model's own forward gives the logits (each architecture's logit transforms apply), and only at the
    positions that predict a target: prompt positions never reach the vocabulary projection.
    """
    from perlhf.backbone import keeps_logits

    predicts = torch.zeros_like(targets)
    predicts[:, :-1] = targets[:, 1:]  # position t predicts token t + 1
    labels = ids[:, 1:][targets[:, 1:]]
    if keeps_logits(_causal_lm(model)):
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=predicts, use_cache=False).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[predicts]
    return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.new_tensor(labels.numel())


def _causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside DDP and SFTModel wrappers."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return model.body if isinstance(model, SFTModel) else model


# ---------------------------------------------------------------------------------------------------------------
# The model


class SFTModel(nn.Module):
    """body: a PeftModel with the `policy` adapter (what RL later loads as its starting policy), or the whole causal
    LM with --full. `forward` is the body's, so the loss reads the model's own logits."""

    ADAPTER = "policy"

    def __init__(self, body: nn.Module, tokenizer, base_model: str):
        super().__init__()
        self.body, self.tokenizer, self.base_model = body, tokenizer, base_model

    @property
    def is_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.body, PeftModel)

    def forward(self, **kwargs):
        return self.body(**kwargs)

    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        from perlhf.backbone import save_adapter

        directory = Path(directory)
        info = {"base_model_name_or_path": self.base_model, **(extra or {})}
        if self.is_lora:
            save_adapter(self.body, self.ADAPTER, directory, None, info)
        else:
            self.body.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
            (directory / "perlhf_sft.json").write_text(json.dumps(info, indent=2), encoding="utf-8")

    def load_weights(self, directory: str | Path) -> None:
        """Put the weights saved by `save` back into this model (used when resuming)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file, load_model

        from perlhf.backbone import ADAPTER_WEIGHTS

        directory = Path(directory)
        if self.is_lora:
            set_peft_model_state_dict(self.body, load_file(str(directory / ADAPTER_WEIGHTS)), adapter_name=self.ADAPTER)
        else:
            load_model(self.body, str(directory / "model.safetensors"), strict=False)


def build_sft_model(config: SFTConfig, loaded) -> SFTModel:
    from perlhf.training import trainable_body

    return SFTModel(trainable_body(config, loaded, SFTModel.ADAPTER), loaded.tokenizer, config.model)


# ---------------------------------------------------------------------------------------------------------------
# Batching and evaluation


def collate(batch: list[tuple[list[int], list[bool]]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and target mask of (ids, targets) examples."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    targets = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, (example, target) in enumerate(batch):
        ids[row, :len(example)] = torch.tensor(example)
        mask[row, :len(example)] = 1
        targets[row, :len(example)] = torch.tensor(target)
    return ids.to(device), mask.to(device), targets.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, examples: list, pad_id: int, batch_size: int, accelerator) -> dict:
    """Mean next-token loss of the validation targets (every process's share summed) and its perplexity."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    share = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    for index, keep in parallel.lockstep_batches(share, batch_size, len(examples), parallel.is_sharded(model)):
        loss, count = target_loss(model, *collate([examples[i] for i in index], pad_id, accelerator.device))
        if keep:
            total += torch.tensor([loss.item(), count.item()], dtype=torch.float64)
    model.train(was_training)
    loss_sum, count = parallel.all_sum(total).tolist()
    if count == 0:
        return {}
    mean = loss_sum / count
    return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0)), "eval/tokens": int(count),
            "eval/examples": len(examples)}


# ---------------------------------------------------------------------------------------------------------------
# Training


def encode(records: list, tokenizer, config: SFTConfig) -> tuple[list[tuple[list[int], list[bool]]], int]:
    """(ids, targets) of each example with at least one target token left; returns them and how many were cut."""
    from perlhf.data import encode_sft

    out, truncated = [], 0
    for record in records:
        ids, targets, cut = encode_sft(tokenizer, record, config.max_length, config.train_on_prompt)
        truncated += cut
        if any(targets[1:]):
            out.append((ids, targets))
    return out, truncated


def train_sft(config: SFTConfig) -> dict:
    """Train (or resume) an SFT adapter (or full model); returns the final and best validation loss and figures."""
    from perlhf.data import load_sft
    from perlhf.training import Task, load_split, say_what_trains, start_run, train_supervised

    accelerator, run_dir, resuming, loaded = start_run(config, "sft")
    main, tokenizer = accelerator.is_main_process, loaded.tokenizer
    train_records, val_records = load_split(config, load_sft, run_dir if main else None, verbose=main)
    train, truncated = encode(train_records, tokenizer, config)
    val, val_truncated = encode(val_records, tokenizer, config)
    if not train:
        raise cfg.ConfigError(f"--data: no training example has a target token left after --max-length {config.max_length}")
    if main:
        print(f"perlhf: {len(train)} training and {len(val)} validation examples; cut to --max-length "
              f"{config.max_length}: {truncated} training, {val_truncated} validation; loss on "
              f"{'every token' if config.train_on_prompt else 'the replies only'}")
    model = build_sft_model(config, loaded)
    if main:
        say_what_trains(config, model)
    world = accelerator.num_processes

    def step_loss(module: nn.Module, batch: list):
        ids, mask, targets = collate(batch, tokenizer.pad_token_id, accelerator.device)
        loss_sum, count = target_loss(module, ids, mask, targets)
        # a mean over the global micro-batch's targets: the gradient average over processes is one process's
        loss = loss_sum / (parallel.all_sum(count.float()).clamp(min=1) / world)
        return loss, {"train/padding_share": 1.0 - mask.sum().item() / mask.numel()}, mask.sum()

    task = Task(model=model, examples=train, lengths=[len(ids) for ids, _ in train], step_loss=step_loss,
                evaluate=lambda module: evaluate(module, val, tokenizer.pad_token_id,
                                                 config.per_device_eval_batch_size, accelerator),
                best_metric="eval/loss", higher_is_better=False, lr=config.lr, description="sft",
                show=("train/loss",), summary={"train_examples": len(train), "validation_examples": len(val)})
    summary = train_supervised(config, task, accelerator, run_dir, resuming)
    if main and "final" in summary:
        final = summary["final"]
        print(f"perlhf: {'model' if config.full else 'adapter'} saved to {run_dir} (best step "
              f"{summary['best'].get('step', '-')} in {run_dir / 'best'})")
        if final:
            print(f"perlhf: validation loss {final['eval/loss']:.4f}, perplexity {final['eval/perplexity']:.2f} "
                  f"on {final['eval/tokens']} target tokens of {final['eval/examples']} examples")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Command line: perlhf sft train


def register_cli(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a LoRA (or --full) SFT adapter: the anchor RL starts from")
    cfg.add_arguments(train, SFTConfig)
    train.set_defaults(run=_run_train)


def _run_train(args) -> int:
    summary = train_sft(cfg.build(SFTConfig, args))
    return 0 if "final" in summary or "stopped_at" in summary else 1
