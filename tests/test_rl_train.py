"""RL on one shared backbone, end to end on tiny random models."""

import json

import pytest
import torch

from conftest import make_model, save_tiny_model, tiny_rl_config, tiny_rl_setup
from perlhf.backbone import Backbone, enable_gradient_checkpointing, lora_config
from perlhf.metrics import read_metrics
from perlhf.reward import RewardConfig, train_reward_model
from perlhf.rl.rollout import Rollout, encode_prompts, generate, pad_left, response_logprobs
from perlhf.rl.trainer import train_policy

PROMPTS = ["Tell me about cats.", "Tell me about dogs.", "What is tea?", "Why does it rain?", "Read a map.",
           "Play some jazz.", "Bake bread.", "Ride a train."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    return tiny_rl_setup(tmp_path_factory.mktemp("rl"), "llama", tiny_tokenizer, PROMPTS, pairs=64, rm_steps=10,
                         learning_rate=2e-3)


rl_config = tiny_rl_config


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo", "ppo"])
def test_each_algorithm_trains_a_policy_adapter(algorithm, setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / algorithm
    result = train_policy(rl_config(setup, out, algorithm=algorithm))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("reward/score", "reward/kl", "reward/return", "policy/entropy", "policy/response_length",
                "policy/eos_rate", "loss/policy", "perf/tokens_per_second", "time/generate", "time/score",
                "time/reference", "time/update", "memory/peak_mb", "kl/coef"):
        assert key in metrics[-1], key
    assert ("loss/value" in metrics[-1]) == (algorithm != "rloo")
    assert abs(metrics[0]["reward/kl"]) < 1e-6  # LoRA B starts at zero: the policy equals the anchor at first
    assert metrics[-1]["reward/kl"] != 0.0       # ... and moved away from it after updates
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]), result["policy"])
    assert loaded is not None
    assert (out / "value").exists() == (algorithm != "rloo")


def test_reference_is_a_frozen_copy_when_the_policy_starts_from_an_adapter(setup, tmp_path, tiny_tokenizer):
    base = make_model("llama", len(tiny_tokenizer))
    sft = Backbone.with_adapter(base, "policy", lora_config(base, 4, 8, 0.0, "attention"))
    for name, p in sft.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a real starting adapter, far from the bare backbone
    sft.save_adapter("policy", tmp_path / "sft")
    out = tmp_path / "from-sft"
    train_policy(rl_config(setup, out, policy_adapter=str(tmp_path / "sft"), max_steps=2))
    first = read_metrics(out)[0]
    # against a frozen copy of the starting adapter the first KL is exactly zero; against the bare
    # backbone (what peers do) it would be large
    assert abs(first["reward/kl"]) < 1e-6


def test_reward_model_on_another_base_is_a_separate_model(setup, tmp_path, tiny_tokenizer, capsys):
    other = save_tiny_model("gpt2", tmp_path / "gpt2", tiny_tokenizer)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": "Sure!", "rejected": f"no {i}"}) + "\n"
                             for i, p in enumerate(PROMPTS * 4)))
    train_reward_model(RewardConfig(model=other, data=str(pairs), output_dir=str(tmp_path / "rm2"), max_steps=3,
                                    eval_steps=0, save_steps=3, device="cpu"))
    train_policy(rl_config(setup, tmp_path / "run", reward_model=str(tmp_path / "rm2"), max_steps=2))
    assert "separate model" in capsys.readouterr().out


def test_logprobs_do_not_depend_on_padding(tiny_tokenizer):
    model = make_model("llama", len(tiny_tokenizer)).eval()
    prompts, _ = encode_prompts(tiny_tokenizer, ["hi", "a much longer prompt than the first"], 64)
    rollout = generate(model, tiny_tokenizer, prompts, 5, temperature=0)
    together = response_logprobs(model, rollout)
    for row in range(2):
        ids, mask = pad_left([prompts[row]], tiny_tokenizer.pad_token_id, "cpu")
        alone = Rollout(ids, mask, rollout.response_ids[row:row + 1], rollout.response_mask[row:row + 1],
                        rollout.ended[row:row + 1])
        assert torch.allclose(response_logprobs(model, alone), together[row:row + 1], atol=1e-5)


def test_response_mask_stops_after_eos(tiny_tokenizer):
    from perlhf.rl.rollout import response_mask_after_eos

    eos = tiny_tokenizer.eos_token_id
    mask, ended = response_mask_after_eos(torch.tensor([[5, eos, 7, 8], [5, 6, 7, 8]]), [eos], 256)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]


