"""One frozen backbone, several LoRA adapters and scalar heads: the roles of PERL.

A role is an adapter name (policy, reward, value, reference) or `None` for the bare backbone. `Backbone.role(name)`
activates it, sets eval/train mode, and restores both on exit, even when the body raises. Scalar heads
(reward, value) are plain `nn.Linear(hidden, 1, bias=False)` modules kept beside the adapters, shaped like the
`score` head of transformers' `*ForSequenceClassification` so saved reward models load there too.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

# In the saved adapter file the head sits where PEFT puts a sequence-classification `score` module, so
# AutoModelForSequenceClassification + PeftModel.from_pretrained reads the same directory.
HEAD_KEY = "base_model.model.score.weight"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# What an adapter may write into the shared model: LoRA weights (DoRA's magnitude included), and the head. PEFT
# lists "classifier" beside "score" in every sequence-classification adapter; only the score weight is read.
LORA_WEIGHT_NAMES = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
HEAD_MODULES = {"score", "classifier"}


def attention_target_modules(model: nn.Module) -> list[str]:
    """Names PEFT can match for every linear projection inside the attention blocks, for any architecture."""
    targets = set()
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2 uses Conv1D
        if "lora_" in name:
            continue
        parts = name.replace(".base_layer", "").split(".")  # a layer PEFT already wrapped keeps its name
        if is_linear and len(parts) >= 2 and ("attn" in parts[-2] or "attention" in parts[-2]):
            targets.add(".".join(parts[-2:]))  # "self_attn.q_proj", "attn.c_proj" (not GPT-2's mlp.c_proj)
    if not targets:
        raise ValueError(f"no attention projections found in {type(model).__name__}; pass --lora-target all-linear")
    return sorted(targets)


def lora_config(model: nn.Module, rank: int, alpha: float, dropout: float, target: str,
                rslora: bool = False) -> LoraConfig:
    if target == "attention":
        modules: list[str] | str = attention_target_modules(model)
    elif target == "all-linear":
        modules = "all-linear"
    else:
        modules = [t.strip() for t in target.split(",") if t.strip()]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none",
                      use_rslora=rslora, task_type="CAUSAL_LM")


def quantization_of(model: nn.Module) -> str | None:
    """How the frozen base was quantized when loaded: "4bit", "8bit" or None."""
    config = getattr(causal_lm(model).config, "quantization_config", None)
    if config is None:
        return None
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return "4bit" if get("load_in_4bit") else "8bit" if get("load_in_8bit") else None


def describe_quantization(quantization: str | None) -> str:
    return f"a {quantization} base" if quantization else "an unquantized base"


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model (LlamaForCausalLM...) inside a PeftModel, LoRA layers included; others unchanged."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def transformer_body(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (LlamaModel inside LlamaForCausalLM), LoRA layers included."""
    model = causal_lm(model)
    return getattr(model, model.base_model_prefix)


