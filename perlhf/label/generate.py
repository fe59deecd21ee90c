"""`perlhf label generate`: sample responses per prompt and queue pairs of them for labelling.

Sources are the bare model and/or LoRA adapters. With one source every response comes from it; with several
(`--adapters A B`, where `base` names the bare model) response slot j of a prompt comes from source j mod S, so
with two adapters and two responses per prompt response A is adapter A's and response B is adapter B's. Pairs
are all couples of a prompt's responses, and with several sources only couples from different sources.
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from perlhf.config import ConfigError, check, check_quantize, field
from perlhf.label.store import LabelStore, Response

BASE = "base"


@dataclass
class GenerateConfig:
    prompts: str | None = field(None, "prompts file: .txt (one per line) or JSONL with a `prompt` field")
    db: str = field("labels.db", "label database; created (with an admin token) if missing")
    # None, not perlhf.models.DEFAULT_MODEL: importing perlhf.models imports torch, which `label serve` never needs.
    model: str | None = field(None, "backbone: Hugging Face id or local directory; None: perlhf's default model")
    adapter: str | None = field(None, "sample from this LoRA adapter directory (a policy) instead of the bare model")
    adapters: list[str] | None = field(None, "compare sources: response A from the first, B from the second; "
                                             "`base` names the bare model")
    responses_per_prompt: int = field(2, "responses sampled per prompt")
    max_new_tokens: int = field(128, "longest response, in tokens")
    temperature: float = field(0.8, "sampling temperature")
    top_p: float = field(0.95, "nucleus sampling threshold")
    seed: int = field(0, "random seed")
    batch_size: int = field(8, "sequences sampled at once")
    labels_per_pair: int = field(1, "answers wanted per pair (different labellers)")
    chat: bool = field(False, "send plain-text prompts as a user message through the chat template (instruct "
                              "models); the stored and exported prompt is then that message list")
    max_prompt_tokens: int = field(1024, "prompts longer than this are skipped")
    limit: int | None = field(None, "use only the first N prompts")
    device: str | None = field(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    dtype: str | None = field(None, "float32, bfloat16, float16 (default: by device)")
    quantize: str | None = field(None, "load the backbone quantized through bitsandbytes: 4bit or 8bit")

    def validate(self) -> None:
        check(self.prompts is not None, "prompts", "is required")
        check(not (self.adapter and self.adapters), "adapters", "give --adapter or --adapters, not both")
        check(self.adapters is None or len(self.adapters) >= 2, "adapters", "needs two or more sources to compare")
        check(self.responses_per_prompt >= 2, "responses_per_prompt", "must be at least 2")
        check(self.responses_per_prompt >= len(self.sources()), "responses_per_prompt",
              f"must be at least the number of sources ({len(self.sources())})")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        check(self.temperature > 0, "temperature", "must be positive")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(self.labels_per_pair >= 1, "labels_per_pair", "must be at least 1")
        check(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be at least 1")
        check(self.limit is None or self.limit >= 1, "limit", "must be at least 1")
        check_quantize(self.quantize)
        for path in self.sources():
            if path != BASE:
                check(Path(path, "adapter_config.json").is_file(), "adapters" if self.adapters else "adapter",
                      f"{path} is not a LoRA adapter directory (no adapter_config.json)")

    def model_name(self) -> str:
        from perlhf.models import DEFAULT_MODEL

        return self.model or DEFAULT_MODEL

    def sources(self) -> list[str]:
        if self.adapters:
            return list(self.adapters)
        return [self.adapter] if self.adapter else [BASE]


def pair_indices(sources_of_slots: list[int]) -> list[tuple[int, int]]:
    """All couples of response slots; with several sources, only couples from different sources, each
    ordered so that response a comes from the source named first."""
    if len(set(sources_of_slots)) == 1:
        return list(itertools.combinations(range(len(sources_of_slots)), 2))
    return [(i, j) if sources_of_slots[i] < sources_of_slots[j] else (j, i)
            for i, j in itertools.combinations(range(len(sources_of_slots)), 2)
            if sources_of_slots[i] != sources_of_slots[j]]


def _load_sources(config: GenerateConfig):
    """The model to call generate() on, and per source a context manager that makes it the active one."""
    from perlhf.models import load_model

    loaded = load_model(config.model_name(), device=config.device, dtype=config.dtype, quantize=config.quantize)
    sources = config.sources()
    adapters = [s for s in sources if s != BASE]
    if not adapters:
        return loaded, loaded.model, [nullcontext] * len(sources)
    from peft import PeftModel

    names = {path: f"source{i}" for i, path in enumerate(dict.fromkeys(adapters))}
    first, *rest = names
    model = PeftModel.from_pretrained(loaded.model, first, adapter_name=names[first], is_trainable=False)
    for path in rest:
        model.load_adapter(path, adapter_name=names[path], is_trainable=False)
    model.eval()

    activators = [model.disable_adapter if s == BASE else partial(_using, model, names[s]) for s in sources]
    return loaded, model, activators


@contextmanager
def _using(model, name: str):
    model.set_adapter(name)
    yield


def _sample(model, tokenizer, prompt_ids: list[list[int]], count: int, config: GenerateConfig,
            eos: list[int]) -> list[list[dict]]:
    """`count` responses for each prompt (token ids, see perlhf.data.prompt_token_ids), as {text, finish, tokens}."""
    import torch

    device = next(model.parameters()).device
    batch = tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0,
                             max_new_tokens=config.max_new_tokens, num_return_sequences=count,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    results = []
    for row in new:
        end = next((k for k, t in enumerate(row) if t in eos), None)
        tokens = row if end is None else row[:end]
        results.append({"text": tokenizer.decode(tokens, skip_special_tokens=True),
                        "finish": "length" if end is None else "eos", "tokens": len(tokens)})
    return [results[i * count:(i + 1) * count] for i in range(len(prompt_ids))]


def generate(config: GenerateConfig, store: LabelStore) -> dict[str, Any]:
    """Sample, then store prompt by prompt; returns counts for the summary line."""
    from transformers import set_seed

    from perlhf.data import DataError, load_prompts, prompt_token_ids

    try:
        prompts, report = load_prompts(config.prompts, limit=config.limit)
    except DataError as err:
        raise ConfigError(f"--prompts: {err}") from None
    print(f"perlhf: {report.summary()}")
    if not prompts:
        raise ConfigError(f"--prompts {config.prompts}: no prompts found")
    if config.chat:
        # Stored as the messages, so that export hands `rm train` exactly what the model was shown.
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]

    loaded, model, activators = _load_sources(config)
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position of each row
    eos = sorted({tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))} - {None})

    sources = config.sources()
    slot_source = [j % len(sources) for j in range(config.responses_per_prompt)]
    per_source = [slot_source.count(s) for s in range(len(sources))]
    pairs_of_prompt = pair_indices(slot_source)
    sampling = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p,
                "seed": config.seed}
    adapter_names = [s if s == BASE else str(Path(s).resolve()) for s in sources]
    run_id = store.new_run({"model": config.model_name(), "model_source": loaded.source, "sources": adapter_names,
                            "prompts": str(config.prompts), "responses_per_prompt": config.responses_per_prompt,
                            "labels_per_pair": config.labels_per_pair, **sampling})

    encoded: list[list[int] | None] = []  # token ids as the model reads them (BOS included where it wants one)
    for prompt in prompts:
        try:
            encoded.append(prompt_token_ids(tokenizer, prompt))
        except DataError:  # e.g. roles that the chat template refuses: skip the prompt, count it
            encoded.append(None)
    keep = [i for i, ids in enumerate(encoded) if ids is not None and len(ids) <= config.max_prompt_tokens]
    chunk = max(1, config.batch_size // max(per_source))
    counts = {"prompts": 0, "responses": 0, "pairs": 0, "identical_pairs": 0, "skipped_unrenderable": encoded.count(None),
              "skipped_long_prompts": len(prompts) - len(keep) - encoded.count(None)}
    started = time.perf_counter()
    for start in range(0, len(keep), chunk):
        ids = keep[start:start + chunk]
        by_source = []
        for s, activate in enumerate(activators):
            # Seeded per chunk and source, so a source's samples do not depend on what ran before it.
            set_seed(config.seed * 1_000_003 + start * len(sources) + s)
            with activate():
                by_source.append(_sample(model, tokenizer, [encoded[i] for i in ids], per_source[s], config, eos))
        for row, i in enumerate(ids):
            taken = [0] * len(sources)
            responses = []
            for s in slot_source:
                sample = by_source[s][row][taken[s]]
                taken[s] += 1
                responses.append(Response(sample["text"], config.model_name(), adapter_names[s],
                                          {**sampling, "finish": sample["finish"], "tokens": sample["tokens"]}))
            # Two identical responses (often both empty) carry no preference: not worth a labeller's time.
            distinct = [(a, b) for a, b in pairs_of_prompt if responses[a].text != responses[b].text]
            store.add_prompt(prompts[i], responses, distinct, config.labels_per_pair, run_id)
            counts["prompts"] += 1
            counts["responses"] += len(responses)
            counts["pairs"] += len(distinct)
            counts["identical_pairs"] += len(pairs_of_prompt) - len(distinct)
        print(f"perlhf: {counts['prompts']}/{len(keep)} prompts sampled "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return counts


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
