"""Rollouts: sample responses from the policy role, then compute log-probs, values and rewards on them.

Prompts are left-padded so every response starts at the same column P; responses are right-padded after EOS.
`response_mask` is 1 on each real response token up to and including the first EOS, 0 after it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPast

from perlhf import parallel
from perlhf.backbone import causal_lm, keeps_logits, last_hidden, transformer_body
from perlhf.prefix_sharing import PackedRollout
from perlhf.rl.objectives import log_normaliser, token_logprobs


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
    """Token ids of each prompt, encoded as reward training encodes it (`perlhf.data.prompt_token_ids`) and cut
    from the left to max_prompt_length (a leading BOS is kept); returns (ids, how many were cut)."""
    from perlhf.data import cut_prompt_left, prompt_token_ids

    encoded, cut = [], 0
    for prompt in prompts:
        ids = prompt_token_ids(tokenizer, prompt)
        if len(ids) > max_prompt_length:
            ids, cut = cut_prompt_left(ids, max_prompt_length, tokenizer.bos_token_id), cut + 1
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


class SeededSampler(LogitsProcessor):
    """Samples each row from softmax(logits / T) with its own random stream, inside greedy decoding.

    Inverse CDF: one uniform u per row, from a generator seeded by that sequence alone, picks the first token
    whose cumulative probability exceeds u; the processor then leaves that token the only finite score, so greedy
    decoding emits it. One number per row per step, where a Gumbel draw needs one per vocabulary entry (that cost
    ~10% of CPU decoding). The cumulative sum runs in float64, so each token's share of [0, 1) is its probability
    to ~1e-16. Because a row's draw does not depend on which other sequences share its batch or process, a
    2-process run samples what a 1-process run does. The temperature is applied here and in `token_logprobs` the
    same way, so the log-probs describe the sampler exactly. torch.multinomial cannot take a generator per row, so
    the draw is written out here.

    A nucleus (top_p < 1) is for sampling that needs no log-probs (labelling data): the most probable tokens
    until their mass reaches top_p, as transformers' TopPLogitsWarper keeps them. That warper sorts the whole
    vocabulary every step (a third of a second for 96 rows of 49152 here); the nucleus is found among the
    `NUCLEUS_CANDIDATES` most probable tokens instead, and a row whose nucleus reaches beyond them is sorted whole.
    """

    NUCLEUS_CANDIDATES = 1024

    def __init__(self, temperature: float, seeds: list[int], device, top_p: float = 1.0):
        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        # float32 uniforms are below 1 - 2^-24, so u * total stays below the total and the pick has probability > 0
        uniform = torch.cat([torch.rand(1, generator=g, device=scores.device) for g in self.generators]).double()
        if self.top_p < 1.0:
            picked = self._nucleus_pick(probs, uniform)
        else:
            picked = _inverse_cdf(probs.double().cumsum(dim=-1), uniform).clamp(max=scores.size(-1) - 1)
        only = torch.full_like(scores, -float("inf"))
        return only.scatter_(1, picked, 0.0)

    def _nucleus_pick(self, probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        top, index = probs.topk(min(self.NUCLEUS_CANDIDATES, probs.size(-1)), dim=-1)
        picked = self._pick_in_order(top, index, uniform)
        wide = top.sum(dim=-1) < self.top_p  # the nucleus reaches beyond the candidates: these rows sorted whole
        if wide.any():
            picked[wide] = self._pick_in_order(*probs[wide].sort(dim=-1, descending=True), uniform[wide])
        return picked

    def _pick_in_order(self, probs: torch.Tensor, tokens: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        # probs in descending order: a token is in the nucleus while the mass before it is below top_p
        kept = torch.where(probs.cumsum(dim=-1) - probs < self.top_p, probs, 0.0).double()
        return tokens.gather(1, _inverse_cdf(kept.cumsum(dim=-1), uniform).clamp(max=probs.size(-1) - 1))


def _inverse_cdf(cumulative: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The first column whose cumulative weight exceeds u times the row's total [B, 1]."""
    return torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)


