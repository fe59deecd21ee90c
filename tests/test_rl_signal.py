"""The RL training signal is the one the maths says: the reward as the reward model was trained, penalties that
reach every algorithm, no dropout, each role clipped on its own, only perlhf's sampler settings."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model, tiny_rl_config, tiny_rl_setup
from perlhf.config import ConfigError
from perlhf.metrics import read_metrics
from perlhf.models import load_model
from perlhf.reward import load_reward_model
from perlhf.rl.rollout import Rollout, encode_prompts, generate, pad_left, response_mask_after_eos, response_texts
from perlhf.rl.trainer import RLConfig, Roles, disable_dropout, train_policy

PROMPTS = ["Tell me about cats.", "Tell me about dogs.", "What is tea?", "Why does it rain?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    return tiny_rl_setup(tmp_path_factory.mktemp("signal"), "llama", tiny_tokenizer, PROMPTS, pairs=32, rm_steps=4,
                         learning_rate=2e-3)


def rl_config(setup, out, **overrides) -> RLConfig:  # one iteration
    return tiny_rl_config(setup, out, **{"max_steps": 1, "save_steps": 1, **overrides})


def _rollout(tokenizer, prompts: list[str], responses: list[list[int]], eos_ids: list[int]) -> Rollout:
    encoded, _ = encode_prompts(tokenizer, prompts, 64)
    ids, mask = pad_left(encoded, tokenizer.pad_token_id, "cpu")
    width = max(len(r) for r in responses)
    response = torch.full((len(responses), width), tokenizer.pad_token_id)
    for row, r in enumerate(responses):
        response[row, :len(r)] = torch.tensor(r)
    response_mask, ended = response_mask_after_eos(response, eos_ids, tokenizer.pad_token_id)
    return Rollout(ids, mask, response, response_mask, ended)


@pytest.mark.parametrize("reward_max_length", [None, 12])
def test_rl_scores_equal_rm_score_whatever_token_ended_the_response(setup, tiny_tokenizer, tmp_path, reward_max_length):
    """Ended by the tokenizer's EOS, by a secondary EOS id from generation_config, or cut off by max_new_tokens:
    RL scores what `perlhf rm score` scores for the same text, truncated to the reward model's --max-length."""
    rm = setup["rm"]
    if reward_max_length:  # the same reward model, trained (as its config says) with a short --max-length
        rm = str(tmp_path / "rm-short")
        shutil.copytree(setup["rm"], rm)
        config = json.loads((tmp_path / "rm-short" / "adapter_config.json").read_text())
        config["perlhf_max_length"] = reward_max_length
        (tmp_path / "rm-short" / "adapter_config.json").write_text(json.dumps(config))
    loaded = load_model(setup["model"], device="cpu", verbose=False)
    secondary = tiny_tokenizer.pad_token_id  # "<|endoftext|>": a second EOS id, as Qwen2.5 ships
    loaded.model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, secondary]
    roles = Roles(rl_config(setup, tmp_path / "unused", reward_model=rm), loaded, verbose=False)
    text = tiny_tokenizer.encode("Sure! Lovely.", add_special_tokens=False)
    cut_off = tiny_tokenizer.encode("Sure! Lovely.!", add_special_tokens=False)  # fills the width, as a cut-off does
    responses = [text + [tiny_tokenizer.eos_token_id], text + [secondary], cut_off]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2]]
    rollout = _rollout(tiny_tokenizer, prompts, responses, [tiny_tokenizer.eos_token_id, secondary])
    assert rollout.ended.tolist() == [True, True, False]
    in_rl = roles.scores(rollout, prompts)
    texts = response_texts(tiny_tokenizer, rollout)
    assert texts == ["Sure! Lovely."] * 2 + ["Sure! Lovely.!"]
    by_rm_score = load_reward_model(rm, device="cpu", verbose=False).score(prompts, texts)
    assert in_rl.tolist() == pytest.approx(by_rm_score, abs=1e-5)
    assert in_rl[0].item() == pytest.approx(in_rl[1].item(), abs=1e-5)  # the secondary EOS scores as the primary


def test_ppo_sees_the_missing_eos_penalty(setup, tmp_path):
    adapters = {}
    for penalty in (0.0, 100.0):
        out = tmp_path / f"penalty-{penalty}"
        train_policy(rl_config(setup, out, algorithm="ppo", max_new_tokens=3, missing_eos_penalty=penalty,
                               temperature=1.0))
        assert read_metrics(out)[0]["policy/eos_rate"] < 1.0  # some responses were cut off
        adapters[penalty] = load_file(str(out / "policy" / "adapter_model.safetensors"))
    assert any(not torch.equal(adapters[0.0][k], adapters[100.0][k]) for k in adapters[0.0])


def test_policy_and_value_gradients_are_clipped_apart(setup, tmp_path):
    """A huge value loss must not shrink the policy's step: after one REINFORCE iteration the policy adapter is
    the same whatever the value loss weight (the baseline is read before the update, so it is equal too)."""
    adapters = {}
    for value_coef in (0.5, 1e6):
        out = tmp_path / f"value-{value_coef}"
        train_policy(rl_config(setup, out, value_coef=value_coef, learning_rate=1e-2))
        metrics = read_metrics(out)[0]
        assert "train/value_grad_norm" in metrics and "train/grad_norm" in metrics
        adapters[value_coef] = load_file(str(out / "policy" / "adapter_model.safetensors"))
    assert all(torch.equal(adapters[0.5][k], adapters[1e6][k]) for k in adapters[0.5])


