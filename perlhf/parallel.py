"""Data parallelism shared by every trainer: what all processes must agree on, through torch.distributed.

With one process every function here is the identity (or a no-op), so trainers call them unconditionally. The
process group is the one Accelerate starts (`torchrun` or `accelerate launch`; gloo on CPU, NCCL on GPU).
The RL roles share one module, so their gradients cannot go through DDP's per-module hooks; they are averaged
here in flat buckets instead (one collective per ~25 MiB, as DDP does, not one per tensor).

With `--fsdp` the frozen base weights are sharded over the processes with FSDP2 (`fully_shard`), one unit per
decoder layer (plus the embedding and the LM head where they are not tied): each process keeps 1/N of them and
gathers a unit's weights just before it runs. Adapters and heads are left out of the shards. They are a few
percent of the weights, and kept whole they keep their own dtype (fp32 beside a bf16 base), plain tensors in the
optimizer, and checkpoints identical to a 1-process run's. Their gradients are averaged as above.
"""

from __future__ import annotations

import hashlib
import math
import sys

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (a new tensor on the input's device; the input is left as it was)."""
    if world_size() == 1:
        return values.detach().clone()
    device = values.device
    if dist.get_backend() == "nccl" and device.type != "cuda":  # NCCL reduces GPU tensors only
        values = values.to(torch.device("cuda", torch.cuda.current_device()))
    values = values.detach().clone()
    dist.all_reduce(values)
    return values.to(device)


def global_mean(values: torch.Tensor) -> float:
    """Mean over every element on every process (processes may hold different counts)."""
    totals = all_sum(torch.stack([values.detach().float().sum(), torch.tensor(float(values.numel()), device=values.device)]))
    return (totals[0] / totals[1].clamp(min=1)).item()


def any_process(flag: bool) -> bool:
    """True on every process when it is true on any: stop requests are decided together, so no rank waits alone."""
    return bool(all_sum(torch.tensor([float(flag)])).item() > 0)


def _in_flat_buckets(tensors: list[torch.Tensor], collective) -> None:
    """Run `collective` in place on ~BUCKET_BYTES flat copies of `tensors`, then copy the results back."""
    def flush(bucket: list[torch.Tensor]) -> None:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        collective(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    bucket, size = [], 0
    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= BUCKET_BYTES:
            flush(bucket)
            bucket, size = [], 0
    if bucket:
        flush(bucket)


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over processes, in flat buckets. A parameter without a gradient on this
    process counts as zero, so every process joins the same collectives in the same order."""
    world = world_size()
    if world == 1:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat)
        flat /= world

    _in_flat_buckets([p.grad for p in parameters], mean)


def broadcast_parameters(parameters: list[torch.nn.Parameter], source: int = 0) -> None:
    """Give every process the weights of `source` (the trainable adapters and heads), in flat buckets."""
    if world_size() == 1:
        return
    with torch.no_grad():
        _in_flat_buckets([p.data for p in parameters], lambda flat: dist.broadcast(flat, source))


def sharding(config, accelerator) -> bool:
    """Whether this run shards its base: `--fsdp` and more than one process."""
    from accelerate.utils import DistributedType

    from perlhf.config import ConfigError

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("fsdp: perlhf shards the frozen base itself (docs/parallel.md): launch with accelerate's "
                          "plain multi-process config (or torchrun) and pass --fsdp, not an accelerate FSDP config")
    wanted = config.fsdp
    if wanted and accelerator.num_processes == 1 and accelerator.is_main_process:
        print("perlhf: --fsdp with one process: nothing to shard over; the base stays whole")
    elif wanted and accelerator.is_main_process:
        print(f"perlhf: FSDP2: the frozen base sharded over {accelerator.num_processes} processes "
              f"(1/{accelerator.num_processes} of its weights each); adapters and heads whole on each")
    return wanted and accelerator.num_processes > 1


def shard(model: nn.Module) -> None:
    """Shard the frozen base weights of the transformers model inside `model` over the processes (FSDP2).
    Adapters and heads stay whole on every process (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard

    from perlhf.backbone import causal_lm, transformer_body
    from perlhf.plan import decoder_layers

    lm = causal_lm(next(m for m in model.modules() if hasattr(m, "base_model_prefix")))
    # every adapter stays whole, the frozen ones too (a reference copy, the reward adapter): they are fp32 beside a
    # bf16 base, and FSDP2 gathers one dtype per unit
    adapters = {p for name, p in model.named_parameters() if p.requires_grad or "lora_" in name}
    body, head = transformer_body(lm), lm.get_output_embeddings()
    tied = head is not None and head.weight is lm.get_input_embeddings().weight
    # A tied embedding and LM head stay whole: the LM head runs outside the body's unit (the reward and value
    # roles skip it), so the pair cannot be one unit. The body is the root unit, the one every role runs through.
    # Every unit reshards after each forward, the root too: left automatic, FSDP2 keeps the root whole until
    # backward, and 2-process reward-model training then fell out of step (mismatched all-gathers).
    whole = adapters | ({head.weight} if tied else set())
    units = [*decoder_layers(lm), body] + ([head] if head is not None and not tied else [])
    for unit in units:
        fully_shard(unit, reshard_after_forward=True, ignored_params={p for p in unit.parameters() if p in whole})
    base = [p for p in {id(p): p for p in lm.parameters()}.values() if p not in adapters]
    held = sum(_local(p).numel() * p.element_size() for p in base)
    total = sum(p.numel() * p.element_size() for p in base)
    # one write of one line per process (see check_identical): the log shows what each process holds
    sys.stdout.write(f"perlhf: process {rank()} of {world_size()}: holds {held / 2**20:.2f} MiB of the frozen base's "
                     f"{total / 2**20:.2f} MiB ({100 * held / max(total, 1):.1f}%) in {len(units)} FSDP2 units\n")
    sys.stdout.flush()


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def lockstep_batches(indices: list[int], batch_size: int, total: int, lockstep: bool) -> list[tuple[list[int], bool]]:
    """This process's batches of `indices` (its share of `total` examples), each with whether to keep its output.

    Sharded, every forward is a collective (each layer gathers its weights from all processes), so every process
    must run as many batches as the largest share: a shorter share gets extra batches (of example 0) to discard."""
    batches = [(indices[i:i + batch_size], True) for i in range(0, len(indices), batch_size)]
    if lockstep:
        most = math.ceil(math.ceil(total / world_size()) / batch_size)  # batches of the largest share
        batches += [([0], False)] * (most - len(batches))
    return batches


def finish() -> None:
    """End data parallelism together: wait until every process is done (process 0 writes the final files), then
    close the process group, so that no process exits while another still talks to it (gloo aborts then)."""
    if world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def fingerprint(parameters: list[torch.nn.Parameter]) -> str:
    """sha256 of the parameters' bytes: equal fingerprints mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for p in parameters:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_identical(parameters: list[torch.nn.Parameter], what: str) -> str:
    """Fingerprint the trained weights on every process and raise if any process holds different ones.

    Each process prints its own line, so a log shows that every rank ran and what it holds."""
    mine = fingerprint(parameters)
    world = world_size()
    if world == 1:
        return mine
    # one write of one short line: the processes share stdout, and a pipe keeps such a write whole
    sys.stdout.write(f"perlhf: process {rank()} of {world}: {what} sha256 {mine}\n")
    sys.stdout.flush()
    everyone: list[str | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) != 1:
        raise RuntimeError(f"the processes hold different {what} after training ({', '.join(map(str, everyone))}); "
                           "this is a bug in perlhf's data parallelism, please report it")
    return mine