def test_prompt_value_equals_the_value_before_the_first_response_token(tiny_tokenizer):
    from perlhf.backbone import new_head
    from perlhf.rl.rollout import prompt_values, response_values

    model = make_model("llama", len(tiny_tokenizer)).eval()
    head = new_head(model)
    prompts, _ = encode_prompts(tiny_tokenizer, ["hi", "a longer prompt"], 64)
    rollout = generate(model, tiny_tokenizer, prompts, 4, temperature=0)
    with torch.no_grad():
        assert torch.allclose(prompt_values(model, head, rollout), response_values(model, head, rollout)[:, 0], atol=1e-5)



def _policy_gradients(tiny_tokenizer, checkpointing: bool, backward_in_role: bool) -> list[torch.Tensor]:
    from types import SimpleNamespace

    from perlhf.rl.trainer import Roles

    model = make_model("llama", len(tiny_tokenizer))
    backbone = Backbone.with_adapter(model, "policy", lora_config(model, 4, 8, 0.0, "attention"))
    backbone.add_adapter("value", lora_config(model, 4, 8, 0.0, "attention"), trainable=True)
    for name, p in backbone.model.named_parameters():
        if "lora_B" in name:  # non-zero B in both adapters, so the active adapter changes every layer's output
            p.data.normal_(0, 0.3)
    if checkpointing:
        enable_gradient_checkpointing(model)
    roles = SimpleNamespace(backbone=backbone)
    prompts, _ = encode_prompts(tiny_tokenizer, ["hi", "a longer prompt"], 64)
    rollout = generate(model, tiny_tokenizer, prompts, 5, temperature=0)
    with backbone.role("policy", train=True):
        loss = response_logprobs(backbone.model, rollout).sum()
    if backward_in_role:
        Roles.backward(roles, "policy", loss)
    else:
        with backbone.role("value", train=True):  # what happens if backward runs after another role's pass
            loss.backward()
    return [p.grad.clone() for p in backbone.trainable_parameters("policy")]


def test_gradient_checkpointing_recomputes_under_the_role_that_ran_the_forward(tiny_tokenizer):
    plain = _policy_gradients(tiny_tokenizer, checkpointing=False, backward_in_role=True)
    checkpointed = _policy_gradients(tiny_tokenizer, checkpointing=True, backward_in_role=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    wrong = _policy_gradients(tiny_tokenizer, checkpointing=True, backward_in_role=False)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, wrong))


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo"])
def test_reusing_the_sampling_pass_gives_the_same_update(algorithm, setup, tmp_path, monkeypatch):
    """REINFORCE/RLOO reuse the sampling-time forward, with or without gradient checkpointing; with the reuse
    turned off they run a second forward in the update. All three must train the same adapter."""
    from safetensors.torch import load_file

    import perlhf.rl.trainer as trainer

    runs = {}
    for name, checkpointing, reuse in (("reused, checkpointing", True, True), ("reused", False, True),
                                       ("second forward", False, False)):
        out = tmp_path / f"{algorithm}-{checkpointing}-{reuse}"
        monkeypatch.setattr(trainer, "reuses_sampling_pass", trainer.reuses_sampling_pass if reuse else lambda c: False)
        train_policy(rl_config(setup, out, algorithm=algorithm, gradient_checkpointing=checkpointing))
        runs[name] = load_file(str(out / "policy" / "adapter_model.safetensors"))
    reference = runs["second forward"]
    for name, weights in runs.items():
        assert weights.keys() == reference.keys()
        assert all(torch.allclose(weights[k], reference[k], atol=1e-5) for k in reference), name


def test_rl_turns_checkpointing_on_only_when_the_run_would_not_fit(setup, tmp_path, monkeypatch, capsys):
    """As `rm train`: by default the plan decides, and the run says what it expects to use. On CPU, RL fixes glibc's
    mmap threshold at 4 MiB from the start, and at 128 KiB when the run is tight."""
    import perlhf.models
    import perlhf.plan as planning

    thresholds = []  # recorded, not done: the fixed threshold would slow later tests in this process
    monkeypatch.setattr(perlhf.models, "return_freed_memory",
                        lambda threshold=perlhf.models.TIGHT_MMAP_THRESHOLD: thresholds.append(threshold))

    def run(name: str, **options) -> tuple[str, str]:
        train_policy(rl_config(setup, tmp_path / name, max_steps=1, **options))
        return capsys.readouterr().out, (tmp_path / name / "training_config.yaml").read_text()

    out, saved = run("roomy")
    assert "gradient checkpointing on" not in out and "expected peak memory" in out
    assert "gradient_checkpointing: false" in saved
    assert thresholds == [4 << 20]
    monkeypatch.setattr(planning, "available_memory", lambda device: 0.001 * planning.GIB)
    out, saved = run("tight")
    assert "gradient checkpointing on: without it the run would need" in out
    assert "gradient_checkpointing: true" in saved
    assert thresholds == [4 << 20, 4 << 20, 128 << 10]
    out, saved = run("asked", gradient_checkpointing=False)  # an explicit choice is kept
    assert "gradient_checkpointing: false" in saved