def sequence_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, iteration, prompt index, sample index)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & (2**64 - 1)
    return value & (2**63 - 1)


# generation_config.json fields that only name tokens or bookkeeping: they do not change the distribution
_NEUTRAL_GENERATION_FIELDS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                              "transformers_version", "_from_model_config", "max_length", "max_new_tokens", "use_cache",
                              "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                              "return_dict_in_generate"}


def ignored_generation_settings(model) -> dict:
    """Settings in the model's own generation_config.json that perlhf's sampler does not apply (a repetition
    penalty, top-k/top-p, min-p, suppressed tokens...): the log-probs could not describe them."""
    shipped = causal_lm(model).generation_config.to_diff_dict()
    return {k: v for k, v in shipped.items() if k not in _NEUTRAL_GENERATION_FIELDS}


@contextmanager
def _only_perlhf_generation_settings(model):
    # generate() fills every field left unset from the model's generation_config.json; with a bare config in
    # its place, the only processing of the logits is what perlhf passes.
    hf = causal_lm(model)
    shipped = hf.generation_config
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = shipped


# Rows at or below which a CPU float32 linear runs as `weight @ x.T` during decoding (below).
WEIGHT_LEFT_MAX_ROWS = 256


def _weight_left_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.size(-1)
    if rows > WEIGHT_LEFT_MAX_ROWS:
        return torch.nn.functional.linear(x, module.weight, module.bias)
    out = torch.mm(module.weight, x.reshape(rows, x.size(-1)).t()).t()
    out = out.contiguous() if module.bias is None else out + module.bias
    return out.view(*x.shape[:-1], out.size(-1))


