"""Conformance: for tiny random models of several families, RL's numbers describe the policy that sampled.

Families (tests/conftest.py ARCHITECTURES): Llama, Qwen2, GPT-2 with its default dropout of 0.1, Gemma-2 with
logit soft-capping, Cohere with a logit scale. For each: perlhf's response log-probs equal the model's own
forward at the sampling temperature; sampling frequencies match those log-probs; the KL is exactly 0 at the
first iteration, when the policy equals the reference; RL reward scores equal `perlhf rm score`. The
1-process vs 2-process agreement is in tests/test_multiprocess.py.
"""

import pytest
import torch

from conftest import ARCHITECTURES, make_model, tiny_rl_setup
from perlhf.metrics import read_metrics
from perlhf.reward import load_reward_model
from perlhf.rl.objectives import token_logprobs
from perlhf.rl.rollout import (check_logprobs_match_sampler, encode_prompts, generate, response_logits,
                               response_logprobs, response_texts)
from perlhf.rl.trainer import RLConfig, Roles, train_policy

PROMPTS = ["Tell me about cats.", "Hi", "What is tea? Explain it at some length, please.", "Read a map."]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def family(request, tmp_path_factory, tiny_tokenizer):
    # LoRA dropout in the reward adapter: the value adapter starts as a copy of it, and RL must not use it
    return tiny_rl_setup(tmp_path_factory.mktemp(f"conformance-{request.param}"), request.param, tiny_tokenizer,
                         PROMPTS, pairs=16, rm_steps=2, lora_dropout=0.1)


def test_logprobs_equal_the_models_own_forward_at_the_sampling_temperature(family, tiny_tokenizer):
    model = make_model(family["arch"], len(tiny_tokenizer)).eval()
    prompts, _ = encode_prompts(tiny_tokenizer, PROMPTS, 64)
    rollout = generate(model, tiny_tokenizer, prompts, 6, temperature=0.7, seeds=[1, 2, 3, 4])
    ours = response_logprobs(model, rollout, temperature=0.7)
    for row, prompt in enumerate(prompts):  # each sequence alone, unpadded, through the model as a user calls it
        response = rollout.response_ids[row][rollout.response_mask[row].bool()]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response.tolist()])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits.float() / 0.7, dim=-1).gather(-1, response[:, None]).squeeze(-1)
        assert torch.allclose(ours[row, :len(response)], expected, atol=1e-4), family["arch"]
    assert check_logprobs_match_sampler(model, tiny_tokenizer, prompts[0]) < 1e-3


def _total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()


