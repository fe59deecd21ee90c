"""A quantized frozen backbone (--quantize 4bit|8bit, bitsandbytes on CPU): every role runs on it, adapters record
it, a reward model scores as on the base it was trained on, a merge goes into the de-quantized weights, and
resume and the non-finite guard work as on an unquantized base."""

from __future__ import annotations

import json
import signal
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_rl_config, tiny_rl_setup
from test_faults import (_assert_same_adapters, _assert_same_metrics, _cli, _kill_at_step, _nan_loss_at,
                         _one_thread, _rm_config, _run, rl_argv, rm_argv)

pytest.importorskip("bitsandbytes")
PROMPTS = ["Say something nice.", "Tell me a joke.", "Describe the sea.", "What is tea?"]


def _bnb_layers(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> dict:
    """A tiny Llama, pairs, prompts and a LoRA reward model trained on its 4-bit quantization."""
    return tiny_rl_setup(tmp_path_factory.mktemp("quantized"), "llama", tiny_tokenizer, PROMPTS, pairs=40, rm_steps=4,
                         quantize="4bit")


@pytest.mark.parametrize("quantize,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_a_quantized_base_trains_a_lora_reward_model_and_the_adapter_records_it(setup, tmp_path, quantize, layer):
    from perlhf.models import load_model
    from perlhf.reward import RewardConfig, train_reward_model

    loaded = load_model(setup["model"], device="cpu", quantize=quantize, verbose=False)
    assert layer in _bnb_layers(loaded.model)
    plain = load_model(setup["model"], device="cpu", verbose=False).model.get_memory_footprint()
    assert loaded.model.get_memory_footprint() < plain

    out = tmp_path / "rm"
    summary = train_reward_model(RewardConfig(model=setup["model"], data=setup["pairs"], output_dir=str(out),
                                              max_steps=4, eval_steps=0, save_steps=4, device="cpu", quantize=quantize))
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert json.loads((out / "adapter_config.json").read_text())["perlhf_quantization"] == quantize
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in weights.items())  # LoRA trained over the base


def _mapped_weight_files(model_dir: str) -> set[str]:
    root = str(Path(model_dir).resolve())
    with open("/proc/self/maps", encoding="utf-8") as handle:
        return {line.split()[-1] for line in handle if line.rstrip().endswith(".safetensors") and root in line}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_a_quantized_load_keeps_no_view_of_the_weights_file(setup, quantize):
    """The unquantized weights are copied out of the mapped file, so the pages read while quantizing go with the
    mapping (on the default model they were 405 MiB beside 159 MiB of 4-bit weights)."""
    import gc

    from perlhf.models import load_model

    plain = load_model(setup["model"], device="cpu", verbose=False)
    assert _mapped_weight_files(setup["model"])  # an fp32 model is served from the mapping: the check can see it
    del plain
    gc.collect()
    quantized = load_model(setup["model"], device="cpu", quantize=quantize, verbose=False)
    assert _mapped_weight_files(setup["model"]) == set()
    embedding = quantized.model.get_input_embeddings().weight
    assert embedding.dtype == torch.float32 and torch.isfinite(embedding).all()


def test_quantize_with_full_tuning_is_refused(setup):
    from perlhf.config import ConfigError
    from perlhf.reward import RewardConfig

    with pytest.raises(ConfigError, match="--quantize.*--full"):
        RewardConfig(model=setup["model"], data=setup["pairs"], full=True, quantize="4bit")


def test_a_reward_model_scores_as_on_the_base_it_was_trained_on(setup):
    """Loaded by default on its 4-bit base, it gives the validation margin its training run reported; loaded on an
    unquantized base it warns, and its scores move."""
    from perlhf.data import load_preferences
    from perlhf.reward import encode_records, evaluate, load_reward_model

    trained = json.loads((Path(setup["rm"]) / "eval_results.json").read_text())["final"]
    reward = load_reward_model(setup["rm"], device="cpu", verbose=False)
    assert "Linear4bit" in _bnb_layers(reward.body)
    records, _ = load_preferences(setup["pairs"])
    encoded, _ = encode_records(records, reward.tokenizer, reward.max_length)
    on_4bit = evaluate(reward, encoded, reward.tokenizer.pad_token_id, 8)["eval/margin"]

    with pytest.warns(UserWarning, match="trained on a 4bit base and is loaded on an unquantized base"):
        unquantized = load_reward_model(setup["rm"], device="cpu", verbose=False, quantize=None)
    on_fp32 = evaluate(unquantized, encoded, unquantized.tokenizer.pad_token_id, 8)["eval/margin"]
    assert abs(on_4bit - on_fp32) > 1e-4, "the quantization should change the scores of a tiny random model"

    # the training run's own validation figure, recomputed from the saved files on the recorded base
    from perlhf.data import split_train_validation
    from perlhf.reward import RewardConfig

    config = RewardConfig(model=setup["model"], data=setup["pairs"], device="cpu")
    _, validation = split_train_validation(load_preferences(setup["pairs"])[0], config.validation_fraction, config.seed)
    val, _ = encode_records(validation, reward.tokenizer, reward.max_length)
    assert evaluate(reward, val, reward.tokenizer.pad_token_id, 16)["eval/margin"] == pytest.approx(
        trained["eval/margin"], abs=1e-5)


def test_rl_on_a_4bit_backbone_serves_every_role_from_it(setup, tiny_tokenizer, tmp_path):
    """Policy, reference (the bare base), reward and value on one 4-bit backbone: the reward model trained on that
    base is one of its adapters and scores as `perlhf rm score` does; the policy adapter records the base."""
    from perlhf.models import load_model
    from perlhf.reward import load_reward_model
    from perlhf.rl.rollout import encode_prompts, generate, response_texts
    from perlhf.rl.trainer import Roles, train_policy

    config = tiny_rl_config(setup, tmp_path / "rl", quantize="4bit", algorithm="reinforce")
    loaded = load_model(setup["model"], device="cpu", quantize="4bit", verbose=False)
    roles = Roles(config, loaded, verbose=False)
    assert roles.shared_reward and roles.reward.body is roles.backbone.model
    prompts, _ = encode_prompts(tiny_tokenizer, PROMPTS, 64)
    with roles.backbone.role("policy"):
        rollout = generate(roles.backbone.model, tiny_tokenizer, prompts, 6, temperature=1.0, seeds=[1, 2, 3, 4])
    alone = load_reward_model(setup["rm"], device="cpu", verbose=False).score(PROMPTS, response_texts(tiny_tokenizer,
                                                                                                      rollout))
    assert roles.scores(rollout, PROMPTS).tolist() == pytest.approx(alone, abs=1e-5)
    with torch.no_grad():  # the update passes see the model that sampled (one bitsandbytes compute path)
        assert torch.equal(roles.policy_logprobs(rollout, train=True), roles.policy_logprobs(rollout, train=False))

    summary = train_policy(config)
    assert summary["iterations"] == config.max_steps
    policy = json.loads((tmp_path / "rl" / "policy" / "adapter_config.json").read_text())
    assert policy["perlhf_quantization"] == "4bit"


def test_rl_on_a_4bit_backbone_loads_an_unquantized_reward_model_apart(setup, tmp_path, capsys):
    """A reward model trained on the unquantized base cannot be a role of the 4-bit one without changing its
    scores: it is loaded as trained, as a separate model, and said so."""
    from perlhf.models import load_model
    from perlhf.reward import RewardConfig, train_reward_model
    from perlhf.rl.trainer import Roles

    rm = tmp_path / "rm-fp32"
    train_reward_model(RewardConfig(model=setup["model"], data=setup["pairs"], output_dir=str(rm), max_steps=2,
                                    eval_steps=0, save_steps=2, device="cpu"))
    config = tiny_rl_config({**setup, "rm": str(rm)}, tmp_path / "rl", quantize="4bit")
    roles = Roles(config, load_model(setup["model"], device="cpu", quantize="4bit", verbose=False))
    assert not roles.shared_reward
    assert not _bnb_layers(roles.reward.body)
    assert "quantized otherwise" in capsys.readouterr().out


def test_export_merge_of_an_adapter_trained_on_4bit_goes_into_the_dequantized_weights(setup, tmp_path):
    from perlhf.export import export_adapter
    from perlhf.rl.trainer import train_policy

    train_policy(tiny_rl_config(setup, tmp_path / "rl", quantize="4bit", max_steps=2, learning_rate=1e-2))
    result = export_adapter(tmp_path / "rl" / "policy", tmp_path / "merged", merge=True)
    check = result["verification"]
    assert result["trained_on"] == "4bit"
    assert check["max_abs_diff"] <= check["tolerance"] == 1e-4  # the merged file gives the 4-bit adapter's logits
    assert check["adapter_effect"] > 100 * check["max_abs_diff"]
    merged = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    assert all(t.dtype == torch.float32 for t in merged.values()) and not any("lora_" in k for k in merged)

    # the reward model trained on 4-bit merges the same way
    result = export_adapter(setup["rm"], tmp_path / "merged-rm", merge=True)
    assert result["verification"]["max_abs_diff"] <= 1e-4


def test_export_merge_of_an_8bit_adapter_is_refused_with_the_way_out(setup, tmp_path):
    from perlhf.export import ExportError, export_adapter
    from perlhf.reward import RewardConfig, train_reward_model

    rm = tmp_path / "rm8"
    train_reward_model(RewardConfig(model=setup["model"], data=setup["pairs"], output_dir=str(rm), max_steps=2,
                                    eval_steps=0, save_steps=2, device="cpu", quantize="8bit"))
    with pytest.raises(ExportError, match="8-bit.*Export the adapter alone"):
        export_adapter(rm, tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------------------------------------------
# Resume, signals and the guard on a quantized base


@pytest.fixture(scope="module")
def fault_inputs(tiny_model_dir, tmp_path_factory) -> dict:
    from conftest import write_resume_inputs

    root = tmp_path_factory.mktemp("quantized-faults")
    return {"model": tiny_model_dir, **write_resume_inputs(root), "root": root}


@pytest.mark.slow
def test_sigkill_of_4bit_runs_then_resume_is_bitwise_identical(fault_inputs, tmp_path):
    root = fault_inputs["root"]
    rm_reference, rl_reference = root / "rm-reference", root / "rl-reference"
    code, _, err = _cli(rm_argv(fault_inputs, rm_reference, "--quantize", "4bit"))
    assert code == 0, err[-3000:]
    code, _, err = _cli(rl_argv(fault_inputs, rm_reference, rl_reference) + ["--quantize", "4bit"])
    assert code == 0, err[-3000:]

    out = tmp_path / "rm"
    argv = rm_argv(fault_inputs, out, "--quantize", "4bit")
    code, _, err = _kill_at_step(argv, out, 7)
    assert code == -signal.SIGKILL, err[-2000:]
    code, text, err = _run(argv)
    assert code == 0 and "resuming" in text, err[-3000:]
    _assert_same_adapters(out, rm_reference)
    _assert_same_metrics(out, rm_reference)

    out = tmp_path / "rl"
    argv = rl_argv(fault_inputs, rm_reference, out) + ["--quantize", "4bit"]
    code, _, err = _kill_at_step(argv, out, 4)
    assert code == -signal.SIGKILL, err[-2000:]
    code, text, err = _run(argv)
    assert code == 0 and "resuming" in text, err[-3000:]
    _assert_same_adapters(out, rl_reference)


def test_non_finite_steps_on_a_4bit_base_are_skipped_and_counted(fault_inputs, tmp_path, monkeypatch):
    from perlhf.reward import train_reward_model

    _nan_loss_at(monkeypatch, steps={2, 4})
    with _one_thread():
        summary = train_reward_model(_rm_config(fault_inputs, tmp_path / "rm", quantize="4bit", max_steps=5))
    assert summary["steps"] == 5 and summary["skipped_steps"] == 2
    weights = load_file(str(tmp_path / "rm" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_sft_and_eval_run_on_the_4bit_base_the_policy_was_trained_on(setup, tmp_path, capsys):
    """SFT trains its adapter over a 4-bit base and records it; `perlhf eval` of a policy trained on 4-bit loads
    the base 4-bit without being told, and the run's reward model (trained on it) judges as a role of it."""
    from perlhf.evaluate import EvalConfig, evaluate_policy
    from perlhf.rl.trainer import train_policy
    from perlhf.sft import SFTConfig, train_sft

    sft = tmp_path / "sft"
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": "Sure! Lovely."}) + "\n"
                                                for p in PROMPTS * 5))
    train_sft(SFTConfig(model=setup["model"], data=str(tmp_path / "sft.jsonl"), output_dir=str(sft), max_steps=2,
                        eval_steps=0, save_steps=2, device="cpu", quantize="4bit"))
    assert json.loads((sft / "adapter_config.json").read_text())["perlhf_quantization"] == "4bit"

    train_policy(tiny_rl_config(setup, tmp_path / "rl", quantize="4bit", max_steps=1))
    capsys.readouterr()
    results = evaluate_policy(EvalConfig(policy=str(tmp_path / "rl"), prompts=setup["prompts"], num_prompts=4,
                                         max_new_tokens=4, device="cpu"))  # the run's reward model judges
    out = capsys.readouterr().out
    assert "4-bit NF4" in out and "trained on" not in out  # no mismatch warning printed or raised
    assert results