@contextmanager
def _weight_left_decoding(model):
    # A decoding step multiplies a few rows by every weight matrix, so it streams the weights from memory. On the
    # CPU measured here (AMD EPYC) MKL does that ~1.4-2x faster for `weight @ x.T` than for `x @ weight.T`, which
    # F.linear asks for: 30 layers of SmolLM2-sized weights and its LM head took 99 vs 183 ms a step at 16 rows,
    # 383 vs 494 ms at 96, the same at 384 (a one-off probe, 2026-12-02). Only
    # plain nn.Linear layers (not bitsandbytes' subclasses) in float32 on the CPU are switched, and only for the
    # length of one generate() call; a prefill of many rows keeps F.linear, which is as fast there.
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
               and m.weight.dtype == torch.float32]
    for module in linears:
        module.forward = partial(_weight_left_linear, module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


# transformers 5 renamed `past_key_values` to `cache`, in model outputs and generate()'s arguments (the old name warns)
_CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def shared_prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    """The KV cache of every prompt but its last token, each distinct prompt computed once and its cache copied
    to every sequence that samples from it (pair sampling draws 4 responses a prompt, RLOO k), or None when no
    prompt repeats. generate() then runs only the last prompt token and the new ones; the numbers are those of a
    prefill over every row, because each row's cache depends on its own tokens alone."""
    distinct, rows = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)
    width = ids.size(1)
    if distinct.size(0) == ids.size(0) or width < 2 or int(mask[:, :-1].sum(dim=1).min()) == 0:
        return None  # nothing repeats, or a prompt of one token has nothing to cache
    ids, mask = distinct[:, :width - 1], distinct[:, width:2 * width - 1]
    out = transformer_body(model)(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
    cache = getattr(out, _CACHE_NAME)
    cache.batch_select_indices(rows.to(ids.device))
    return cache


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             seeds: list[int] | None = None, top_p: float = 1.0) -> Rollout:
    """One response per prompt with the KV cache (call inside the role that should generate).

    temperature > 0 samples from softmax(logits / temperature), row i from `seeds[i]` (default: seeds drawn
    from torch's global generator); temperature 0 is greedy. Nothing from the model's generation_config.json
    applies except its EOS ids.
    """
    device = next(model.parameters()).device
    ids, mask = pad_left(prompt_ids, tokenizer.pad_token_id, device)
    eos = eos_token_ids(tokenizer, model)
    processors = LogitsProcessorList()
    if temperature > 0:
        seeds = seeds if seeds is not None else torch.randint(0, 2**62, (len(prompt_ids),)).tolist()
        processors.append(SeededSampler(temperature, seeds, device, top_p))
    generation = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
    was_training = model.training
    model.eval()
    sharded = parallel.is_sharded(model)
    with _only_perlhf_generation_settings(model), _weight_left_decoding(model):
        # sharded, every forward is a collective, so every process runs the same ones: no shared prefill, and a
        # process whose prompts all ended keeps stepping with the others (synced_gpus)
        cache = None if sharded else shared_prefill(model, ids, mask)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation,
                             logits_processor=processors, synced_gpus=sharded,
                             **({_CACHE_NAME: cache} if cache is not None else {}))
    model.train(was_training)
    response = out[:, ids.size(1):]
    if response.size(1) == 0:  # every prompt ended at once is impossible, but keep shapes valid
        response = torch.full((ids.size(0), 1), eos[0], device=device)
    response_mask, ended = response_mask_after_eos(response, eos, tokenizer.pad_token_id)
    response = torch.where(response_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    return Rollout(ids, mask, response, response_mask, ended)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Positions count real tokens only, as generate() did, so left padding does not shift the positions.
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def _hidden(model, rollout: Rollout) -> torch.Tensor:
    mask = rollout.attention_mask
    return last_hidden(model, rollout.input_ids, mask, _positions(mask))


def response_logits(model, rollout: Rollout) -> torch.Tensor:
    """The model's own next-token logits before each response token [B, T, V].

    Through the model's forward, so each architecture's own logit transforms apply (Gemma-2 soft-capping, Cohere's
    logit scale, Granite's logit scaling); `logits_to_keep` makes it project only the response positions.
    """
    mask, width = rollout.attention_mask, rollout.response_ids.size(1)
    kwargs = {"logits_to_keep": width + 1} if keeps_logits(model) else {}
    logits = model(input_ids=rollout.input_ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False,
                   **kwargs).logits
    return logits[:, -width - 1:-1]


def response_logprobs(model, rollout: Rollout, temperature: float = 1.0, with_entropy: bool = False,
                      packed: PackedRollout | None = None):
    """log pi_T(y_t | x, y_<t) for each response token [B, T] (0 on padding), pi_T = softmax(logits / T): the
    distribution `generate` sampled from at that temperature. With entropy: also the entropy of pi_T [B, T].
    `packed`: the rollout with each shared prompt computed once (perlhf.prefix_sharing), the same numbers."""
    if packed is None:
        out = token_logprobs(response_logits(model, rollout), rollout.response_ids, temperature, with_entropy)
    else:
        out = _packed_logprobs(model, rollout, packed, temperature, with_entropy)
    if with_entropy:
        return out[0] * rollout.response_mask, out[1]
    return out * rollout.response_mask


def _packed_logprobs(model, rollout: Rollout, packed: PackedRollout, temperature: float, with_entropy: bool):
    """token_logprobs over packed rows: the normaliser (and entropy) once per position, then gathered, because the
    prompt's last position predicts the first token of every response of its group."""
    first = rollout.prompt_ids.size(1) - 1
    kwargs = {"logits_to_keep": packed.input_ids.size(1) - first} if keeps_logits(model) else {}
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                   position_ids=packed.position_ids, use_cache=False, **kwargs).logits
    column = packed.before - (packed.input_ids.size(1) - logits.size(1))
    normaliser, entropy = log_normaliser(logits, temperature, with_entropy)
    picked = logits[packed.row[:, None], column, rollout.response_ids].float()
    logp = (picked if temperature == 1.0 else picked / temperature) - normaliser[packed.row[:, None], column]
    if not with_entropy:
        return logp
    return logp, entropy[packed.row[:, None], column]