def keeps_logits(model: nn.Module) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (project only the positions asked for)."""
    import inspect

    return "logits_to_keep" in inspect.signature(causal_lm(model).forward).parameters


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states [B, T, H]. Skips the LM head: a reward or value model does not need the vocab logits."""
    return transformer_body(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state


def last_token_scores(hidden: torch.Tensor, head: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head applied at each sequence's last real token (right padding). Returns [B] in float32."""
    last = attention_mask.sum(dim=1) - 1
    picked = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (non-reentrant: frozen inputs need no requires_grad trick)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def new_head(model: nn.Module) -> nn.Linear:
    """A scalar head in float32 whatever the base's dtype: a trained head keeps fp32 master weights (AdamW updates
    in bf16 round away), and `last_token_scores` casts the hidden states to it."""
    hidden = model.config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1, bias=False, dtype=torch.float32)
    nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
    return head.to(next(model.parameters()).device)


class Backbone(nn.Module):
    """A PEFT model holding named LoRA adapters over one frozen base, plus scalar heads by role name."""

    def __init__(self, base: nn.Module):
        super().__init__()
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.model: PeftModel | None = None  # PEFT needs a first adapter to wrap the base; made by add_adapter
        self.heads = nn.ModuleDict()

    @classmethod
    def with_adapter(cls, base: nn.Module, name: str, config: LoraConfig, trainable: bool = True) -> "Backbone":
        backbone = cls(base)
        backbone.add_adapter(name, config, trainable)
        return backbone

    def add_adapter(self, name: str, config: LoraConfig, trainable: bool) -> None:
        if self.model is None:
            self.model = get_peft_model(self.base, config, adapter_name=name)
        else:
            with self._keeping_trainable_flags():
                self.model.add_adapter(name, config)
        self.set_trainable(name, trainable)

    def copy_adapter(self, source: str, name: str, trainable: bool) -> None:
        """A second adapter with the same weights, e.g. a frozen reference copy of a starting policy adapter."""
        self.add_adapter(name, self.model.peft_config[source], trainable)
        weights = get_peft_model_state_dict(self.model, adapter_name=source, save_embedding_layers=False)
        set_peft_model_state_dict(self.model, weights, adapter_name=name)
        if source in self.heads:
            self.heads[name] = _clone_head(self.heads[source])

    def set_trainable(self, name: str, trainable: bool) -> None:
        for pname, p in self.model.named_parameters():
            if f".{name}." in pname and "lora_" in pname:
                p.requires_grad_(trainable)
        if name in self.heads:
            self.heads[name].requires_grad_(trainable)

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        params = [p for pname, p in self.model.named_parameters() if f".{name}." in pname and "lora_" in pname]
        if name in self.heads:
            params += list(self.heads[name].parameters())
        return params

    @contextmanager
    def _keeping_trainable_flags(self):
        # PEFT's set_adapter/add_adapter rewrite requires_grad of every adapter; which adapters train is ours to say.
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    @contextmanager
    def role(self, name: str | None, train: bool = False):
        """Run the body with adapter `name` active (None: the bare backbone), in train or eval mode."""
        previous_adapter, previous_mode = self.model.active_adapter, self.model.training
        self.model.train(train)
        self.heads.train(train)
        try:
            if name is None:
                with self.model.disable_adapter():
                    yield self
            else:
                with self._keeping_trainable_flags():
                    self.model.set_adapter(name)
                yield self
        finally:
            with self._keeping_trainable_flags():
                self.model.set_adapter(previous_adapter)
            self.model.train(previous_mode)
            self.heads.train(previous_mode)

    def scores(self, head: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scalar score per sequence from the head `head` (call inside `role`)."""
        return last_token_scores(last_hidden(self.model, input_ids, attention_mask), self.heads[head], attention_mask)

    def save_adapter(self, name: str, directory: str | Path, extra_config: dict | None = None) -> None:
        save_adapter(self.model, name, directory, self.heads[name] if name in self.heads else None, extra_config)

    def load_adapter_weights(self, name: str, directory: str | Path) -> None:
        """Overwrite an existing adapter (and its head) with weights saved by `save_adapter` (used to resume)."""
        weights = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
        head_weight = weights.pop(HEAD_KEY, None)
        set_peft_model_state_dict(self.model, weights, adapter_name=name)
        if head_weight is not None:
            self.heads[name].weight.data.copy_(head_weight)

    def load_adapter(self, name: str, directory: str | Path, trainable: bool) -> None:
        """Load an adapter saved by `save_adapter` (or any PEFT LoRA adapter) under `name`, with its head if it has one."""
        directory = Path(directory)
        weights_path, config_path = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
        if not weights_path.exists() or not config_path.exists():
            raise FileNotFoundError(f"{directory}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        config = read_lora_config(directory)
        check_quantization(directory, self.base)
        weights = load_file(str(weights_path))
        foreign = [k for k in weights if k != HEAD_KEY and not LORA_WEIGHT_NAMES & set(k.split("."))]
        if foreign:
            raise _writes_base_error(directory, f"{ADAPTER_WEIGHTS} holds {len(foreign)} weights that are not LoRA "
                                                f"weights, e.g. {foreign[0]}")
        head_weight = weights.pop(HEAD_KEY, None)
        self.add_adapter(name, config, trainable)
        result = set_peft_model_state_dict(self.model, weights, adapter_name=name)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and "lora_" in k]
        if missing:
            raise ValueError(f"{weights_path}: adapter weights missing for {len(missing)} LoRA modules, e.g. {missing[0]}")
        if head_weight is not None:
            head = nn.Linear(head_weight.shape[1], 1, bias=False, dtype=torch.float32)  # fp32 as in new_head
            head.weight.data.copy_(head_weight)
            self.heads[name] = head.to(next(self.model.parameters()).device)
            self.heads[name].requires_grad_(trainable)


def trained_quantization(directory: str | Path) -> str | None:
    """The quantization of the base an adapter was trained on, as `save_adapter` recorded it (None if unrecorded)."""
    raw = json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return raw.get("perlhf_quantization")


def check_quantization(directory: str | Path, model: nn.Module) -> None:
    """Warn when an adapter goes onto a base quantized otherwise than the one it was trained on: its outputs
    (a reward model's scores, a policy's log-probs) are then not the ones it was trained to give."""
    import warnings

    raw = json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if "perlhf_quantization" not in raw:
        return
    trained, here = raw["perlhf_quantization"], quantization_of(model)
    if trained != here:
        flag = f"--quantize {trained}" if trained else "no --quantize"
        warnings.warn(f"{directory} was trained on {describe_quantization(trained)} and is loaded on "
                      f"{describe_quantization(here)}: its outputs differ from those it was trained to give. "
                      f"Load it with {flag} to get them.", stacklevel=3)


def read_lora_config(directory: str | Path) -> LoraConfig:
    """The LoRA config of a saved adapter, refusing adapters that would also change the shared base's weights."""
    raw = json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory}/{ADAPTER_CONFIG}: peft_type {raw.get('peft_type')!r} is not LoRA")
    extra_modules = sorted(set(raw.get("modules_to_save") or []) - HEAD_MODULES)
    if extra_modules:
        raise _writes_base_error(directory, f"{ADAPTER_CONFIG} sets modules_to_save {extra_modules} (whole modules "
                                            "trained beside LoRA)")
    if raw.get("trainable_token_indices"):
        raise _writes_base_error(directory, f"{ADAPTER_CONFIG} sets trainable_token_indices (trained embedding rows)")
    known = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in raw.items() if k in known and k not in ("peft_type", "modules_to_save", "task_type")}
    return LoraConfig(**kwargs, task_type="CAUSAL_LM")


