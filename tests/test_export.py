"""`perlhf export`: adapter-only and merged exports load in plain transformers/PEFT, and a fake merge is caught."""

import argparse
import json

import pytest
import torch
from safetensors import safe_open

from conftest import make_model, make_tokenizer, save_tiny_model
from perlhf.backbone import Backbone, lora_config, new_head
from perlhf.export import ExportError, export_adapter, register_cli

IDS = torch.tensor([[60, 61, 62, 63, 64, 258], [70, 71, 258, 256, 256, 256]])  # two replies ending in eos, padded
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])


def make_adapter(tmp_path, arch: str, role: str, tokenizer=None) -> tuple[str, str]:
    """A saved tiny base and a policy or reward adapter for it with non-zero LoRA B (so merging changes weights)."""
    tokenizer = tokenizer or make_tokenizer()
    base_dir = save_tiny_model(arch, tmp_path / f"base-{arch}", tokenizer)
    base = make_model(arch, len(tokenizer))
    backbone = Backbone.with_adapter(base, role, lora_config(base, 4, 8, 0.0, "attention"))
    if role == "reward":
        backbone.heads[role] = new_head(base)
    generator = torch.Generator().manual_seed(1)
    for name, p in backbone.model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.3
    adapter_dir = tmp_path / f"{role}-{arch}"
    backbone.save_adapter(role, adapter_dir, {"base_model_name_or_path": base_dir, "perlhf_max_length": 64})
    return str(adapter_dir), base_dir


def saved_keys(directory) -> list[str]:
    keys = []
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys += list(handle.keys())
    return keys


def adapter_logits(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def test_adapter_only_export_loads_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, base_dir = make_adapter(tmp_path, "llama", "policy")
    out = tmp_path / "export"
    result = export_adapter(adapter_dir, out)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(result["files"])
    assert result["verification"]["tensors_loaded"] > 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base_dir

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    with torch.no_grad():
        got = model(input_ids=IDS, attention_mask=MASK).logits
    assert torch.allclose(got, adapter_logits(base_dir, adapter_dir), atol=1e-6)
    assert len(AutoTokenizer.from_pretrained(out)) == len(make_tokenizer())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_causal_lm_matches_the_adapter_model(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    adapter_dir, base_dir = make_adapter(tmp_path, arch, "policy")
    out = tmp_path / "merged"
    result = export_adapter(adapter_dir, out, merge=True)
    check = result["verification"]
    assert check["max_abs_diff"] <= 1e-4 < check["adapter_effect"]
    assert check["weights_changed"] == check["weights_checked"] > 0
    assert not any("lora_" in k for k in saved_keys(out)) and not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # independently of the export's own check
    with torch.no_grad():
        got = merged(input_ids=IDS, attention_mask=MASK).logits
    expected = adapter_logits(base_dir, adapter_dir)
    assert (got - expected)[MASK.bool()].abs().max() <= 1e-4


def test_merged_bfloat16_export_is_verified_against_its_own_rounding(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, "llama", "policy")
    result = export_adapter(adapter_dir, tmp_path / "bf16", merge=True, dtype="bfloat16")
    assert result["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    check = result["verification"]
    assert check["merge_max_abs_diff"] <= 1e-4 and check["disk_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_merged_reward_model_scores_like_perlhf(tmp_path, pad_is_eos):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from perlhf.reward import load_reward_model

    tokenizer = make_tokenizer()
    if pad_is_eos:  # like SmolLM2: transformers would then score the token before the final eos
        tokenizer.pad_token = tokenizer.eos_token
    adapter_dir, _ = make_adapter(tmp_path, "llama", "reward", tokenizer)
    out = tmp_path / "merged-rm"
    result = export_adapter(adapter_dir, out, merge=True)
    assert result["verification"]["max_abs_diff"] <= 1e-4

    exported_tokenizer = AutoTokenizer.from_pretrained(out)
    assert exported_tokenizer.pad_token_id != exported_tokenizer.eos_token_id
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == exported_tokenizer.pad_token_id
    ids = IDS.masked_fill(MASK == 0, exported_tokenizer.pad_token_id)
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=MASK).logits.squeeze(-1)
        expected = load_reward_model(adapter_dir, device="cpu", dtype="float32", verbose=False)(IDS, MASK)
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("fake", ["bare base", "lora layers left in"])
def test_a_merge_that_did_not_merge_is_caught(tmp_path, monkeypatch, fake):
    from peft.tuners.lora import LoraModel

    adapter_dir, _ = make_adapter(tmp_path, "llama", "policy")
    if fake == "bare base":
        monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kwargs: self.unload())
        expected = "differs from the adapter model"
    else:
        monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kwargs: self.model)
        expected = "still holds .* LoRA tensors"
    out = tmp_path / "merged"
    with pytest.raises(ExportError, match=expected):
        export_adapter(adapter_dir, out, merge=True)
    assert not out.exists() and not (tmp_path / "merged.partial").exists()


def test_command_line_refuses_bad_input_and_overwrites_when_asked(tmp_path, capsys):
    adapter_dir, _ = make_adapter(tmp_path, "llama", "policy")
    parser = argparse.ArgumentParser()
    register_cli(parser)

    def run(*argv):
        args = parser.parse_args(list(argv))
        return args.run(args)

    (tmp_path / "empty").mkdir()
    assert run("--adapter", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "x")) == 1
    assert "adapter_config.json is missing" in capsys.readouterr().err

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run("--adapter", adapter_dir, "--output-dir", str(out)) == 1
    assert "not empty; pass --overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()

    assert run("--adapter", adapter_dir, "--output-dir", str(out), "--overwrite") == 0
    assert "verified" in capsys.readouterr().out
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()

    with pytest.raises(ExportError, match="would hold or replace"):
        export_adapter(adapter_dir, tmp_path, overwrite=True)