@torch.no_grad()
def check_logprobs_match_sampler(model, tokenizer, prompt_ids: list[int], new_tokens: int = 4) -> float:
    """Refuse a model family whose full-sequence forward does not reproduce the logits generate() samples from.

    A few greedy tokens are generated with generate()'s own logits kept, then recomputed by `response_logits`;
    returns the largest log-prob difference. Beyond float noise, RL would train on log-probs of another
    distribution than the one that sampled, so it raises instead (at the start of a run, not after it).
    """
    device = next(model.parameters()).device
    ids, mask = pad_left([prompt_ids], tokenizer.pad_token_id, device)
    generation = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
                                  output_logits=True, return_dict_in_generate=True, use_cache=True)
    with _only_perlhf_generation_settings(model), _weight_left_decoding(model):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
    response = out.sequences[:, ids.size(1):]
    rollout = Rollout(ids, mask, response, torch.ones_like(response, dtype=torch.float), torch.zeros(1, dtype=torch.bool))
    sampled = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    recomputed = torch.log_softmax(response_logits(model, rollout).float(), dim=-1)
    error = (sampled - recomputed).abs().max().item()
    allowed = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.25
    if not error <= allowed:
        raise ValueError(f"{type(causal_lm(model)).__name__}: the log-probs perlhf computes over a whole sequence differ "
                         f"from the logits generate() samples from by up to {error:.3g} nats (allowed {allowed}); RL "
                         "would train on another distribution than the one that sampled, so this model family is not "
                         "supported by perlhf RL")
    return error


def response_values(model, head: torch.nn.Module, rollout: Rollout, packed: PackedRollout | None = None) -> torch.Tensor:
    """V(state before each response token) [B, T]; column 0 is the value of the prompt alone."""
    if packed is None:
        hidden = _hidden(model, rollout)
        start = rollout.prompt_ids.size(1)
        states = hidden[:, start - 1:-1]
    else:
        hidden = last_hidden(model, packed.input_ids, packed.attention_mask, packed.position_ids)
        states = hidden[packed.row[:, None], packed.before]
    return head(states.to(head.weight.dtype)).squeeze(-1).float()


def prompt_values(model, head: torch.nn.Module, rollout: Rollout, share_prefix: bool = False) -> torch.Tensor:
    """V(prompt) [B]: the value head on the last prompt token, running the prompt alone (left-padded); with
    `share_prefix`, each distinct prompt once."""
    ids, mask, rows = rollout.prompt_ids, rollout.prompt_mask, None
    if share_prefix:
        ids, rows = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)
        ids, mask = ids[:, :mask.size(1)], ids[:, mask.size(1):]
    hidden = last_hidden(model, ids, mask, _positions(mask))
    values = head(hidden[:, -1].to(head.weight.dtype)).squeeze(-1).float()
    return values if rows is None else values[rows]


def response_texts(tokenizer, rollout: Rollout) -> list[str]:
    """Each response as text, without the token that ended it (whichever EOS id that was), as a reward model
    or a judge reads it."""
    texts = []
    for row, mask, ended in zip(rollout.response_ids, rollout.response_mask, rollout.ended.tolist()):
        ids = row[mask.bool()].tolist()
        texts.append(tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True))
    return texts


def prompt_and_response_lists(rollout: Rollout) -> tuple[list[list[int]], list[list[int]]]:
    """Unpadded token ids of each prompt and response (response up to and including EOS)."""
    prompts = [row[m.bool()].tolist() for row, m in zip(rollout.prompt_ids, rollout.prompt_mask)]
    responses = [row[m.bool()].tolist() for row, m in zip(rollout.response_ids, rollout.response_mask)]
    return prompts, responses
