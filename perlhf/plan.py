"""`perlhf plan`: the peak memory a run will need, from the model's config alone (no weights), before it starts.

Parameters are counted on a copy of the model built on PyTorch's meta device (shapes, no storage), with LoRA
injected as the trainers inject it. Activations are measured, not guessed: ONE decoder layer of the model's own
class is built with random weights on the CPU and run forward at two small sequence lengths under autograd's
saved-tensor hooks, which report every tensor kept for backward. That gives the layer's bytes per token as
a + b * sequence length (b: the attention mask and any T x T attention state), which is scaled to the run's
batch, length and layer count. Everything else is counted from shapes: weights (bitsandbytes' 4-bit NF4 with
double quantization: 0.5 byte per weight plus 1/64 byte of block scales; LLM.int8: 1 byte plus a float per
row), fp32 adapter and head master weights with their gradients and two AdamW moments (16 bytes per trained
parameter), the KV cache of generation and the vocabulary logits of the positions that reach the LM head.

It plans perlhf's layout (one frozen backbone, adapters for every role) and the classic one (separate policy,
reference, reward and value models, the trained ones fully tuned), and says whether each fits `--memory`.
The attention probe runs CPU kernels; CUDA's flash attention keeps less, so on CUDA the figure errs high.
benchmarks/plan_check.py compares the predictions with measured peaks.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from perlhf import config as cfg
from perlhf import parallel
from perlhf.config import check, field
from perlhf.models import DEFAULT_MODEL

GIB = 2**30
ADAM_BYTES = 16  # fp32 master weight + gradient + two AdamW moments, per trained parameter


@dataclass
class PlanConfig:
    model: str = field(DEFAULT_MODEL, "Hugging Face model id or local directory (only its config is read)")
    task: str = field("rm", "rm (reward model), sft, or rl")
    quantize: str | None = field(None, "plan a 4bit or 8bit frozen backbone")
    batch_size: int | None = field(None, "per process: pairs (rm), examples (sft) or prompts (rl); default: the "
                                         "trainer's")
    max_length: int | None = field(None, "rm/sft tokens per example; default: the trainer's")
    max_prompt_length: int = field(256, "rl prompt tokens")
    max_new_tokens: int = field(48, "rl response tokens")
    samples_per_prompt: int = field(1, "rl responses per prompt (k)")
    algorithm: str = field("reinforce", "rl algorithm: reinforce and ppo train a value adapter, rloo does not")
    lora_rank: int | None = field(None, "default: the trainer's")
    lora_target: str | None = field(None, "default: the trainer's")
    gradient_checkpointing: bool | None = field(None, "default: the trainer's")
    processes: int = field(1, "data-parallel processes (each holds the whole plan unless --fsdp)")
    fsdp: bool = field(False, "plan the frozen base sharded over --processes (FSDP2, as `--fsdp` trains)")
    dtype: str | None = field(None, "compute dtype: float32, bfloat16 or float16; default: bf16 for --device "
                                    "cuda, fp32 for cpu")
    device: str = field("cuda", "the device planned for: cuda or cpu")
    memory: str | None = field(None, "memory per process to fit in, e.g. 24GB or 16GiB")
    trust_remote_code: bool = field(False, "allow model code from the model repository")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check(self.task in ("rm", "sft", "rl"), "task", f"must be rm, sft or rl (got {self.task!r})")
        cfg.check_quantize(self.quantize)
        cfg.check_dtype(self.dtype)
        check(self.device in ("cuda", "cpu"), "device", "must be cuda or cpu")
        check(self.processes >= 1, "processes", "must be >= 1")
        cfg.check_fsdp(self.fsdp, False, self.quantize)
        check(self.memory is None or parse_memory(self.memory) > 0, "memory", "must look like 24GB or 16GiB")

    def resolved(self) -> dict:
        """The run's shape, the trainers' defaults filled in."""
        from perlhf.reward import RewardConfig
        from perlhf.rl.trainer import RLConfig
        from perlhf.sft import SFTConfig

        trainer = {"rm": RewardConfig, "sft": SFTConfig, "rl": RLConfig}[self.task]
        defaults = {f: trainer.__dataclass_fields__[f].default for f in ("lora_rank", "lora_target",
                                                                          "gradient_checkpointing")}
        batch_field = "batch_size" if self.task == "rl" else "per_device_train_batch_size"
        out = {name: getattr(self, name) if getattr(self, name) is not None else defaults[name] for name in defaults}
        out["batch_size"] = self.batch_size or trainer.__dataclass_fields__[batch_field].default
        if self.task != "rl":
            out["max_length"] = self.max_length or trainer.__dataclass_fields__["max_length"].default
        return out


def parse_memory(text: str) -> float:
    match = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|G|MiB|MB|M)?\s*", text, re.IGNORECASE)
    if not match:
        return -1
    unit = (match.group(2) or "GB").lower()
    return float(match.group(1)) * {"gib": GIB, "gb": 1e9, "g": 1e9, "mib": 2**20, "mb": 1e6, "m": 1e6}[unit]


# ---------------------------------------------------------------------------------------------------------------
# Counting


@dataclass
class Shapes:
    layers: int
    hidden: int
    vocab: int
    kv_width: int                 # key/value heads x head size
    quantizable: int              # weights of the decoder's linear layers (what bitsandbytes quantizes)
    linear_rows: int              # their output rows (LLM.int8 keeps one scale per row)
    other: int                    # embeddings, norms, an untied LM head: kept in the compute dtype
    lora: int                     # parameters of one LoRA adapter on the planned targets


def meta_model(model_config) -> nn.Module:
    """The model built on the meta device: shapes, no storage, no weights read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    from perlhf.backbone import transformer_body

    return next(m for m in transformer_body(model).modules() if isinstance(m, nn.ModuleList))


