"""Reward modelling: a frozen backbone + a LoRA adapter + a scalar head, trained on preference pairs or ratings.

Read top to bottom: config, losses and metrics (pure functions), the model, batching, the training recipe (on the
loop shared with SFT, perlhf.training), evaluation and scoring, the command line. `--full` trains every weight
with the same loop (the paper's baseline).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from perlhf import config as cfg
from perlhf import parallel
from perlhf.config import check, field
from perlhf.training import SupervisedConfig

# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class RewardConfig(SupervisedConfig):
    data: str = field("", "preference data: file, directory or Hugging Face dataset id (id:split)")
    kind: str | None = field(None, "pairs or pointwise; default: detected from the columns")
    output_dir: str = field("runs/reward", "run directory: adapter, checkpoints, logs")
    # LoRA on every linear layer at 10x full tuning's learning rate: measured best at a fixed budget (docs/reward.md,
    # benchmarks/reward_quality.py); the paper's attention-only recipe is --lora-target attention
    lora_target: str = field("all-linear", "all-linear, attention (the PERL paper's recipe), or module names")
    lora_rank: int = field(16, "LoRA rank")
    lora_alpha: float = field(32.0, "LoRA alpha")
    learning_rate: float | None = field(None, "default 5e-4 with LoRA, 1e-5 with --full")
    margin: float = field(0.0, "Bradley-Terry margin: the chosen must beat the rejected by this much")
    head_learning_rate: float | None = field(None, "learning rate of the scalar head; default: --learning-rate")
    balance_classes: bool = field(False, "pointwise: weight thumbs up and down by the inverse of their share of "
                                         "the training ratings, so the rarer rating counts as much")
    per_device_train_batch_size: int = field(8, "pairs (or rated replies) per device per micro-batch")
    per_device_eval_batch_size: int = field(16, "pairs per device per evaluation batch")
    max_length: int = field(512, "tokens per prompt+response; longer prompts are cut from the left")
    share_prefix: bool = field(True, "pairs: compute the start chosen and rejected share (the prompt) once; exact, "
                                     "and off by itself where a model cannot do it exactly")

    DEFAULT_LEARNING_RATES = (5e-4, 1e-5)

    def validate(self) -> None:
        super().validate()
        check(self.kind in (None, "pairs", "pointwise"), "kind", f"must be pairs or pointwise (got {self.kind!r})")
        check(self.margin >= 0, "margin", "must be >= 0")
        check(self.head_learning_rate is None or self.head_learning_rate > 0, "head_learning_rate",
              f"must be > 0 (got {self.head_learning_rate})")


# ---------------------------------------------------------------------------------------------------------------
# Losses and metrics: pure functions, unit-tested against hand-computed values


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def pointwise_loss(scores: torch.Tensor, labels: torch.Tensor, positive_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(score) against thumbs up (1) / down (0), thumbs up weighted by
    `positive_weight`: the mean over ratings of w_i * BCE_i."""
    weights = torch.where(labels > 0.5, positive_weight, 1.0).to(scores.dtype)
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype), weight=weights)


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

    def __init__(self, body: nn.Module, head: nn.Linear, tokenizer, max_length: int = 512, base_model: str = "",
                 share_prefix: bool = True):
        super().__init__()
        self.body, self.head, self.tokenizer = body, head, tokenizer
        self.max_length, self.base_model = max_length, base_model
        self.share_prefix: bool | None = None if share_prefix else False  # None: decided at the first pair batch

    @property
    def is_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.body, PeftModel)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                ends: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B] at each row's last real token; packed rows (prefix_sharing: a 4D mask, position ids and the
        branches' `ends` [B, k]) give scores [B, k], one per branch."""
        from perlhf.backbone import last_hidden, last_token_scores

        hidden = last_hidden(self.body, input_ids, attention_mask, position_ids)
        if ends is None:
            return last_token_scores(hidden, self.head, attention_mask)
        picked = hidden[torch.arange(hidden.size(0), device=hidden.device)[:, None], ends]
        return self.head(picked.to(self.head.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str], batch_size: int = 16) -> list[float]:
        """Scores for prompt/response pairs (prompt: text or chat messages), in order."""
        from perlhf.data import encode_example

        self.eval()
        device = next(self.parameters()).device
        encoded = [encode_example(self.tokenizer, p, r, self.max_length).input_ids for p, r in zip(prompts, responses)]
        groups: list[list[int]] = []  # runs of the same prompt (RL scores k samples per prompt), computed once
        # not when sharded: every process must run as many forwards, and repeated prompts may differ between them
        grouping = self.share_prefix is not False and not parallel.is_sharded(self.body)
        for index, prompt in enumerate(prompts):
            if groups and grouping and prompts[groups[-1][0]] == prompt:
                groups[-1].append(index)
            else:
                groups.append([index])
        pad_id, out = self.tokenizer.pad_token_id, [0.0] * len(encoded)
        start = 0
        while start < len(groups):
            batch, size = [], 0
            while start < len(groups) and (not batch or size + len(groups[start]) <= batch_size):
                batch.append(groups[start])
                size, start = size + len(groups[start]), start + 1
            sequences = [[encoded[i] for i in group] for group in batch]
            if max(len(g) for g in batch) > 1 and _shares_prefix(self, sequences, pad_id, device):
                packed = _packed(self, sequences, pad_id, device)
                scores = self(packed.input_ids, packed.attention_mask, packed.position_ids, packed.ends).tolist()
                for group, row in zip(batch, scores):
                    for i, score in zip(group, row):
                        out[i] = score
            else:
                flat = [i for group in batch for i in group]
                ids, mask = pad_right([encoded[i] for i in flat], pad_id, device)
                for i, score in zip(flat, self(ids, mask).tolist()):
                    out[i] = score
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
    from perlhf.backbone import new_head
    from perlhf.training import trainable_body

    body = trainable_body(config, loaded, RewardModel.ADAPTER)
    head = new_head(loaded.model)  # fp32 even over a bf16 base: a trained weight needs fp32 for AdamW's small updates
    return RewardModel(body, head, loaded.tokenizer, config.max_length, config.model, config.share_prefix)


