"""Prefix sharing (perlhf.prefix_sharing): packing worked out by hand, and a reward model's pair scores, loss and
gradients equal to the plain two-sequence computation on every family of the conformance suite, with left
truncation and padding, LoRA and --full, gradient checkpointing; the fallbacks and the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ARCHITECTURES, make_model
from perlhf import prefix_sharing
from perlhf.data import PreferencePair
from perlhf.models import LoadedModel
from perlhf.reward import (RewardConfig, bradley_terry_loss, build_reward_model, encode_records, forward_batch,
                           train_reward_model)


def test_common_prefix_leaves_each_sequence_its_last_token():
    assert prefix_sharing.common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert prefix_sharing.common_prefix([1, 2, 3], [1, 2, 3]) == 2  # identical: the last token is each one's own
    assert prefix_sharing.common_prefix([1, 2], [1, 2, 3]) == 1
    assert prefix_sharing.common_prefix([7, 2], [1, 2]) == 0


def test_pack_and_mask_by_hand():
    row = prefix_sharing.pack([[5, 6, 7, 8], [5, 6, 9]])
    assert row.tokens == [5, 6, 7, 8, 9]
    assert row.positions == [0, 1, 2, 3, 2]
    assert row.branch == [0, 0, 1, 1, 2]
    assert row.ends == [3, 4]
    short = prefix_sharing.pack([[1, 2], [3, 4]])  # nothing shared: two independent sequences in one row
    assert short.tokens == [1, 2, 3, 4] and short.positions == [0, 1, 0, 1] and short.branch == [1, 1, 2, 2]

    batch = prefix_sharing.pad_packed([row, short], pad_id=0, device="cpu", attention="sdpa", dtype=torch.float32)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 1, 0]]
    assert batch.ends.tolist() == [[3, 4], [1, 3]] and batch.tokens == 9 and batch.input_ids.size(1) == 5
    expected_first = [[1, 0, 0, 0, 0],   # prefix token 0
                      [1, 1, 0, 0, 0],   # prefix token 1
                      [1, 1, 1, 0, 0],   # chosen 7 sees the prefix and itself
                      [1, 1, 1, 1, 0],   # chosen 8
                      [1, 1, 0, 0, 1]]   # rejected 9 sees the prefix and itself, not the chosen tokens
    expected_second = [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],  # the second sequence does not see the first
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 1]]  # padding sees itself only
    assert batch.attention_mask[:, 0].int().tolist() == [expected_first, expected_second]
    eager = prefix_sharing.pad_packed([row], 0, "cpu", "eager", torch.float32).attention_mask
    assert eager.dtype == torch.float32 and eager[0, 0, 4, 2] == torch.finfo(torch.float32).min and eager[0, 0, 4, 1] == 0


PROMPTS = ["Tell me a long story about the sea and the ships that sail on it at night, in detail.",
           "What is tea?", "Describe the rain over the hills in spring, with its smell and sound.", "Hi"]
REPLIES = [("Sure! The sea is calm and wide.", "no"), ("A drink.", "Tea is a drink made from leaves, brewed hot."),
           ("It falls softly.", "Rain."), ("Hello there, friend!", "Go away, I am busy right now.")]


def _reward_model(arch: str, tokenizer, tmp_path: Path, **options):
    model = make_model(arch, len(tokenizer))
    config = RewardConfig(data="unused", output_dir=str(tmp_path), max_length=48, **options)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, source="test")
    reward = build_reward_model(config, loaded)
    torch.manual_seed(1)
    for name, p in reward.named_parameters():  # LoRA B starts at zero: give every trained weight a gradient path
        if p.requires_grad and "lora_B" in name:
            p.data.normal_(0, 0.05)
    return reward, config


def _pairs(tokenizer, max_length: int):
    records = [PreferencePair(p, c, r, "test") for p, (c, r) in zip(PROMPTS, REPLIES)]
    encoded, truncated = encode_records(records, tokenizer, max_length)
    assert truncated > 0  # long prompts are cut from the left, so a pair's two prompts may start differently
    return encoded


def _loss_and_grads(reward, batch, pad_id, share: bool):
    reward.share_prefix = share
    reward.zero_grad(set_to_none=True)
    out = forward_batch(reward, batch, pad_id, "cpu")
    loss = bradley_terry_loss(out["chosen"], out["rejected"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in reward.named_parameters() if p.requires_grad and p.grad is not None}
    return out, loss.detach(), grads


def _assert_same_computation(reward, batch, pad_id):
    plain, plain_loss, plain_grads = _loss_and_grads(reward, batch, pad_id, share=False)
    shared, shared_loss, shared_grads = _loss_and_grads(reward, batch, pad_id, share=True)
    assert shared["computed"] < plain["computed"]  # the shared prefixes really were computed once
    assert shared["tokens"] == plain["tokens"]
    torch.testing.assert_close(shared["chosen"], plain["chosen"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared["rejected"], plain["rejected"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) > 2
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shared_pairs_equal_plain_scores_loss_and_gradients(arch, tiny_tokenizer, tmp_path):
    reward, config = _reward_model(arch, tiny_tokenizer, tmp_path, lora_target="all-linear")
    reward.eval()  # GPT-2's dropout would draw different masks for different shapes
    assert prefix_sharing.sharing_failure(reward.body, config.max_length) is None
    _assert_same_computation(reward, _pairs(tiny_tokenizer, config.max_length), tiny_tokenizer.pad_token_id)


@pytest.mark.parametrize("options", [{"full": True}, {"gradient_checkpointing": True}], ids=["full", "checkpointing"])
def test_shared_pairs_are_exact_with_full_tuning_and_gradient_checkpointing(options, tiny_tokenizer, tmp_path):
    reward, config = _reward_model("llama", tiny_tokenizer, tmp_path, **options)
    reward.train()  # checkpointing recomputes only in training mode; Llama has no dropout
    _assert_same_computation(reward, _pairs(tiny_tokenizer, config.max_length), tiny_tokenizer.pad_token_id)


@pytest.mark.parametrize("quantize", ["4bit"])
def test_shared_pairs_are_exact_on_a_quantized_base(quantize, tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from perlhf.models import load_model

    loaded = load_model(tiny_model_dir, device="cpu", quantize=quantize, verbose=False)
    config = RewardConfig(data="unused", output_dir=str(tmp_path), max_length=48, quantize=quantize)
    reward = build_reward_model(config, loaded)
    for name, p in reward.named_parameters():
        if p.requires_grad and "lora_B" in name:
            p.data.normal_(0, 0.05)
    reward.eval()
    _assert_same_computation(reward, _pairs(loaded.tokenizer, config.max_length), loaded.tokenizer.pad_token_id)


def test_a_sliding_window_shorter_than_the_sequences_falls_back_with_a_notice(tiny_tokenizer, tmp_path, capsys):
    model = make_model("qwen2", len(tiny_tokenizer))
    model.config.use_sliding_window, model.config.sliding_window = True, 16
    reward = build_reward_model(RewardConfig(data="unused", output_dir=str(tmp_path), max_length=48),
                                LoadedModel(model=model, tokenizer=tiny_tokenizer, source="test"))
    out = forward_batch(reward, _pairs(tiny_tokenizer, 48), tiny_tokenizer.pad_token_id, "cpu")
    assert reward.share_prefix is False and out["computed"] == sum(len(e.chosen) + len(e.rejected)
                                                                  for e in _pairs(tiny_tokenizer, 48))
    assert "prefix sharing is off for this model: sliding-window attention (16 tokens)" in capsys.readouterr().out


def test_the_first_batch_check_catches_a_packing_that_is_not_exact(tiny_tokenizer, tmp_path, capsys, monkeypatch):
    reward, config = _reward_model("llama", tiny_tokenizer, tmp_path)
    packed = prefix_sharing.pad_packed

    def causal_only(*args, **kwargs):  # what a model that builds its own causal mask would compute
        batch = packed(*args, **kwargs)
        batch.attention_mask = torch.ones_like(batch.attention_mask).tril()
        return batch

    monkeypatch.setattr(prefix_sharing, "pad_packed", causal_only)
    forward_batch(reward, _pairs(tiny_tokenizer, config.max_length), tiny_tokenizer.pad_token_id, "cpu")
    assert reward.share_prefix is False
    assert "packed scores differ from the plain ones" in capsys.readouterr().out


def _write_pairs(path: Path) -> str:
    with path.open("w") as handle:
        for i in range(48):
            prompt, (chosen, rejected) = PROMPTS[i % 4] + f" ({i})", REPLIES[i % 4]
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return str(path)


def test_rm_train_with_and_without_sharing_gives_the_same_adapter_and_logs_the_savings(tiny_model_dir, tmp_path,
                                                                                      capsys):
    from safetensors.torch import load_file

    data = _write_pairs(tmp_path / "pairs.jsonl")
    runs = {}
    for share in (True, False):
        out = tmp_path / f"share-{share}"
        runs[share] = train_reward_model(RewardConfig(model=tiny_model_dir, data=data, output_dir=str(out), max_steps=4,
                                                      per_device_train_batch_size=4, max_length=160, eval_steps=0,
                                                      save_steps=4, logging_steps=1, device="cpu", share_prefix=share))
    said = capsys.readouterr().out
    assert "share its forward pass in the reward model" in said
    shared, plain = (load_file(str(tmp_path / f"share-{s}" / "adapter_model.safetensors")) for s in (True, False))
    assert shared.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert runs[True]["final"]["eval/accuracy"] == runs[False]["final"]["eval/accuracy"]
    logged = [json.loads(line) for line in (tmp_path / "share-True" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "train/prefix_saved_share" in row]
    saved = [row["train/prefix_saved_share"] for row in steps]  # a pair's prompt is most of its two sequences
    assert len(saved) == 4 and all(0 < share < 0.5 for share in saved) and sum(saved) / 4 > 0.2
    assert all(0 <= row["train/padding_share"] < 1 for row in steps)
    unshared = [json.loads(line) for line in (tmp_path / "share-False" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["train/prefix_saved_share"] == 0 for row in unshared if "train/prefix_saved_share" in row)


# --- RL groups: k samples of one prompt ------------------------------------------------------------------------

RL_PROMPTS = ["Tell me about cats.", "Hi", "What is tea? Explain it at some length, please."]


def _policy_and_rollout(arch: str, tokenizer, k: int):
    from perlhf.backbone import Backbone, lora_config
    from perlhf.rl.rollout import encode_prompts, generate
    from perlhf.rl.trainer import disable_dropout

    model = make_model(arch, len(tokenizer))
    backbone = Backbone.with_adapter(model, "policy", lora_config(model, 4, 8.0, 0.0, "all-linear"))
    disable_dropout(backbone.model)  # as RL runs it (GPT-2 has dropout 0.1; PEFT puts the model in training mode)
    torch.manual_seed(2)
    for name, p in backbone.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    prompts, _ = encode_prompts(tokenizer, RL_PROMPTS, 64)  # three lengths: left padding differs per group
    rows = [p for p in prompts for _ in range(k)]
    rollout = generate(backbone.model, tokenizer, rows, 8, temperature=0.8, seeds=list(range(len(rows))))
    rollout.response_mask[1::2, 5:] = 0  # every other response ends early: padding inside the packed slots
    rollout.ended[1::2] = True
    return backbone, rollout


def _packed(backbone, rollout):
    return prefix_sharing.pack_rollout(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                       rollout.response_mask, prefix_sharing.attention_of(backbone.model),
                                       torch.float32)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("k", [2, 4])
def test_shared_groups_equal_plain_logprobs_entropy_values_and_gradients(arch, k, tiny_tokenizer):
    from perlhf.backbone import new_head
    from perlhf.rl.rollout import prompt_values, response_logprobs, response_values

    backbone, rollout = _policy_and_rollout(arch, tiny_tokenizer, k)
    packed = _packed(backbone, rollout)
    assert packed.input_ids.size(0) == len(RL_PROMPTS) and packed.tokens < packed.plain_tokens
    model = backbone.model

    def run(with_packing: bool):
        model.zero_grad(set_to_none=True)
        logp, entropy = response_logprobs(model, rollout, 0.8, with_entropy=True,
                                          packed=packed if with_packing else None)
        (logp.sum() / rollout.response_mask.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logp.detach(), entropy * rollout.response_mask, grads

    plain, shared = run(False), run(True)
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1], plain[1], rtol=1e-5, atol=1e-5)
    assert shared[2].keys() == plain[2].keys() and plain[2]
    for name in plain[2]:
        torch.testing.assert_close(shared[2][name], plain[2][name], rtol=1e-4, atol=1e-6, msg=name)

    head = new_head(model)
    with torch.no_grad():
        values = response_values(model, head, rollout), response_values(model, head, rollout, packed)
        torch.testing.assert_close(values[1] * rollout.response_mask, values[0] * rollout.response_mask,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prompt_values(model, head, rollout, share_prefix=True),
                                   prompt_values(model, head, rollout), rtol=1e-5, atol=1e-5)


def test_a_rollout_without_repeated_prompts_is_not_packed(tiny_tokenizer):
    backbone, rollout = _policy_and_rollout("llama", tiny_tokenizer, 1)
    assert _packed(backbone, rollout) is None


def test_rl_train_with_and_without_sharing_gives_the_same_policy_and_logs_the_savings(tmp_path, tiny_tokenizer,
                                                                                     capsys):
    from conftest import tiny_rl_config, tiny_rl_setup
    from perlhf.metrics import read_metrics
    from perlhf.rl.trainer import train_policy
    from safetensors.torch import load_file

    setup = tiny_rl_setup(tmp_path / "in", "qwen2", tiny_tokenizer, RL_PROMPTS, pairs=12, rm_steps=2)
    for share in (True, False):
        train_policy(tiny_rl_config(setup, tmp_path / f"share-{share}", algorithm="rloo", samples_per_prompt=3,
                                    batch_size=2, share_prefix=share))
    assert "each prompt's forward pass is shared by its group of samples" in capsys.readouterr().out
    shared, plain = (load_file(str(tmp_path / f"share-{s}" / "policy" / "adapter_model.safetensors"))
                     for s in (True, False))
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    saved = [row["perf/prefix_saved_share"] for row in read_metrics(tmp_path / "share-True")]
    assert len(saved) == 3 and all(0 < share < 1 for share in saved)
    assert all(row["perf/prefix_saved_share"] == 0 for row in read_metrics(tmp_path / "share-False"))


def test_share_prefix_false_turns_it_off_for_the_reward_role_too(tmp_path, tiny_tokenizer):
    from conftest import tiny_rl_config, tiny_rl_setup
    from perlhf.models import load_model
    from perlhf.rl.trainer import Roles

    setup = tiny_rl_setup(tmp_path / "in", "llama", tiny_tokenizer, RL_PROMPTS, pairs=12, rm_steps=2)
    for share, expected in ((False, False), (True, None)):  # None: decided at first use
        config = tiny_rl_config(setup, tmp_path / "out", algorithm="rloo", share_prefix=share)
        roles = Roles(config, load_model(setup["model"], device="cpu", verbose=False), verbose=False)
        assert roles.shared_reward and roles.reward.share_prefix is expected and roles.share_prefix is expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_scores_of_k_samples_per_prompt_equal_the_plain_ones(arch, tiny_tokenizer, tmp_path):
    """RL scores k samples per prompt with `RewardModel.score`: runs of one prompt are packed, groups of
    different sizes and batch boundaries included."""
    reward, _ = _reward_model(arch, tiny_tokenizer, tmp_path)
    prompts = [RL_PROMPTS[0]] * 3 + [RL_PROMPTS[1]] + [RL_PROMPTS[2]] * 4
    responses = ["Sure! Cats.", "no", "They purr a lot.", "Hello!", "A drink.", "Leaves.", "Hot water.", "no"]
    shared = reward.score(prompts, responses, batch_size=5)
    assert reward.share_prefix is True
    reward.share_prefix = False
    plain = reward.score(prompts, responses, batch_size=5)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(plain), rtol=1e-5, atol=1e-5)