def count_shapes(model: nn.Module, lora_rank: int, lora_target: str) -> Shapes:
    """Parameter counts of a `meta_model` and of one LoRA adapter on it (injected into `model` in place)."""
    from perlhf.backbone import lora_config

    model_config = model.config
    layers = decoder_layers(model)
    linears = [m for m in layers.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    quantizable = sum(m.weight.numel() for m in linears)
    rows = sum(m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1] for m in linears)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied weights once
    from peft import get_peft_model

    peft = get_peft_model(model, lora_config(model, lora_rank, 2.0 * lora_rank, 0.0, lora_target))
    lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    text = model_config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Shapes(layers=len(layers), hidden=text.hidden_size, vocab=text.vocab_size, kv_width=kv_heads * head_dim,
                  quantizable=quantizable, linear_rows=rows, other=total - quantizable, lora=lora)


def weight_bytes(shapes: Shapes, quantize: str | None, element: int, shards: int = 1, tied: bool = False) -> float:
    """The frozen backbone's weights: quantized linear layers plus everything else in the compute dtype.

    Sharded over `shards` processes (FSDP2, unquantized), each holds 1/shards of them, a tied embedding whole
    (`parallel.shard` leaves it out), plus two decoder layers gathered whole: the one running and the next."""
    if shards > 1:
        layer = shapes.quantizable / shapes.layers
        return (shapes.quantizable / shards + 2 * layer + shapes.other / (1 if tied else shards)) * element
    if quantize == "4bit":
        linear = shapes.quantizable * (0.5 + 1 / 64 + 4 / (64 * 256))  # NF4 + 8-bit block scales + their fp32 scales
    elif quantize == "8bit":
        linear = shapes.quantizable * 1 + shapes.linear_rows * 4
    else:
        linear = shapes.quantizable * element
    return linear + shapes.other * element


