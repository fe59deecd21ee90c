"""Rollouts: sample responses from the policy role, then compute log-probs, values and rewards on them.

Prompts are left-padded so every response starts at the same column P; responses are right-padded after EOS.
`response_mask` is 1 on each real response token up to and including the first EOS, 0 after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from perlhf.backbone import Backbone, transformer_body
from perlhf.rl.objectives import entropy_from_logprobs


@dataclass
class Rollout:
    prompt_ids: torch.Tensor      # [B, P] left-padded
    prompt_mask: torch.Tensor     # [B, P]
    response_ids: torch.Tensor    # [B, T] right-padded
    response_mask: torch.Tensor   # [B, T] float
    ended: torch.Tensor           # [B] bool: the response produced EOS

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.response_ids[index],
                       self.response_mask[index], self.ended[index])


def pad_left(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer, prompts: list, max_prompt_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each rendered prompt, cut from the left to max_prompt_length; returns (ids, how many were cut)."""
    from perlhf.data import render_prompt

    encoded, cut = [], 0
    for prompt in prompts:
        ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            ids, cut = ids[-max_prompt_length:], cut + 1
        encoded.append(ids)
    return encoded, cut


def response_mask_after_eos(response_ids: torch.Tensor, eos_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended): mask keeps tokens up to and including the first EOS; ended says whether an EOS came."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    ended = is_eos.any(dim=1)
    first_eos = torch.where(ended, is_eos.float().argmax(dim=1), torch.full_like(ended, response_ids.size(1), dtype=torch.long))
    positions = torch.arange(response_ids.size(1), device=response_ids.device)[None, :]
    mask = (positions <= first_eos[:, None]).float()
    # generate() pads finished rows with pad_id; a pad that is not EOS only appears after the end
    return mask, ended


def eos_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, do_sample: bool = True) -> Rollout:
    """Sample one response per prompt with the KV cache (call inside the role that should generate)."""
    device = next(model.parameters()).device
    ids, mask = pad_left(prompt_ids, tokenizer.pad_token_id, device)
    eos = eos_token_ids(tokenizer, model)
    generation = GenerationConfig(do_sample=do_sample, temperature=temperature if do_sample else None,
                                  top_p=top_p if do_sample else None, top_k=0 if do_sample else None,
                                  max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                  use_cache=True)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
    model.train(was_training)
    response = out[:, ids.size(1):]
    if response.size(1) == 0:  # every prompt ended at once is impossible, but keep shapes valid
        response = torch.full((ids.size(0), 1), eos[0], device=device)
    response_mask, ended = response_mask_after_eos(response, eos, tokenizer.pad_token_id)
    response = torch.where(response_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    return Rollout(ids, mask, response, response_mask, ended)


def _hidden(model, rollout: Rollout) -> torch.Tensor:
    mask = rollout.attention_mask
    # Positions count real tokens only, as generate() did, so left padding does not shift the positions.
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    body = transformer_body(model)
    return body(input_ids=rollout.input_ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


def response_logprobs(model, rollout: Rollout, with_entropy: bool = False):
    """log pi(y_t | x, y_<t) for each response token [B, T]; the LM head runs on response positions only."""
    from peft import PeftModel

    hidden = _hidden(model, rollout)
    start = rollout.prompt_ids.size(1)
    states = hidden[:, start - 1:-1]  # the state before each response token
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    all_logp = torch.log_softmax(base.get_output_embeddings()(states).float(), dim=-1)  # once: [B, T, vocab]
    logp = all_logp.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1) * rollout.response_mask
    if with_entropy:
        with torch.no_grad():  # a metric: no graph through the whole vocabulary
            return logp, entropy_from_logprobs(all_logp)
    return logp


def response_values(model, head: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """V(state before each response token) [B, T]; column 0 is the value of the prompt alone."""
    hidden = _hidden(model, rollout)
    start = rollout.prompt_ids.size(1)
    return head(hidden[:, start - 1:-1].to(head.weight.dtype)).squeeze(-1).float()


def prompt_values(model, head: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """V(prompt) [B]: the value head on the last prompt token, running the prompt alone (left-padded)."""
    mask = rollout.prompt_mask
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = transformer_body(model)(input_ids=rollout.prompt_ids, attention_mask=mask, position_ids=positions,
                                     use_cache=False).last_hidden_state
    return head(hidden[:, -1].to(head.weight.dtype)).squeeze(-1).float()


def prompt_and_response_lists(rollout: Rollout) -> tuple[list[list[int]], list[list[int]]]:
    """Unpadded token ids of each prompt and response (response up to and including EOS)."""
    prompts = [row[m.bool()].tolist() for row, m in zip(rollout.prompt_ids, rollout.prompt_mask)]
    responses = [row[m.bool()].tolist() for row, m in zip(rollout.response_ids, rollout.response_mask)]
    return prompts, responses


@torch.no_grad()
def score_responses(backbone: Backbone, adapter: str, rollout: Rollout, tokenizer) -> torch.Tensor:
    """Scores from the head of `adapter` on prompt + response + EOS, right-padded, as the reward model was trained.

    A reward model is trained on responses that always end in EOS, so a response cut off by max_new_tokens is
    closed with EOS too: otherwise the head would read an unfinished position it never saw in training.
    """
    from perlhf.reward import pad_right

    prompts, responses = prompt_and_response_lists(rollout)
    closed = [r if ended else r + [tokenizer.eos_token_id] for r, ended in zip(responses, rollout.ended.tolist())]
    ids, mask = pad_right([p + r for p, r in zip(prompts, closed)], tokenizer.pad_token_id, rollout.prompt_ids.device)
    with backbone.role(adapter):
        return backbone.scores(adapter, ids, mask)
