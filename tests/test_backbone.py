"""One backbone, several roles: switching, reference semantics, and the saved adapter format."""

import pytest
import torch

from conftest import make_model
from perlhf.backbone import Backbone, attention_target_modules, lora_config, new_head


def randomize(backbone: Backbone, name: str, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter == identity); give the adapter real weights so roles differ."""
    generator = torch.Generator().manual_seed(seed)
    for pname, p in backbone.model.named_parameters():
        if f".{name}." in pname and "lora_" in pname:
            p.data = torch.randn(p.shape, generator=generator) * 0.5


@pytest.fixture()
def backbone(tiny_tokenizer):
    base = make_model("llama", len(tiny_tokenizer))
    bb = Backbone.with_adapter(base, "policy", lora_config(base, 4, 8, 0.0, "attention"))
    bb.add_adapter("reward", lora_config(base, 4, 8, 0.0, "attention"), trainable=False)
    bb.heads["reward"] = new_head(base)
    randomize(bb, "policy", 1)
    randomize(bb, "reward", 2)
    return bb


def logits(bb, role):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), bb.role(role):
        return bb.model(input_ids=ids).logits


def test_attention_targets_per_architecture(tiny_tokenizer):
    assert attention_target_modules(make_model("llama", 259)) == [
        "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert attention_target_modules(make_model("gpt2", 259)) == ["attn.c_attn", "attn.c_proj"]
    assert "self_attn.q_proj" in attention_target_modules(make_model("qwen2", 259))


def test_roles_differ_and_reference_is_the_bare_backbone(backbone, tiny_tokenizer):
    policy, reward, bare = logits(backbone, "policy"), logits(backbone, "reward"), logits(backbone, None)
    assert not torch.allclose(policy, reward) and not torch.allclose(policy, bare)
    fresh = make_model("llama", len(tiny_tokenizer))  # same seed -> same base weights
    with torch.no_grad():
        assert torch.allclose(bare, fresh(input_ids=torch.tensor([[5, 6, 7, 8]])).logits, atol=1e-6)


def test_role_restores_adapter_mode_and_trainable_flags_even_on_error(backbone):
    backbone.model.set_adapter("policy")
    backbone.model.train()
    flags = {n: p.requires_grad for n, p in backbone.model.named_parameters()}
    with pytest.raises(RuntimeError):
        with backbone.role("reward"):
            assert backbone.model.active_adapter == "reward" and not backbone.model.training
            raise RuntimeError("boom")
    assert backbone.model.active_adapter == "policy" and backbone.model.training
    assert flags == {n: p.requires_grad for n, p in backbone.model.named_parameters()}
    assert any(p.requires_grad for n, p in backbone.model.named_parameters() if ".policy." in n)
    assert not any(p.requires_grad for n, p in backbone.model.named_parameters() if ".reward." in n)


def test_copy_adapter_is_frozen_and_independent(backbone):
    backbone.copy_adapter("policy", "reference", trainable=False)
    assert torch.allclose(logits(backbone, "reference"), logits(backbone, "policy"))
    randomize(backbone, "policy", 9)  # training moves the policy; the reference stays where it started
    assert not torch.allclose(logits(backbone, "reference"), logits(backbone, "policy"))
    assert not any(p.requires_grad for n, p in backbone.model.named_parameters() if ".reference." in n)


def test_saved_reward_adapter_loads_back_and_in_transformers_sequence_classification(backbone, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 256, 256]])
    mask = (ids != 256).long()
    with torch.no_grad(), backbone.role("reward"):
        expected = backbone.scores("reward", ids, mask)
    backbone.save_adapter("reward", tmp_path / "rm")

    base_dir = tmp_path / "base"
    make_model("llama", len(tiny_tokenizer)).save_pretrained(base_dir)
    again = Backbone(make_model("llama", len(tiny_tokenizer)))
    again.load_adapter("reward", tmp_path / "rm", trainable=False)
    with torch.no_grad(), again.role("reward"):
        assert torch.allclose(again.scores("reward", ids, mask), expected, atol=1e-5)

    classifier = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    classifier.config.pad_token_id = 256
    classifier = PeftModel.from_pretrained(classifier, tmp_path / "rm").eval()
    with torch.no_grad():
        hf_scores = classifier(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(hf_scores, expected, atol=1e-5)
