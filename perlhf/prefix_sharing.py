"""Prefix sharing: sequences that start with the same tokens go through the model once for that start.

A preference pair is two sequences, prompt + chosen and prompt + rejected. Packed into one row as

    [ shared prefix | rest of chosen | rest of rejected ]

with position ids 0..S-1, S..S+C-1, S..S+R-1 and an attention mask that lets each branch see the prefix and
itself (causally) but not the other branch, every token's hidden state is the one it has in its own sequence:
causal attention means a token depends only on the tokens before it, and those are the same tokens at the same
positions. So scores, losses and gradients equal the plain computation to float rounding, while the prefix's
tokens are computed once instead of twice. RL groups (one prompt, k samples) pack the same way with k branches.

The mask is a custom 4D mask, which transformers passes to the attention as it is. That is exact for models whose
attention is plain causal attention over positions given by `position_ids` (Llama, Qwen2, Mistral, GPT-2, ...)
in the eager and SDPA implementations. Where it is not (sliding-window layers shorter than the sequence, ALiBi,
flash or flex attention, custom code), `sharing_failure` says why and the caller falls back to the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common start of a and b, leaving each at least its last token (scores are read there)."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


@dataclass
class PackedRow:
    """One row: the prefix shared by its branches, then each branch's own tokens."""
    tokens: list[int]
    positions: list[int]
    branch: list[int]  # 0 = the shared prefix, 1..k = branch k
    ends: list[int]  # index in the row of each branch's last token


def pack(sequences: list[list[int]]) -> PackedRow:
    """The sequences (which must share their start to gain anything) as one packed row."""
    shared = min(common_prefix(sequences[0], s) for s in sequences[1:]) if len(sequences) > 1 else len(sequences[0]) - 1
    tokens, positions, branch, ends = list(sequences[0][:shared]), list(range(shared)), [0] * shared, []
    for k, sequence in enumerate(sequences, start=1):
        rest = sequence[shared:]
        tokens += rest
        positions += range(shared, shared + len(rest))
        branch += [k] * len(rest)
        ends.append(len(tokens) - 1)
    return PackedRow(tokens, positions, branch, ends)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, T], right-padded
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, 1, T, T]: bool (True = attend) for SDPA, additive float for eager
    ends: torch.Tensor  # [B, k]: the row index of each branch's last token
    tokens: int  # real tokens in the rows (what is computed)