def _writes_base_error(directory: str | Path, what: str) -> ValueError:
    return ValueError(
        f"{directory}: {what}. perlhf loads adapters onto one frozen base shared by the policy, reference, reward "
        f"and value roles, so these weights would silently change all of them. Merge the adapter into a copy of its "
        f"base with `perlhf export --adapter {directory} --merge --output-dir MERGED` and pass MERGED as --model.")


def _clone_head(head: nn.Linear) -> nn.Linear:
    # fp32 as in new_head: the clone may be trained (the value head starts as a copy of the reward head).
    clone = nn.Linear(head.in_features, 1, bias=False, dtype=torch.float32).to(head.weight.device)
    clone.weight.data.copy_(head.weight.data)
    return clone


def save_adapter(model: PeftModel, name: str, directory: str | Path, head: nn.Linear | None = None,
                 extra_config: dict | None = None) -> None:
    """PEFT adapter format: adapter_config.json + adapter_model.safetensors (LoRA weights, and the head if any)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: PEFT would otherwise look the base model up on the Hub at every save
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    weights = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = model.peft_config[name].to_dict()
    if head is not None:
        weights[HEAD_KEY] = head.weight.detach().contiguous().cpu()
        config["task_type"] = "SEQ_CLS"
        config["modules_to_save"] = ["score"]
    config["perlhf_quantization"] = quantization_of(model)  # what the adapter was trained on: scores depend on it
    config.update(extra_config or {})
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    save_file(weights, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