def reward_adapter(backbone, name: str, directory: str | Path, tokenizer) -> RewardModel:
    """The LoRA reward model saved in `directory`, loaded frozen as adapter `name` (with its head) on an existing
    backbone: it scores what `perlhf rm score` scores (its --max-length included) while adapter `name` is active."""
    from perlhf.backbone import ADAPTER_CONFIG

    backbone.load_adapter(name, directory, trainable=False)
    info = json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return RewardModel(backbone.model, backbone.heads[name], tokenizer, int(info.get("perlhf_max_length", 512)),
                       info.get("base_model_name_or_path", ""))


def fits_backbone(directory: str | Path, model: str, quantization: str | None) -> bool:
    """Whether the reward model in `directory` is a LoRA adapter trained on this very base (`model`, quantized
    as `quantization`), so it can score as a role of that backbone and give the scores it was trained to give."""
    from perlhf.backbone import ADAPTER_CONFIG

    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        return False  # a fully tuned reward model has weights of its own
    info = json.loads(path.read_text(encoding="utf-8"))
    base = info.get("base_model_name_or_path")
    same = bool(base) and (base == model or (Path(base).exists() and Path(model).exists()
                                             and Path(base).resolve() == Path(model).resolve()))
    return same and info.get("perlhf_quantization") == quantization


RECORDED = "recorded"  # load_reward_model's default: the quantization the reward model was trained on