def test_sampling_frequencies_match_the_logprobs(family, tiny_tokenizer):
    """4,000 one-token samples at T=0.5, binned as the 8 likeliest tokens + the rest. Bound: the largest TV
    distance of 200 exact multinomial draws of the same size from perlhf's distribution (a fixed seed)."""
    model = make_model(family["arch"], len(tiny_tokenizer)).eval()
    with torch.no_grad():  # sharper logits, so temperature 0.5 and 1 give clearly different distributions
        model.get_output_embeddings().weight.mul_(8.0)
    prompt = encode_prompts(tiny_tokenizer, ["Tell me about cats."], 64)[0][0]
    n, temperature = 4000, 0.5
    rollout = generate(model, tiny_tokenizer, [prompt] * n, 1, temperature=temperature, seeds=list(range(n)))
    one = rollout.select(torch.tensor([0]))
    with torch.no_grad():
        logits = response_logits(model, one)[0, 0]
    vocab = torch.arange(logits.numel())
    probs = token_logprobs(logits.expand(len(vocab), -1), vocab, temperature).exp()  # perlhf's log-probs, every token
    probs_t1 = torch.softmax(logits.float(), dim=-1)
    top = probs.argsort(descending=True)[:8]

    def binned(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([p[top], (p.sum() - p[top].sum()).view(1)])

    counts = torch.bincount(rollout.response_ids[:, 0], minlength=len(vocab)).float()
    draws = torch.multinomial(probs, n * 200, replacement=True, generator=torch.Generator().manual_seed(0))
    bound = max(_total_variation(binned(torch.bincount(d, minlength=len(vocab)).float()), binned(probs))
                for d in draws.view(200, n))
    observed = _total_variation(binned(counts), binned(probs))
    assert observed <= bound, (family["arch"], observed, bound)
    assert _total_variation(binned(counts), binned(probs_t1)) > 3 * bound  # the test can tell T=0.5 from T=1


@pytest.mark.parametrize("algorithm", ["reinforce", "ppo"])
def test_kl_is_exactly_zero_at_the_first_iteration(algorithm, family, tmp_path):
    """The fresh policy adapter equals the reference, so the first KL is exactly 0 and PPO's ratio exactly 1,
    in train mode with gradient checkpointing, with dropout in the model (GPT-2) and in the reward adapter."""
    out = tmp_path / algorithm
    train_policy(RLConfig(model=family["model"], reward_model=family["rm"], prompts=family["prompts"],
                          output_dir=str(out), algorithm=algorithm, max_steps=1, batch_size=4, max_new_tokens=6,
                          temperature=0.8, device="cpu", seed=0))
    first = read_metrics(out)[0]
    assert first["reward/kl"] == 0.0, family["arch"]
    if algorithm == "ppo":
        assert first["ppo/clip_fraction"] == 0.0


def test_rl_scores_equal_rm_score(family, tiny_tokenizer):
    from perlhf.models import load_model

    config = RLConfig(model=family["model"], reward_model=family["rm"], prompts=family["prompts"], device="cpu")
    loaded = load_model(family["model"], device="cpu", verbose=False)
    roles = Roles(config, loaded, verbose=False)
    prompts, _ = encode_prompts(tiny_tokenizer, PROMPTS, 64)
    with roles.backbone.role("policy"):
        rollout = generate(roles.backbone.model, tiny_tokenizer, prompts, 8, temperature=1.0, seeds=[5, 6, 7, 8])
    in_rl = roles.scores(rollout, PROMPTS)
    alone = load_reward_model(family["rm"], device="cpu", verbose=False).score(
        PROMPTS, response_texts(tiny_tokenizer, rollout))
    assert in_rl.tolist() == pytest.approx(alone, abs=1e-5)


def test_update_passes_equal_the_sampling_pass(family, tiny_tokenizer):
    """The update's forward runs in train mode (gradient checkpointing needs it); with GPT-2's dropout, or the
    LoRA dropout the value adapter copies from the reward adapter, it would differ from the sampling-time pass
    and PPO's ratio would not be 1 with identical weights. RL removes every dropout, so they are equal."""
    from perlhf.models import load_model

    config = RLConfig(model=family["model"], reward_model=family["rm"], prompts=family["prompts"], device="cpu")
    roles = Roles(config, load_model(family["model"], device="cpu", verbose=False), verbose=False)
    prompts, _ = encode_prompts(tiny_tokenizer, PROMPTS, 64)
    with roles.backbone.role("policy"):
        rollout = generate(roles.backbone.model, tiny_tokenizer, prompts, 6, temperature=1.0, seeds=[1, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(roles.policy_logprobs(rollout, train=True), roles.policy_logprobs(rollout, train=False))
        assert torch.equal(roles.values(rollout, train=True), roles.values(rollout, train=False))


def test_a_family_whose_forward_disagrees_with_generate_is_refused_at_start(tiny_tokenizer):
    """A model whose full-sequence forward computes other logits than its cached generation path (as a family
    with a logit transform applied in one path only would): perlhf says so before training, not after."""
    model = make_model("llama", len(tiny_tokenizer)).eval()
    original = model.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if kwargs.get("use_cache") is False:  # the path perlhf's log-probs take, but not generate()'s
            out.logits = out.logits * 3.0
        return out

    model.forward = forward
    prompt = encode_prompts(tiny_tokenizer, ["Tell me about cats."], 64)[0][0]
    with pytest.raises(ValueError, match="LlamaForCausalLM: the log-probs perlhf computes .* not supported"):
        check_logprobs_match_sampler(model, tiny_tokenizer, prompt)


def test_a_shared_prefill_samples_what_a_prefill_of_every_row_does(family, tiny_tokenizer, monkeypatch):
    """Repeated prompts (pair sampling, RLOO's k) are prefilled once each and their cache copied: the same
    responses as a prefill of every row, with left padding and groups of uneven size."""
    import perlhf.rl.rollout as rollout

    model = make_model(family["arch"], len(tiny_tokenizer)).eval()
    encoded, _ = encode_prompts(tiny_tokenizer, PROMPTS, 64)
    prompts = [encoded[0]] * 2 + [encoded[1]] + [encoded[2]] * 3 + [encoded[3]] * 2
    ids, mask = rollout.pad_left(prompts, tiny_tokenizer.pad_token_id, "cpu")
    assert rollout.shared_prefill(model, ids, mask).get_seq_length() == ids.size(1) - 1  # it runs for this batch
    seeds = list(range(len(prompts)))
    shared = generate(model, tiny_tokenizer, prompts, 8, temperature=1.0, seeds=seeds)
    greedy = generate(model, tiny_tokenizer, prompts, 8, temperature=0)
    monkeypatch.setattr(rollout, "shared_prefill", lambda *args: None)
    assert torch.equal(generate(model, tiny_tokenizer, prompts, 8, temperature=1.0, seeds=seeds).response_ids,
                       shared.response_ids), family["arch"]
    assert torch.equal(generate(model, tiny_tokenizer, prompts, 8, temperature=0).response_ids, greedy.response_ids)


def test_decoding_with_the_weight_on_the_left_computes_what_f_linear_does(family, tiny_tokenizer, monkeypatch):
    import perlhf.rl.rollout as rollout

    layer = torch.nn.Linear(16, 24)
    for x in (torch.randn(5, 16), torch.randn(3, 1, 16), torch.randn(2, 4, 16)):
        assert torch.allclose(rollout._weight_left_linear(layer, x), layer(x), atol=1e-6)
    model = make_model(family["arch"], len(tiny_tokenizer)).eval()
    prompts, _ = encode_prompts(tiny_tokenizer, PROMPTS, 64)
    switched = generate(model, tiny_tokenizer, prompts, 8, temperature=1.0, seeds=[1, 2, 3, 4])
    assert not any("forward" in vars(m) for m in model.modules())  # the layers are given back as they were
    monkeypatch.setattr(rollout, "WEIGHT_LEFT_MAX_ROWS", 0)  # F.linear everywhere
    assert torch.equal(generate(model, tiny_tokenizer, prompts, 8, temperature=1.0, seeds=[1, 2, 3, 4]).response_ids,
                       switched.response_ids), family["arch"]


def test_the_nucleus_keeps_the_tokens_transformers_top_p_keeps_in_proportion():
    """Each row's picks over a grid of 6,000 uniforms: exactly the tokens TopPLogitsWarper keeps, each as often as
    its renormalised probability says (to one grid step). Row 2 is nearly flat: its nucleus is wider than the
    candidates, so it takes the sorted path."""
    from transformers import TopPLogitsWarper

    from perlhf.rl.rollout import SeededSampler

    torch.manual_seed(0)
    vocab, top_p, grid = 3000, 0.9, 6000
    scores = torch.stack([torch.randn(vocab) * 4, torch.randn(vocab) * 1.5, torch.randn(vocab) * 0.05])
    sampler = SeededSampler(1.0, [0], "cpu", top_p=top_p)
    uniform = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    for row in range(3):
        kept = torch.isfinite(TopPLogitsWarper(top_p)(None, scores[row:row + 1]))[0]
        probs = torch.softmax(scores[row], dim=-1)
        picks = sampler._nucleus_pick(probs.expand(grid, -1), uniform).squeeze(1)
        counts = torch.bincount(picks, minlength=vocab).double()
        assert torch.equal(counts > 0, kept), row
        expected = torch.where(kept, probs, 0.0).double()
        assert (counts / grid - expected / expected.sum()).abs().max() <= 1.0 / grid, row
    assert int(torch.isfinite(TopPLogitsWarper(top_p)(None, scores[2:])).sum()) > SeededSampler.NUCLEUS_CANDIDATES
