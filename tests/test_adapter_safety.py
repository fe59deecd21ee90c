"""Adapters must not write into the shared frozen base, and trained heads keep fp32 weights over a bf16 base."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import make_model
from perlhf.backbone import Backbone, lora_config, new_head


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    # A loaded adapter wraps the base's layers (`q_proj` -> `q_proj.base_layer` + `lora_*`): compare the base's own.
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"base weights changed: {changed[:3]}"


def peft_adapter(tokenizer, directory, **lora) -> None:
    """A real PEFT adapter saved by PEFT, with every saved weight moved away from the base's."""
    model = get_peft_model(make_model("qwen2", len(tokenizer)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **lora))
    with torch.no_grad():  # as if trained: the saved lm_head copy / token rows differ from the base
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    model.save_pretrained(directory)


@pytest.mark.parametrize("lora, field", [({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
                                         ({"trainable_token_indices": [5, 6]}, "trainable_token_indices")])
def test_adapters_training_base_modules_are_refused_and_the_base_is_untouched(tiny_tokenizer, tmp_path, lora, field):
    peft_adapter(tiny_tokenizer, tmp_path / "sft", **lora)
    base = make_model("qwen2", len(tiny_tokenizer))
    before = base_weights(base)
    with pytest.raises(ValueError) as err:
        Backbone(base).load_adapter("policy", tmp_path / "sft", trainable=True)
    message = str(err.value)
    assert str(tmp_path / "sft") in message and field in message
    assert "perlhf export" in message and "--merge" in message and "--model" in message
    assert_unchanged(base, before)


def test_non_lora_weights_are_refused_even_when_the_config_does_not_say(tiny_tokenizer, tmp_path):
    peft_adapter(tiny_tokenizer, tmp_path / "sft", modules_to_save=["lm_head"])
    config_path = tmp_path / "sft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["modules_to_save"] = None
    config_path.write_text(json.dumps(config))
    base = make_model("qwen2", len(tiny_tokenizer))
    before = base_weights(base)
    with pytest.raises(ValueError, match=r"not LoRA weights, e\.g\. base_model\.model\.lm_head\.weight") as err:
        Backbone(base).load_adapter("policy", tmp_path / "sft", trainable=True)
    assert str(tmp_path / "sft") in str(err.value) and "--merge" in str(err.value)
    assert_unchanged(base, before)


def test_reward_adapters_with_their_head_still_load(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    # perlhf's own format: modules_to_save ["score"], task_type SEQ_CLS, the head under HEAD_KEY.
    source = make_model("llama", len(tiny_tokenizer))
    trained = Backbone.with_adapter(source, "reward", lora_config(source, 4, 8, 0.0, "attention"))
    trained.heads["reward"] = new_head(source)
    trained.save_adapter("reward", tmp_path / "rm")
    # PEFT's own sequence-classification adapter: modules_to_save ["classifier", "score"].
    config = make_model("llama", len(tiny_tokenizer)).config
    config.num_labels = 1
    classifier = AutoModelForSequenceClassification.from_config(config)
    get_peft_model(classifier, LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS")).save_pretrained(
        tmp_path / "peft-rm")
    assert json.loads((tmp_path / "peft-rm" / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier", "score"]

    base = make_model("llama", len(tiny_tokenizer))
    before = base_weights(base)
    backbone = Backbone(base)
    backbone.load_adapter("reward", tmp_path / "rm", trainable=False)
    backbone.load_adapter("other", tmp_path / "peft-rm", trainable=False)
    assert torch.equal(backbone.heads["reward"].weight, trained.heads["reward"].weight)
    assert backbone.heads["other"].weight.shape == classifier.score.weight.shape
    assert_unchanged(base, before)


def test_the_reward_head_trains_in_fp32_over_a_bf16_base(tiny_model_dir):
    from perlhf.data import encode_example
    from perlhf.models import load_model
    from perlhf.reward import RewardConfig, build_reward_model, pad_right, pointwise_loss

    loaded = load_model(tiny_model_dir, device="cpu", dtype="bfloat16", verbose=False)
    reward = build_reward_model(RewardConfig(model=tiny_model_dir, data="unused"), loaded)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    trainable = {name: p for name, p in reward.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable) and any(name.startswith("head.") for name in trainable)
    assert {name: p.dtype for name, p in trainable.items() if p.dtype != torch.float32} == {}

    # bf16 spacing near the head's weights (~0.2) is ~1e-3: a bf16 head would round a 2e-4 AdamW step away.
    head_before = reward.head.weight.detach().clone()
    optimizer = torch.optim.AdamW(trainable.values(), lr=2e-4, weight_decay=0.0)
    example = encode_example(loaded.tokenizer, "Q: hi", "ok", 16)
    ids, mask = pad_right([example.input_ids], loaded.tokenizer.pad_token_id, "cpu")
    pointwise_loss(reward(ids, mask), torch.ones(1)).backward()
    optimizer.step()
    assert bool((reward.head.weight != head_before).all())