def test_a_nucleus_is_refused_for_rl(setup, tmp_path):
    with pytest.raises(ConfigError, match="--top-p: must be 1 for RL"):
        rl_config(setup, tmp_path, top_p=0.9)


def test_rl_sampling_ignores_the_models_generation_config(tiny_tokenizer):
    """A model that ships sampling settings (Qwen2.5-Instruct ships a repetition penalty) samples what the same
    model without them samples: only perlhf's settings apply, and its log-probs describe exactly those."""
    from perlhf.rl.rollout import ignored_generation_settings

    prompts, _ = encode_prompts(tiny_tokenizer, PROMPTS, 64)
    plain = make_model("llama", len(tiny_tokenizer)).eval()
    shipped = make_model("llama", len(tiny_tokenizer)).eval()
    shipped.generation_config.repetition_penalty = 5.0
    shipped.generation_config.no_repeat_ngram_size = 1
    shipped.generation_config.suppress_tokens = list(range(0, 200))
    seeds = [11, 12, 13, 14]
    a = generate(plain, tiny_tokenizer, prompts, 12, temperature=1.0, seeds=seeds)
    b = generate(shipped, tiny_tokenizer, prompts, 12, temperature=1.0, seeds=seeds)
    assert torch.equal(a.response_ids, b.response_ids)
    assert set(ignored_generation_settings(shipped)) >= {"repetition_penalty", "no_repeat_ngram_size", "suppress_tokens"}
    assert shipped.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was


def test_rl_roles_run_without_dropout(setup, tiny_tokenizer, tmp_path):
    """GPT-2 (dropout 0.1 everywhere) with a policy adapter that has LoRA dropout: after the roles are built,
    every dropout is gone, so a train-mode pass (what gradient checkpointing needs) equals an eval-mode one."""
    base = make_model("gpt2", len(tiny_tokenizer))
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in base.modules())
    disable_dropout(base)
    assert all(m.p == 0.0 for m in base.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.tensor([tiny_tokenizer.encode("Tell me about cats.")])
    base.train()
    first, second = base(ids).logits, base(ids).logits
    base.eval()
    assert torch.equal(first, second) and torch.allclose(first, base(ids).logits, atol=1e-6)


def test_sampling_is_the_same_whatever_the_batch(tiny_tokenizer):
    """Each sequence has its own seed: sampled alone or with others, it draws the same tokens (what lets a
    2-process run sample exactly what a 1-process run samples)."""
    model = make_model("llama", len(tiny_tokenizer)).eval()
    prompts, _ = encode_prompts(tiny_tokenizer, PROMPTS, 64)
    together = generate(model, tiny_tokenizer, prompts, 8, temperature=0.9, seeds=[1, 2, 3, 4])
    for row in range(4):
        alone = generate(model, tiny_tokenizer, prompts[row:row + 1], 8, temperature=0.9, seeds=[row + 1])
        width = alone.response_ids.size(1)
        assert torch.equal(alone.response_ids[0], together.response_ids[row, :width])


def _fresh_policy_adapter(setup, tiny_tokenizer, directory):
    from perlhf.backbone import Backbone, lora_config

    base = load_model(setup["model"], device="cpu", verbose=False).model
    backbone = Backbone.with_adapter(base, "policy", lora_config(base, 4, 8, 0.0, "attention"))
    backbone.save_adapter("policy", directory, extra_config={"base_model_name_or_path": setup["model"]})
    return str(directory)


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_eval_reports_the_kl_of_the_policy_as_sampled(setup, tiny_tokenizer, tmp_path, temperature):
    """`perlhf eval`'s KL is the exact KL(policy || anchor) at the sampling temperature, which is 0 for a policy
    equal to its anchor (a fresh adapter); at temperature 0 it says it is the T=1 KL along greedy responses. Two
    judges named `a/best` and `b/best` are both reported."""
    from perlhf.evaluate import EvalConfig, evaluate_policy

    policy = _fresh_policy_adapter(setup, tiny_tokenizer, tmp_path / "policy")
    for name in ("a", "b"):
        shutil.copytree(setup["rm"], tmp_path / name / "best")
    results = evaluate_policy(EvalConfig(policy=policy, prompts=setup["prompts"], reward_model=setup["rm"],
                                         judges=[str(tmp_path / "a" / "best"), str(tmp_path / "b" / "best")],
                                         num_prompts=4, max_new_tokens=5, temperature=temperature, device="cpu",
                                         output_dir=str(tmp_path / "eval")))
    assert results["kl"]["mean"] == 0.0
    assert results["kl"]["temperature"] == (temperature or 1.0)
    assert ("greedy" in results["kl"]["estimator"]) == (temperature == 0.0)
    assert set(results["judges"]) == {"reward_model", "judge:a/best", "judge:b/best"}
    assert results["judges"]["judge:a/best"] == results["judges"]["judge:b/best"]  # the same weights, both kept