def load_reward_model(directory: str | Path, model: str | None = None, device: str | None = None,
                      dtype: str | None = None, loaded=None, verbose: bool = True,
                      quantize: str | None = RECORDED) -> RewardModel:
    """Load a reward model saved by `perlhf rm train` (LoRA adapter + head, or a full model + head). A LoRA reward
    model's base is loaded quantized as it was in training unless `quantize` says otherwise (then it warns)."""
    from perlhf.backbone import HEAD_KEY, ADAPTER_CONFIG, Backbone, trained_quantization
    from perlhf.models import load_model
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / ADAPTER_CONFIG).exists():
        if loaded is None:
            info = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            quantize = trained_quantization(directory) if quantize == RECORDED else quantize
            loaded = load_model(model or info["base_model_name_or_path"], device=device, dtype=dtype, verbose=verbose,
                                quantize=quantize)
        reward = reward_adapter(Backbone(loaded.model), RewardModel.ADAPTER, directory, loaded.tokenizer)
    elif (directory / "score.safetensors").exists():
        if quantize not in (None, RECORDED):
            raise ValueError(f"{directory}: a fully tuned reward model is loaded as trained; --quantize applies to "
                             "LoRA reward models (a frozen base)")
        info = json.loads((directory / "perlhf_reward.json").read_text(encoding="utf-8"))
        loaded = load_model(str(directory), device=device, dtype=dtype, verbose=verbose)
        body = loaded.model
        weight = load_file(str(directory / "score.safetensors"))[HEAD_KEY]
        head = nn.Linear(weight.shape[1], 1, bias=False).to(weight.dtype)
        head.weight.data.copy_(weight)
        head = head.to(next(body.parameters()).device, next(body.parameters()).dtype)
        reward = RewardModel(body, head, loaded.tokenizer, int(info.get("perlhf_max_length", 512)),
                             info.get("base_model_name_or_path", ""))
    else:
        raise FileNotFoundError(f"{directory}: not a reward model directory (no adapter_config.json or score.safetensors)")
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
    """Scores for a batch. Pairs: chosen and rejected go through the model in ONE forward pass, packed with their
    shared start computed once where the model allows it (perlhf.prefix_sharing). `tokens` counts the tokens of the
    sequences scored (the same with and without sharing, so tokens/s compare); `computed` and `positions` the real
    and padded tokens the model ran over."""
    if batch[0].rejected is None:
        ids, mask = pad_right([e.chosen for e in batch], pad_id, device)
        labels = torch.tensor([e.label for e in batch], device=device)
        return {"scores": model(ids, mask), "labels": labels, "tokens": mask.sum(), "computed": mask.sum(),
                "positions": mask.numel()}
    tokens = torch.tensor(sum(len(e.chosen) + len(e.rejected) for e in batch), device=device)
    pairs = [[e.chosen, e.rejected] for e in batch]
    if _shares_prefix(model, pairs, pad_id, device):
        packed = _packed(model, pairs, pad_id, device)
        scores = model(packed.input_ids, packed.attention_mask, packed.position_ids, packed.ends)
        return {"chosen": scores[:, 0], "rejected": scores[:, 1], "tokens": tokens,
                "computed": torch.tensor(packed.tokens, device=device), "positions": packed.input_ids.numel()}
    ids, mask = pad_right([e.chosen for e in batch] + [e.rejected for e in batch], pad_id, device)
    scores = model(ids, mask)
    return {"chosen": scores[:len(batch)], "rejected": scores[len(batch):], "tokens": tokens, "computed": mask.sum(),
            "positions": mask.numel()}


def _packed(model: nn.Module, groups: list[list[list[int]]], pad_id: int, device):
    """Each group of sequences (a pair, or RL's k samples of a prompt) as one packed row."""
    from perlhf import prefix_sharing

    reward = getattr(model, "module", model)  # under DDP the reward model is wrapped
    return prefix_sharing.pad_packed([prefix_sharing.pack(group) for group in groups], pad_id, device,
                                     prefix_sharing.attention_of(reward.body), next(reward.body.parameters()).dtype)


def _shares_prefix(model: nn.Module, groups: list[list[list[int]]], pad_id: int, device) -> bool:
    """Whether groups of sequences go through `model` packed. Decided at the first use: where the model can share
    exactly, the packed scores of that batch must equal the plain ones, or the plain path is kept. Said in one line."""
    from perlhf import prefix_sharing

    reward = getattr(model, "module", model)
    if reward.share_prefix is not None:
        return reward.share_prefix
    reason = prefix_sharing.sharing_failure(reward.body, reward.max_length)
    if reason is None:
        was_training = reward.training
        reward.eval()  # no dropout, so that the two computations can be compared
        with torch.no_grad():
            plain = reward(*pad_right([s for group in groups for s in group], pad_id, device))
            packed = _packed(reward, groups, pad_id, device)
            rows = reward(packed.input_ids, packed.attention_mask, packed.position_ids, packed.ends)
            shared = torch.cat([row[:len(group)] for row, group in zip(rows, groups)])
        reward.train(was_training)
        if not prefix_sharing.agrees(shared, plain, next(reward.body.parameters()).dtype):
            reason = f"packed scores differ from the plain ones by {(shared - plain).abs().max().item():.2g}"
    reward.share_prefix = reason is None
    if parallel.rank() == 0:
        print("perlhf: sequences of one prompt share its forward pass in the reward model (prefix sharing, checked "
              "equal on the first batch; --share-prefix false turns it off)" if reason is None else
              f"perlhf: prefix sharing is off for this model: {reason}; each sequence runs whole")
    return reward.share_prefix


def speed_metrics(out: dict) -> dict[str, float]:
    """Where a batch's compute went: the share of padded positions, and the share of the sequences' tokens that
    prefix sharing did not need to compute."""
    computed, tokens = out["computed"].item(), out["tokens"].item()
    return {"train/padding_share": 1 - computed / out["positions"], "train/prefix_saved_share": 1 - computed / tokens}


