"""`perlhf export`: a trained LoRA adapter as a standalone artifact, either alone (PEFT format) or merged into its base.

A merged export is checked by the command itself, on the files it wrote: the model read back from disk must hold
no LoRA tensors, must differ from the base where the adapter acts, and must give the adapter model's logits (or
reward scores) on a fixed input within `--tolerance`. "Merged" models that are really the bare base, or that still
carry unmerged LoRA keys transformers silently drops, fail here instead of in someone's evaluation.

An adapter trained on a quantized base (`--quantize 4bit`, recorded in its config) is checked against that base:
its merged export is the adapter merged into the base's de-quantized weights (the weights it was trained on, as
bitsandbytes computes with them), so the merged model gives the quantized adapter model's outputs within the
tolerance. LLM.int8 (8bit) also rounds activations, which no merged weight can reproduce: that merge is refused.

Reward adapters become `*ForSequenceClassification` models (num_labels=1). transformers scores the last token that
is not padding, perlhf the last real token, which is the eos; where a tokenizer pads with its eos (SmolLM2 does),
transformers would score the token before it. Those exports get another special token as their pad token.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from perlhf.backbone import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_KEY

TOLERANCE = 1e-4
# A fixed input for the checks, encoded as perlhf encodes training text (prompt + reply + eos); two lengths, so the
# padding path is exercised too.
SAMPLE = [("What is the capital of France?", "Paris is the capital of France, on the Seine."),
          ("Say hi.", "Hi!")]


class ExportError(RuntimeError):
    """The adapter or output directory is unusable, or the export failed its verification."""


@dataclass
class Adapter:
    directory: Path
    config: dict
    kind: str  # "policy" (a causal LM adapter) or "reward" (has the scalar `score` head)
    base: str  # the base model to load: --model, else the adapter's base_model_name_or_path

    @property
    def quantization(self) -> str | None:
        """The quantization of the base it was trained on ("4bit", "8bit"), as recorded when it was saved."""
        return self.config.get("perlhf_quantization")


def read_adapter(directory: str | Path, model: str | None = None, quantize: str | None = None) -> Adapter:
    from safetensors import safe_open

    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            hint = f"; did you mean {directory / 'policy'}?" if (directory / "policy" / ADAPTER_CONFIG).exists() else ""
            if (directory / "score.safetensors").exists():
                hint = "; this is a --full reward model, already a complete model"
            raise ExportError(f"--adapter {directory}: not an adapter directory, {name} is missing{hint}")
    config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"--adapter {directory}: peft_type {config.get('peft_type')!r} is not LoRA")
    with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as weights:
        kind = "reward" if HEAD_KEY in weights.keys() else "policy"
    base = model or config.get("base_model_name_or_path")
    if not base:
        raise ExportError(f"--adapter {directory}: {ADAPTER_CONFIG} names no base_model_name_or_path; pass --model")
    recorded = config.get("perlhf_quantization", quantize)
    if quantize and quantize != recorded:
        raise ExportError(f"--quantize {quantize}: {directory} was trained on {recorded or 'an unquantized base'} "
                          f"({ADAPTER_CONFIG}); it is exported against that base")
    return Adapter(directory, {**config, "perlhf_quantization": recorded}, kind, base)


def export_adapter(adapter_dir: str | Path, output_dir: str | Path, merge: bool = False, model: str | None = None,
                   dtype: str | None = None, overwrite: bool = False, tolerance: float = TOLERANCE,
                   quantize: str | None = None) -> dict:
    """Export the adapter (merge=False) or the base with the adapter merged in (merge=True), verified.

    Everything is written to OUTPUT.partial-PID and moved into place only once verified, so a failed export leaves
    no half-written model behind (and an existing OUTPUT untouched).
    """
    from perlhf.models import resolve_dtype

    adapter = read_adapter(adapter_dir, model, quantize)
    if dtype is not None and not merge:
        raise ExportError("--dtype applies to --merge exports; an adapter export copies the adapter weights as is")
    try:
        save_dtype = resolve_dtype(dtype or "float32", torch.device("cpu"))
    except ValueError as err:
        raise ExportError(str(err)) from None
    out = Path(output_dir)
    _check_output(out, overwrite, adapter)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")  # ours alone: the pid keeps others' names clear
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with _quiet():
            if merge:
                result = _export_merged(adapter, partial, save_dtype, tolerance)
            else:
                result = _export_adapter_only(adapter, partial, tolerance)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return {"output_dir": str(out), "files": sorted(p.name for p in out.iterdir()), "kind": adapter.kind,
            "merged": merge, "base_model": adapter.base, **result}


def _check_output(out: Path, overwrite: bool, adapter: Adapter) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--output-dir {out} is a file")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--output-dir {out} is not empty; pass --overwrite to replace it")
    # --overwrite deletes OUT: never when that would delete the adapter or the base being exported.
    for precious in (adapter.directory, Path(adapter.base)):
        if precious.exists() and precious.resolve().is_relative_to(out.resolve()):
            raise ExportError(f"--output-dir {out} would hold or replace {precious}; pick another directory")


# ---------------------------------------------------------------------------------------------------------------
# Loading: the base as plain transformers loads it, the adapter as plain PEFT loads it


def _tokenizer(adapter: Adapter):
    from perlhf.models import load_tokenizer

    tokenizer = load_tokenizer(adapter.base)
    eos = tokenizer.eos_token_id
    if adapter.kind == "reward" and eos is not None and tokenizer.pad_token_id == eos:
        # transformers' sequence classification would take the eos for padding and score the token before it.
        for token in (tokenizer.unk_token, tokenizer.bos_token, *tokenizer.all_special_tokens):
            if token is not None and tokenizer.convert_tokens_to_ids(token) != eos:
                tokenizer.pad_token = token
                break
        else:
            raise ExportError(f"{adapter.base}: the tokenizer pads with its eos and has no other special token to pad "
                              "with, so transformers could not score replies the way perlhf does")
    return tokenizer


def _load_base(adapter: Adapter, tokenizer, dequantized: bool = False):
    """The base in float32, quantized as the adapter was trained (bitsandbytes), or with `dequantized` holding
    those quantized weights de-quantized into plain float32 layers (what a merge goes into)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from perlhf.models import one_compute_path, quantization_config, resolve_model_path

    path, _ = resolve_model_path(adapter.base)
    cls, extra = ((AutoModelForSequenceClassification, {"num_labels": 1}) if adapter.kind == "reward"
                  else (AutoModelForCausalLM, {}))
    if adapter.quantization:
        extra.update(quantization_config=quantization_config(adapter.quantization, torch.float32), device_map="cpu")
    try:
        model = cls.from_pretrained(path, dtype=torch.float32, use_safetensors=True, **extra)
    except OSError as err:
        raise ExportError(f"cannot load the base model {adapter.base} (safetensors weights only): {err}") from None
    if adapter.quantization:
        one_compute_path(model)
        if dequantized:
            model = model.dequantize(dtype=torch.float32)
    if adapter.kind == "reward":
        model.config.pad_token_id = tokenizer.pad_token_id  # what marks padding for the score's token choice
    elif model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def _load_with_adapter(adapter: Adapter, directory: Path, tokenizer, dequantized: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(_load_base(adapter, tokenizer, dequantized), directory).eval()


def _sample(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    from perlhf.data import encode_example
    from perlhf.reward import pad_right

    encoded = [encode_example(tokenizer, prompt, response, 128).input_ids for prompt, response in SAMPLE]
    return pad_right(encoded, tokenizer.pad_token_id, "cpu")


@torch.no_grad()
def _outputs(model, kind: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward: one score per sequence. Policy: the logits at real tokens (padding positions are not compared)."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return logits.squeeze(-1) if kind == "reward" else logits[mask.bool()]


@torch.no_grad()
def _perlhf_scores(peft_model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The score as perlhf computes it (head at the last real token), on the same PEFT model."""
    from perlhf.backbone import last_hidden, last_token_scores

    return last_token_scores(last_hidden(peft_model, ids, mask), peft_model.get_base_model().score, mask)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# The two exports


def _export_adapter_only(adapter: Adapter, out: Path, tolerance: float) -> dict:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    shutil.copy2(adapter.directory / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)
    config = dict(adapter.config)
    config["base_model_name_or_path"] = config.get("base_model_name_or_path") or adapter.base
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    tokenizer = _tokenizer(adapter)
    tokenizer.save_pretrained(out)

    # Verify: plain PEFT loads the copy, and every tensor of the file arrives in the model unchanged.
    model = _load_with_adapter(adapter, out, tokenizer)
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
    saved = load_file(str(out / ADAPTER_WEIGHTS))
    lost = [k for k, v in saved.items() if k not in loaded or not torch.equal(loaded[k].to(v.dtype), v)]
    if lost:
        raise ExportError(f"PEFT loaded {out} without {len(lost)} of its {len(saved)} tensors, e.g. {lost[0]}")
    verification = {"tensors_loaded": len(saved), "tolerance": tolerance}
    if adapter.kind == "reward":
        ids, mask = _sample(tokenizer)
        verification["scoring_max_abs_diff"] = _check_scoring(model, ids, mask, tolerance)
    return {"pad_token": tokenizer.pad_token, "verification": verification}


def _check_scoring(model, ids: torch.Tensor, mask: torch.Tensor, tolerance: float) -> float:
    """transformers' sequence-classification score must be the score perlhf trained."""
    diff = _max_diff(_outputs(model, "reward", ids, mask), _perlhf_scores(model, ids, mask))
    if not diff <= tolerance:
        raise ExportError(f"transformers scores the sample {diff:.3g} away from perlhf's scores (tolerance "
                          f"{tolerance:g}): it picks a different token as the last one")
    return diff


def _export_merged(adapter: Adapter, out: Path, save_dtype: torch.dtype, tolerance: float) -> dict:
    if adapter.quantization == "8bit":
        raise ExportError(f"--adapter {adapter.directory} was trained on an 8-bit (LLM.int8) base, which rounds "
                          "activations as well as weights, so no merged model gives its outputs. Export the adapter "
                          "alone (no --merge) and load it on the 8-bit base, or train on a 4-bit or unquantized base "
                          "to merge")
    tokenizer = _tokenizer(adapter)
    ids, mask = _sample(tokenizer)
    model = _load_with_adapter(adapter, adapter.directory, tokenizer)
    reference = _outputs(model, adapter.kind, ids, mask)  # the adapter on the base it was trained on
    if adapter.quantization:  # merge into the de-quantized weights, checked against the quantized model's outputs
        del model
        model = _load_with_adapter(adapter, adapter.directory, tokenizer, dequantized=True)
    verification: dict = {"tolerance": tolerance}
    if adapter.kind == "reward":
        verification["scoring_max_abs_diff"] = _check_scoring(model, ids, mask, tolerance)
    else:
        with model.disable_adapter():  # how far the adapter moves the logits: the scale the checks below resolve
            verification["adapter_effect"] = _max_diff(_outputs(model, "policy", ids, mask), reference)
    before = _changed_base_weights(model)
    if not before and adapter.kind == "policy":
        raise ExportError(f"{adapter.directory}: every LoRA B matrix is zero, so the adapter changes nothing and the "
                          "merged model would be the base; export a trained adapter")

    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf merged weights
    verification["merge_max_abs_diff"] = _max_diff(_outputs(merged, adapter.kind, ids, mask), reference)
    effect = verification.get("adapter_effect")
    _require(verification["merge_max_abs_diff"], tolerance, "the merged model (before saving) differs from the "
             "adapter model", effect)
    if save_dtype != torch.float32:
        for p in merged.parameters():  # round the weights as the file will hold them, to know what it must give
            p.data = p.data.to(save_dtype).float()  # (parameters only: buffers such as rotary tables are not saved)
    expected = _outputs(merged, adapter.kind, ids, mask)
    merged.to(save_dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    del merged, model

    # Verify the files, as a user would load them.
    lora_keys = [k for k in _saved_keys(out) if "lora_" in k]
    if lora_keys:
        raise ExportError(f"{out} still holds {len(lora_keys)} LoRA tensors (e.g. {lora_keys[0]}): the adapter was "
                          "not merged, and transformers would drop them on load")
    reloaded = _reload(adapter.kind, out)
    state = reloaded.state_dict()
    changed = [name for name, weight in before.items() if _max_diff(state[name].float(), weight) > 0]
    if before and not changed:
        raise ExportError(f"{out}: none of the {len(before)} checked projection weights differ from the base "
                          f"({', '.join(before)}): the adapter was not merged in")
    got = _outputs(reloaded, adapter.kind, ids, mask)
    verification["disk_max_abs_diff"] = _max_diff(got, expected)
    _require(verification["disk_max_abs_diff"], tolerance, f"the model read back from {out} differs from the one saved")
    verification["max_abs_diff"] = _max_diff(got, reference)
    if save_dtype == torch.float32:
        _require(verification["max_abs_diff"], tolerance, f"the model read back from {out} differs from the adapter "
                 "model", effect)
    verification.update(lora_keys=0, weights_checked=len(before), weights_changed=len(changed))
    return {"dtype": str(save_dtype).removeprefix("torch."), "pad_token": tokenizer.pad_token,
            "trained_on": adapter.quantization or "unquantized base", "verification": verification}


def _changed_base_weights(model, limit: int = 3) -> dict[str, torch.Tensor]:
    """Copies of up to `limit` base weights the adapter changes (non-zero LoRA B), keyed as in the merged model."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and any(b.weight.abs().max() > 0 for b in module.lora_B.values()):
            found[f"{name}.weight"] = module.get_base_layer().weight.detach().float().clone()
            if len(found) == limit:
                break
    return found


def _saved_keys(directory: Path) -> list[str]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{directory}: save_pretrained wrote no .safetensors file")
    keys = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            keys += list(handle.keys())
    return keys


def _reload(kind: str, directory: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    # float32 whatever the saved dtype: bf16/fp16 weights up-cast exactly, so only the file is being tested.
    return cls.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).eval()


def _require(diff: float, tolerance: float, what: str, effect: float | None = None) -> None:
    if diff <= tolerance:
        return  # (a NaN falls through and fails)
    message = f"{what}: max abs difference {diff:.3g} on the sample input exceeds the tolerance {tolerance:g}"
    if effect is not None and diff < 0.01 * effect:
        # float32 rounding grows with depth and logit size; a real merge error is of the order of the adapter's effect.
        message += (f". The adapter itself moves the logits by {effect:.3g}, so this may be rounding noise of a large "
                    "model: if so, pass a larger --tolerance")
    raise ExportError(message)


@contextmanager
def _quiet():
    """The export prints its own summary; transformers' load reports and bars would bury it."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unexpected keyword arguments")  # perlhf_* keys in the config
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")  # GPT-2's Conv1D, handled
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # PEFT's call
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# Command line: perlhf export


def describe(result: dict) -> str:
    v = result["verification"]
    what = f"{result['kind']} adapter"
    if not result["merged"]:
        lines = [f"perlhf: {what} for {result['base_model']} -> {result['output_dir']}",
                 f"perlhf: verified: PEFT loads it with all {v['tensors_loaded']} tensors intact"]
    else:
        measure = "scores" if result["kind"] == "reward" else "logits"
        into = (f"the de-quantized weights of {result['base_model']} (trained on its {result['trained_on']} "
                "quantization)" if result["trained_on"] != "unquantized base" else result["base_model"])
        lines = [f"perlhf: merged {what} into {into} ({result['dtype']}) -> {result['output_dir']}",
                 f"perlhf: verified from disk: no LoRA tensors; {v['weights_changed']} of {v['weights_checked']} "
                 "checked projection weights changed by the merge"]
        if result["dtype"] == "float32":
            line = (f"perlhf: {measure} vs the adapter model: max abs diff {v['max_abs_diff']:.2e} "
                    f"(tolerance {v['tolerance']:g})")
        else:
            line = (f"perlhf: {measure} vs the adapter model: max abs diff {v['merge_max_abs_diff']:.2e} after the "
                    f"merge and {v['max_abs_diff']:.2e} once rounded to {result['dtype']}; the file gives the rounded "
                    f"model's {measure} within {v['disk_max_abs_diff']:.2e} (tolerance {v['tolerance']:g})")
        if "adapter_effect" in v:
            line += f"; the adapter moves the logits by up to {v['adapter_effect']:.3g}"
        lines.append(line)
    if "scoring_max_abs_diff" in v:
        lines.append(f"perlhf: transformers' sequence-classification score matches perlhf's within "
                     f"{v['scoring_max_abs_diff']:.2e} (pad token {result['pad_token']!r})")
    return "\n".join(lines)


def _run(args) -> int:
    try:
        result = export_adapter(args.adapter, args.output_dir, merge=args.merge, model=args.model, dtype=args.dtype,
                                overwrite=args.overwrite, tolerance=args.tolerance, quantize=args.quantize)
    except ExportError as err:
        print(f"perlhf: export failed: {err}", file=sys.stderr)
        return 1
    print(describe(result))
    return 0


def register_cli(parser) -> None:
    """`perlhf export ...`: call with the sub-command's own parser."""
    parser.add_argument("--adapter", required=True, help="adapter directory (run_dir/policy, or a reward model)")
    parser.add_argument("--output-dir", required=True, help="where to write the export (must be empty)")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base and save a full model")
    parser.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default=None, help="merged weights: float32 (default), bfloat16 or float16")
    parser.add_argument("--quantize", default=None, choices=["4bit", "8bit"],
                        help="the quantization of the base the adapter was trained on, for adapters that do not "
                             "record it (perlhf records it)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="largest max-abs logit/score difference the verification accepts")
    parser.set_defaults(run=_run)