@dataclass
class LayerActivations:
    per_token: float              # bytes kept for backward per token per layer, at length 0
    per_token_per_length: float   # and per unit of sequence length (attention mask, T x T attention state)
    shared_per_token_per_length: float  # tensors all layers share (the mask): kept once, not per layer

    def layer(self, tokens: int, length: int) -> float:
        return tokens * (self.per_token + self.per_token_per_length * length)

    def shared(self, tokens: int, length: int) -> float:
        return tokens * self.shared_per_token_per_length * length


def probe_layer(layer_cls: type, model_config, lora_rank: int, lora_target: str, element: int) -> LayerActivations:
    """Run one decoder layer of the model's own class `layer_cls` (random fp32 weights, on the CPU) forward at two
    lengths and add up what autograd keeps for backward, scaled to `element` bytes per activation value."""
    from peft import LoraConfig, inject_adapter_in_model

    text = model_config.get_text_config()
    module = importlib.import_module(layer_cls.__module__)
    config = type(text).from_dict(text.to_dict())
    config._attn_implementation = getattr(text, "_attn_implementation", None) or "sdpa"
    with torch.random.fork_rng(devices=[]):  # random weights without moving the run's seeded generator
        torch.manual_seed(0)
        layer = layer_cls(config, layer_idx=0).float()
    layer.requires_grad_(False)
    targets = _probe_targets(layer, lora_target)
    if targets:
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets), layer)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    rotary = next((getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding")), None)

    def saved_bytes(length: int) -> tuple[float, float]:
        x = torch.randn(1, length, text.hidden_size, requires_grad=True)  # the layer's input: the previous layer's
        mask = torch.zeros(1, 1, length, length)
        shared = {mask.untyped_storage().data_ptr()}  # passed to every layer: kept once for all of them
        kwargs = {"attention_mask": mask}
        if rotary is not None:
            cos, sin = rotary(config)(x, torch.arange(length)[None])
            kwargs.update(position_embeddings=(cos, sin), position_ids=torch.arange(length)[None])
            shared |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
        kept: dict[int, float] = {}  # storage -> bytes: a tensor saved by two operations is kept once

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                scale = element / t.element_size() if t.is_floating_point() else 1
                kept[ptr] = max(kept.get(ptr, 0), t.untyped_storage().nbytes() * scale)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x, **kwargs)
        del out
        layer_bytes = sum(v for k, v in kept.items() if k not in shared)
        return layer_bytes / length, sum(v for k, v in kept.items() if k in shared) / length

    (a1, s1), (a2, s2) = saved_bytes(32), saved_bytes(64)
    slope = max((a2 - a1) / 32, 0.0)
    return LayerActivations(per_token=a1 - 32 * slope, per_token_per_length=slope,
                            shared_per_token_per_length=max((s2 - s1) / 32, s2 / 64))


def _probe_targets(layer: nn.Module, lora_target: str) -> list[str]:
    from perlhf.backbone import attention_target_modules

    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    if lora_target == "all-linear":
        return sorted({n.split(".")[-1] for n in names})
    if lora_target == "attention":
        wanted = set(attention_target_modules(layer))
        return [n for n in names if ".".join(n.split(".")[-2:]) in wanted]
    return [t.strip() for t in lora_target.split(",") if t.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Plans


def activations(shapes: Shapes, probe: LayerActivations, sequences: int, length: int, checkpointing: bool,
                element: int) -> float:
    """What one training forward keeps for its backward, plus backward's working set: with checkpointing, each
    layer's input and one layer recomputed at a time; without, every layer's saved tensors."""
    tokens = sequences * length
    one_layer = probe.layer(tokens, length)
    if checkpointing:
        kept = shapes.layers * tokens * shapes.hidden * element + one_layer
    else:
        kept = shapes.layers * one_layer
    working = 2 * tokens * shapes.hidden * 4  # the hidden-state gradient flowing back, and its fp32 copy
    return kept + probe.shared(tokens, length) + working


def logits_bytes(positions: int, vocab: int, element: int) -> float:
    """Vocabulary logits of the positions that reach the LM head, their fp32 log-softmax and its gradient."""
    return positions * vocab * (element + 4 + 4)


def plan(config: PlanConfig) -> dict:
    """Peak memory per part, in bytes, for perlhf's layout and the classic one."""
    # the probe's random weights, adapter and inputs leave the run's seeded generator where it was: a trainer plans
    # before it initialises its adapter, which must not depend on whether (or how often) the plan ran
    with torch.random.fork_rng(devices=[]):
        return _plan(config)


def _plan(config: PlanConfig) -> dict:
    from transformers import AutoConfig

    from perlhf.models import resolve_dtype, resolve_model_path

    path, _ = resolve_model_path(config.model)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    run = config.resolved()
    dtype = resolve_dtype(config.dtype, torch.device("cpu")) if config.dtype or config.device == "cpu" \
        else torch.bfloat16
    element = torch.tensor([], dtype=dtype).element_size()
    model = meta_model(model_config)
    layer_cls = type(decoder_layers(model)[0])  # the model's own decoder layer class, for the probe
    shapes = count_shapes(model, run["lora_rank"], run["lora_target"])
    probe = probe_layer(layer_cls, model_config, run["lora_rank"], run["lora_target"], element)
    head = shapes.hidden * ADAM_BYTES
    tied = bool(getattr(model_config.get_text_config(), "tie_word_embeddings", False))
    weights = weight_bytes(shapes, config.quantize, element, config.processes if config.fsdp else 1, tied)
    total_params = shapes.quantizable + shapes.other
    ckpt = bool(run["gradient_checkpointing"])
    loading_file_bytes = 0
    if config.quantize and config.device == "cpu":
        # bitsandbytes quantizes as the weights load from the mapped file, whose pages stay resident until the load
        # ends (perlhf.models.own_unquantized_weights then lets the mapping go): a peak of its own, before training
        stored = getattr(model_config.get_text_config(), "dtype", None) or getattr(model_config, "torch_dtype", None)
        stored = getattr(torch, stored) if isinstance(stored, str) else stored
        loading_file_bytes = total_params * torch.tensor([], dtype=stored or dtype).element_size()

    def layouts(ckpt: bool) -> tuple[dict, dict, dict]:
        """perlhf's parts, the classic layout's parts and the details, with checkpointing on or off."""
        if config.task in ("rm", "sft"):
            sequences = run["batch_size"] * (2 if config.task == "rm" else 1)  # a pair is two sequences
            act = activations(shapes, probe, sequences, run["max_length"], ckpt, element)
            logits = logits_bytes(sequences * run["max_length"], shapes.vocab, element) if config.task == "sft" else 0.0
            perlhf = {"weights": weights,
                      "adapter + gradients + AdamW": shapes.lora * ADAM_BYTES + (head if config.task == "rm" else 0),
                      "activations": act, "logits": logits}
            classic = {"weights + gradients + AdamW (full tuning)": total_params * ADAM_BYTES,
                       "activations": act, "logits": logits}
            extra = {}
        else:
            sequences = run["batch_size"] * config.samples_per_prompt
            length = config.max_prompt_length + config.max_new_tokens
            value = config.algorithm in ("reinforce", "ppo")
            kv_cache = 2 * shapes.layers * shapes.kv_width * length * sequences * element
            generation = kv_cache + sequences * shapes.vocab * 4 * 2
            update = activations(shapes, probe, sequences, length, ckpt, element) + \
                logits_bytes(sequences * config.max_new_tokens, shapes.vocab, element)
            if config.algorithm in ("reinforce", "rloo"):
                # the sampling-time forward is the update's (rl.trainer.reuses_sampling_pass, at the default one
                # epoch of one mini-batch, with or without checkpointing): its graph lives through the reference pass
                # (its logits) and, for reinforce, the value baseline's forward over the prompts with its own graph
                update += sequences * (config.max_new_tokens + 1) * shapes.vocab * element
                if config.algorithm == "reinforce":
                    update += activations(shapes, probe, sequences, config.max_prompt_length, ckpt, element)
            perlhf = {"weights": weights,
                      "adapters + gradients + AdamW": shapes.lora * ADAM_BYTES * (2 if value else 1)
                      + (head if value else 0),
                      "reward adapter (frozen)": shapes.lora * 4 + shapes.hidden * 4,
                      "rollout (max of generation's KV cache and the update's activations)": max(generation, update)}
            trained = 2 if value else 1
            classic = {"policy and value: weights + gradients + AdamW": trained * total_params * ADAM_BYTES,
                       "reference and reward weights": 2 * total_params * element,
                       "rollout (max of generation's KV cache and the update's activations)": max(generation, update)}
            extra = {"generation KV cache": kv_cache, "update activations and logits": update}
        if loading_file_bytes:
            perlhf["loading: the weights file, read while quantizing (beyond the run's own peak)"] = max(
                0.0, weights + loading_file_bytes - sum(perlhf.values()))
        if config.fsdp:  # the classic layout sharded too (ZeRO-3 / FSDP, as its tools run it): all but activations
            classic = {part: size / config.processes if "weights" in part else size for part, size in classic.items()}
        return ({**perlhf, "total": sum(perlhf.values())}, {**classic, "total": sum(classic.values())}, extra)

    perlhf, classic, extra = layouts(ckpt)
    other, _, _ = layouts(not ckpt)  # what a trainer deciding on checkpointing compares, from this one probe
    extra[f"perlhf total {'without' if ckpt else 'with'} checkpointing"] = other["total"]
    limit = parse_memory(config.memory) if config.memory else None
    result = {"model": config.model, "task": config.task, "quantize": config.quantize, "dtype": str(dtype)[6:],
              "device": config.device, "processes": config.processes, "fsdp": config.fsdp, "run": run,
              "perlhf": perlhf, "classic": classic, "other_checkpointing": other, "details": extra, "memory": limit,
              "parameters": total_params, "adapter_parameters": shapes.lora}
    if limit:
        result["fits"] = {"perlhf": result["perlhf"]["total"] <= limit, "classic": result["classic"]["total"] <= limit}
    return result


def describe(result: dict) -> str:
    run = result["run"]
    shape = (f"batch {run['batch_size']}, max length {run.get('max_length', '-')}" if result["task"] != "rl"
             else f"batch {run['batch_size']}")
    lines = [f"perlhf plan: {result['task']} on {result['model']} ({result['parameters'] / 1e9:.2f}B parameters, "
             f"{result['dtype']} on {result['device']}{', ' + result['quantize'] if result['quantize'] else ''}); "
             f"{shape}, LoRA r={run['lora_rank']} on {run['lora_target']} ({result['adapter_parameters']:,} "
             f"parameters), gradient checkpointing {'on' if run['gradient_checkpointing'] else 'off'}; per process"
             + (f", the base sharded over {result['processes']} (FSDP2)" if result["fsdp"] else "")]
    for layout, title in (("perlhf", "perlhf (one frozen backbone, adapters for every role)"),
                          ("classic", "classic (separate models, full tuning)")):
        lines.append(f"  {title}:")
        for part, size in result[layout].items():
            if part != "total":
                lines.append(f"    {part:<70} {size / GIB:8.2f} GiB")
        verdict = ""
        if result.get("fits"):
            verdict = "  fits" if result["fits"][layout] else f"  does NOT fit {result['memory'] / GIB:.1f} GiB"
        lines.append(f"    {'total':<70} {result[layout]['total'] / GIB:8.2f} GiB{verdict}")
    for part, size in result["details"].items():
        lines.append(f"  ({part}: {size / GIB:.2f} GiB)")
    return "\n".join(lines)


def expected_peak_line(layout: dict) -> str:
    """The line a trainer prints at start, from a layout of `plan`'s result (its parts and total)."""
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in layout.items() if k != "total" and v)
    return f"perlhf: expected peak memory {layout['total'] / GIB:.2f} GiB per process ({parts} GiB)"


def memory_to_plan_for(device: torch.device) -> float:
    """The share of a device a run may plan to fill: 80% of a GPU, half the free RAM on CPU."""
    return available_memory(device) * (0.8 if device.type == "cuda" else 0.5)


def available_memory(device: torch.device) -> float:
    """Bytes this process can count on: the GPU's total memory, or the machine's available RAM."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[1])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            info = dict(line.split(":", 1) for line in handle)
        return float(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def for_run(config, task: str, device: torch.device, checkpointing: bool, batch_size: int | None = None,
            **shape) -> dict:
    """The plan of a trainer's config (RewardConfig, SFTConfig, RLConfig) on `device`."""
    dtype = config.dtype or ("float32" if device.type == "cpu" else None)
    return plan(PlanConfig(model=config.model, task=task, quantize=config.quantize, batch_size=batch_size,
                           processes=parallel.world_size(), fsdp=config.fsdp and parallel.world_size() > 1,
                           lora_rank=config.lora_rank, lora_target=config.lora_target,
                           gradient_checkpointing=checkpointing, dtype=dtype,
                           device="cuda" if device.type == "cuda" else "cpu",
                           trust_remote_code=config.trust_remote_code, **shape))


def choose_checkpointing(config, task: str, device: torch.device, verbose: bool, **shape) -> bool:
    """--gradient-checkpointing when asked; by default on only when the run (`task` at `shape`, as `for_run` takes
    them) would need more than 80% of the GPU's memory without it, or half the free RAM on CPU. There, such a run also
    returns freed memory to the system (`models.return_freed_memory`): glibc's heap otherwise keeps up to several
    times what the plan counts (benchmarks/results/plan_check_glibc.md). Checkpointing recomputes the forward in
    backward, about a third more compute. Prints the expected peak."""
    chosen = config.gradient_checkpointing
    try:
        result = for_run(config, task, device, False, **shape)
        planned = {False: result["perlhf"], True: result["other_checkpointing"]}
    except Exception as err:  # the plan only advises: a model it cannot probe still trains, as asked
        if verbose:
            print(f"perlhf: no memory plan for {config.model} ({type(err).__name__}: {err}); gradient "
                  f"checkpointing {'on' if chosen else 'off'}")
        return bool(chosen)
    room = memory_to_plan_for(device)
    # decided together: processes that measured their free memory differently must still run one way (sharded,
    # each layer's recompute is a collective)
    tight = parallel.any_process(planned[False]["total"] > room)
    if tight and device.type == "cpu":
        _return_freed_memory(verbose)
    if chosen is None:
        chosen = tight
        if verbose and chosen:
            print(f"perlhf: gradient checkpointing on: without it the run would need "
                  f"{planned[False]['total'] / GIB:.1f} GiB, more than the {room / GIB:.1f} GiB it may plan for "
                  "here (--gradient-checkpointing false to turn it off)")
    if verbose:
        print(expected_peak_line(planned[chosen]))
    return chosen


def _return_freed_memory(verbose: bool) -> None:
    from perlhf.models import return_freed_memory

    return_freed_memory()
    if verbose:
        print("perlhf: memory is tight here: freed memory goes back to the system (glibc's mmap threshold fixed), "
              "which costs time (see perlhf.models.return_freed_memory)")


def _run(args) -> int:
    result = plan(cfg.build(PlanConfig, args))
    print(describe(result))
    return 0 if not result.get("fits") or result["fits"]["perlhf"] else 2


def register_cli(parser) -> None:
    cfg.add_arguments(parser, PlanConfig)
    parser.set_defaults(run=_run)