def batch_loss(out: dict[str, torch.Tensor], margin: float, positive_weight: float = 1.0) -> tuple[torch.Tensor, float]:
    if "chosen" in out:
        return bradley_terry_loss(out["chosen"], out["rejected"], margin), pairwise_accuracy(out["chosen"], out["rejected"])
    accuracy = ((out["scores"] > 0).float() == out["labels"]).float().mean().item()
    return pointwise_loss(out["scores"], out["labels"], positive_weight), accuracy


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
    # this process's share, longest first: batches of similar lengths waste little compute on padding
    mine = sorted(range(rank, len(examples), world), key=lambda i: -max(len(examples[i].chosen),
                                                                        len(examples[i].rejected or [])))
    rows = []
    for index, keep in parallel.lockstep_batches(mine, batch_size, len(examples), parallel.is_sharded(model)):
        out = forward_batch(model, [examples[i] for i in index], pad_id, device)
        if not keep:
            continue
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


def train_reward_model(config: RewardConfig) -> dict:
    """Train (or resume) a reward model; returns the final and best validation metrics and the run's figures."""
    from functools import partial

    from perlhf.data import load_preferences
    from perlhf.training import Task, load_split, say_what_trains, start_run, train_supervised

    accelerator, run_dir, resuming, loaded = start_run(config, "rm")
    main, tokenizer = accelerator.is_main_process, loaded.tokenizer
    train_records, val_records = load_split(config, partial(load_preferences, kind=config.kind),
                                            run_dir if main else None, verbose=main)
    train, truncated = encode_records(train_records, tokenizer, config.max_length)
    val, val_truncated = encode_records(val_records, tokenizer, config.max_length)
    kind = "pairs" if train[0].rejected is not None else "pointwise"
    if main:
        print(f"perlhf: {len(train)} training and {len(val)} validation {kind}; truncated to --max-length "
              f"{config.max_length}: {truncated} training, {val_truncated} validation (prompt cut from the left)")

    positive_weight = 1.0
    if kind == "pointwise" and config.balance_classes:
        positives = sum(e.label > 0.5 for e in train)
        positive_weight = (len(train) - positives) / max(positives, 1)
        if main:
            print(f"perlhf: --balance-classes: {positives} of {len(train)} training ratings are thumbs up; "
                  f"they weigh {positive_weight:.3g} each, thumbs down 1")
    model = build_reward_model(config, loaded)
    head_lr = config.head_learning_rate
    if main:
        say_what_trains(config, model, " + scalar head" + (f" at lr {head_lr:g}" if head_lr is not None else ""))

    def step_loss(module: nn.Module, batch: list[Encoded]):
        out = forward_batch(module, batch, tokenizer.pad_token_id, accelerator.device)
        loss, accuracy = batch_loss(out, config.margin, positive_weight)
        return loss, {"train/accuracy": accuracy, **speed_metrics(out)}, out["tokens"]

    task = Task(model=model, examples=train,
                lengths=[max(len(e.chosen), len(e.rejected or [])) for e in train],  # chosen and rejected pad together
                step_loss=step_loss,
                evaluate=lambda module: evaluate(module, val, tokenizer.pad_token_id,
                                                 config.per_device_eval_batch_size, accelerator),
                best_metric="eval/accuracy" if kind == "pairs" else "eval/roc_auc", higher_is_better=True,
                lr=config.lr, own_rates={model.head: head_lr} if head_lr is not None else {},
                description="reward model",
                show=("train/loss", "train/accuracy"),
                summary={"kind": kind, "train_examples": len(train), "validation_examples": len(val)})
    summary = train_supervised(config, task, accelerator, run_dir, resuming)
    if main and "final" in summary:
        print(f"perlhf: reward model saved to {run_dir} (best step {summary['best'].get('step', '-')} in "
              f"{run_dir / 'best'})")
        print("perlhf: " + _describe(summary["final"]))
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

    reward = load_reward_model(args.rm, model=args.model, device=args.device, dtype=args.dtype,
                               quantize=args.quantize or RECORDED)
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
    reward = load_reward_model(args.rm, model=args.model, device=args.device, dtype=args.dtype, verbose=False,
                               quantize=args.quantize or RECORDED)
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
        parser.add_argument("--quantize", choices=["4bit", "8bit"], default=None,
                            help="quantize the base (default: as the reward model was trained; another warns)")
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
