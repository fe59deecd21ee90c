"""Data parallelism shared by every trainer: what all processes must agree on, through torch.distributed.

With one process every function here is the identity (or a no-op), so trainers call them unconditionally. The
process group is the one Accelerate starts (`torchrun` or `accelerate launch`; gloo on CPU, NCCL on GPU).
The RL roles share one module, so their gradients cannot go through DDP's per-module hooks; they are averaged
here in flat buckets instead (one collective per ~25 MiB, as DDP does, not one per tensor).
"""

from __future__ import annotations

import hashlib
import sys

import torch
import torch.distributed as dist

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