def pad_packed(rows: list[PackedRow], pad_id: int, device, attention: str, dtype: torch.dtype) -> PackedBatch:
    """Right-pad packed rows and build their block-causal mask."""
    width = max(len(r.tokens) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    branch = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        ids[i, :n] = torch.tensor(row.tokens)
        positions[i, :n] = torch.tensor(row.positions)
        branch[i, :n] = torch.tensor(row.branch)
    mask = block_causal_mask(branch, attention, dtype)
    branches = max(len(r.ends) for r in rows)  # rows with fewer branches repeat their last (the caller drops it)
    ends = torch.tensor([r.ends + r.ends[-1:] * (branches - len(r.ends)) for r in rows], dtype=torch.long)
    return PackedBatch(ids.to(device), positions.to(device), mask.to(device), ends.to(device),
                       sum(len(r.tokens) for r in rows))


def block_causal_mask(branch: torch.Tensor, attention: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, W, W] from each position's branch [B, W] (0 the shared prefix, 1..k a branch, -1 padding): causal,
    each branch sees the prefix and itself. A padding token attends to itself only, so its (unused) hidden state
    stays finite: a masked key still multiplies its value by zero, and 0 * NaN is NaN. Bool (True = attend) for
    SDPA, additive float for eager attention."""
    width = branch.size(1)
    query, key = branch[:, :, None], branch[:, None, :]
    visible = torch.ones(width, width, dtype=torch.bool).tril() & (query >= 0) & ((key == query) | (key == 0))
    mask = (visible | torch.eye(width, dtype=torch.bool))[:, None]
    if attention == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def sharing_failure(model: torch.nn.Module, max_length: int) -> str | None:
    """Why prefix sharing would not be exact on this model, or None where it is (then the equality check at
    first use confirms it on real inputs)."""
    config = _text_config(model)
    attention = attention_of(model)
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} takes no custom mask"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_length:
        # the plain path would window sequences longer than this; a custom mask is used as given, unwindowed
        return f"sliding-window attention ({window} tokens) is shorter than --max-length {max_length}"
    if getattr(config, "alibi", False) or config.model_type in ("bloom", "mpt"):
        return "ALiBi positions come from the 2D mask, not position_ids"
    return None


def attention_of(model: torch.nn.Module) -> str:
    return getattr(_text_config(model), "_attn_implementation", None) or "eager"


def _text_config(model: torch.nn.Module):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def agrees(shared: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether shared-prefix scores equal the plain ones to the rounding of `dtype`."""
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    return bool(torch.allclose(shared.float(), plain.float(), rtol=tolerance, atol=tolerance))


@dataclass
class PackedRollout:
    """Rollout rows that share a prompt, packed one group to a row: [prompt | response 1 | ... | response k], each
    response in a slot as wide as the rollout's responses."""
    input_ids: torch.Tensor  # [G, P + k T]
    position_ids: torch.Tensor
    attention_mask: torch.Tensor  # [G, 1, W, W]
    row: torch.Tensor  # [B]: the packed row holding rollout row b
    before: torch.Tensor  # [B, T]: the column of the token before each response token (the prompt's last for the first)
    tokens: int  # real tokens computed, against `plain_tokens` without sharing
    plain_tokens: int


def pack_rollout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                 response_mask: torch.Tensor, attention: str, dtype: torch.dtype) -> PackedRollout | None:
    """Pack rows with the same (left-padded) prompt; None when no prompt repeats, so nothing would be saved."""
    groups: dict[tuple, list[int]] = {}
    for b in range(prompt_ids.size(0)):
        groups.setdefault(tuple(prompt_ids[b][prompt_mask[b].bool()].tolist()), []).append(b)
    if len(groups) == prompt_ids.size(0):
        return None
    batch, prompt_width = prompt_ids.shape
    width = response_ids.size(1)
    slots = max(len(members) for members in groups.values())
    columns = prompt_width + slots * width
    ids = torch.zeros((len(groups), columns), dtype=torch.long)
    positions = torch.zeros((len(groups), columns), dtype=torch.long)
    branch = torch.full((len(groups), columns), -1, dtype=torch.long)
    row = torch.zeros(batch, dtype=torch.long)
    before = torch.zeros((batch, width), dtype=torch.long)
    prompt_ids, prompt_mask = prompt_ids.cpu(), prompt_mask.cpu()
    response_ids, response_real = response_ids.cpu(), response_mask.cpu() > 0
    offsets = torch.arange(width)
    for g, members in enumerate(groups.values()):
        first = members[0]
        real = prompt_mask[first].bool()
        ids[g, :prompt_width] = prompt_ids[first]
        positions[g, :prompt_width] = (prompt_mask[first].cumsum(0) - 1).clamp(min=0)  # as rollout._positions
        branch[g, :prompt_width][real] = 0
        length = int(real.sum())
        for k, b in enumerate(members):
            start = prompt_width + k * width
            ids[g, start:start + width] = response_ids[b]
            positions[g, start:start + width] = length + offsets
            branch[g, start:start + width][response_real[b]] = k + 1
            row[b] = g
            before[b] = torch.cat([torch.tensor([prompt_width - 1]), start + offsets[:-1]])
    mask = block_causal_mask(branch, attention, dtype)
    device = response_mask.device
    plain = int(prompt_mask.sum()) + int(response_real.sum())
    return PackedRollout(ids.to(device), positions.to(device), mask.to(device), row.to(device), before.to(device),
                         int((branch >= 0).sum()), plain)
