"""`perlhf sft train`: data formats, the loss on the replies only, resume, --full, and RL from the SFT anchor."""

import json

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from conftest import make_model, save_tiny_model, tiny_rl_config, tiny_rl_setup
from perlhf.cli import main as cli_main
from perlhf.data import SFTExample, encode_sft, load_sft
from perlhf.metrics import read_metrics
from perlhf.sft import SFTConfig, target_loss, train_sft

PROMPTS = ["Tell me about cats.", "Tell me about dogs.", "What is tea?", "Why does it rain?", "Read a map.",
           "Play some jazz.", "Bake bread.", "Ride a train."]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("sft")
    model = save_tiny_model("llama", root / "llama", tiny_tokenizer)
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": PROMPTS[i % 8] + f" ({i})", "completion": "Sure! Lovely."}) + "\n"
                            for i in range(48)))
    return {"root": root, "model": model, "data": str(data)}


def sft_config(inputs, out, **overrides) -> SFTConfig:
    values = dict(model=inputs["model"], data=inputs["data"], output_dir=str(out), max_steps=6,
                  per_device_train_batch_size=4, learning_rate=5e-3, eval_steps=2, save_steps=2, logging_steps=1,
                  lr_scheduler_type="constant", warmup_ratio=0.0, device="cpu")
    return SFTConfig(**{**values, **overrides})


def test_the_formats_and_their_targets(tmp_path, tiny_tokenizer):
    records = [
        {"prompt": "Hi", "completion": "Hello!"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        {"text": "All of this."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Good day.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
        {"prompt": "Hi", "completion": ""},  # rejected: counted, never silently dropped
    ]
    for record in records:  # one file per format: a file holds one format
        (tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl").write_text(json.dumps(record) + "\n")
    targets = []
    for path in sorted(tmp_path.iterdir())[:4]:
        examples, report = load_sft(str(path))
        assert report.kept == 1
        ids, mask, _ = encode_sft(tiny_tokenizer, examples[0], 128)
        targets.append(tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m]))
    assert targets == ["Hello!<|im_end|>", "b<|im_end|>\nd<|im_end|>\n", "All of this.<|im_end|>", "Good day.<|im_end|>"]
    with pytest.raises(Exception, match="all 1 records were rejected"):
        load_sft(str(sorted(tmp_path.iterdir())[4]))
    ids, mask, _ = encode_sft(tiny_tokenizer, SFTExample("Hi", "Hello!", "x"), 128, train_on_prompt=True)
    assert all(mask)  # --train-on-prompt: every token is a target


def test_the_loss_is_the_cross_entropy_of_the_target_tokens_only(tiny_tokenizer):
    model = make_model("llama", len(tiny_tokenizer)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    targets = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]).bool()
    with torch.no_grad():
        total, count = target_loss(model, ids, mask, targets)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    by_hand = -sum(logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 5) if targets[b, t])
    assert count.item() == 5 and total.item() == pytest.approx(by_hand.item(), abs=1e-4)


def test_sft_learns_the_replies_and_resumes_exactly(inputs, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from perlhf.data import split_train_validation
    from perlhf.sft import collate, encode

    full_run = tmp_path / "six"
    config = sft_config(inputs, full_run, learning_rate=2e-2, lora_target="all-linear")
    summary = train_sft(config)
    evals = [m["eval/loss"] for m in read_metrics(full_run) if "eval/loss" in m]
    # the same validation targets under the untouched model
    validation = split_train_validation(load_sft(inputs["data"])[0], config.validation_fraction, config.seed)[1]
    with torch.no_grad():
        total, count = target_loss(AutoModelForCausalLM.from_pretrained(inputs["model"]).eval(),
                                   *collate(encode(validation, tiny_tokenizer, config)[0], 256, "cpu"))
    # LoRA learns slowly on a tiny random model (its tied embeddings are tiny); the --full test shows a large drop.
    # Untrained, the adapter is the identity (B = 0), so no learning leaves the loss at the base's; six steps took
    # it 0.18 to over 0.2 nats below in three draws of the run's random numbers (2026-12-02)
    assert evals[-1] < total.item() / count.item() - 0.1, (evals, total.item() / count.item())
    assert summary["best"]["eval/loss"] == min(evals) and (full_run / "best" / "adapter_model.safetensors").exists()
    assert "train/padding_share" in read_metrics(full_run)[0]
    # stop after 4 steps, then resume to 6: the same adapter as the uninterrupted run, bitwise
    part = tmp_path / "four-then-six"
    train_sft(sft_config(inputs, part, learning_rate=2e-2, lora_target="all-linear", max_steps=4))
    train_sft(sft_config(inputs, part, learning_rate=2e-2, lora_target="all-linear", max_steps=6))
    a, b = load_file(str(full_run / "adapter_model.safetensors")), load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_sft_writes_a_model_to_train_from(inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert cli_main(["sft", "train", "--model", inputs["model"], "--data", inputs["data"], "--output-dir", str(out),
                     "--full", "--max-steps", "6", "--per-device-train-batch-size", "4", "--eval-steps", "1",
                     "--learning-rate", "1e-2", "--lr-scheduler-type", "constant", "--device", "cpu"]) == 0
    evals = [m["eval/loss"] for m in read_metrics(out) if "eval/loss" in m]
    assert evals[-1] < 0.7 * evals[0]
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(inputs["model"])
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), base.parameters()))


def test_rl_from_the_sft_adapter_starts_at_kl_zero_and_keeps_the_reference(inputs, tmp_path, tiny_tokenizer,
                                                                           monkeypatch):
    """RL from `--policy-adapter RUN/sft`: the reference is a frozen copy of the SFT adapter, so the first KL is
    exactly 0 and the reference is bitwise the SFT adapter after training; `perlhf eval` compares with it."""
    from perlhf.evaluate import EvalConfig, evaluate_policy
    from perlhf.rl import trainer

    sft = tmp_path / "sft"
    train_sft(sft_config(inputs, sft, max_steps=4))
    setup = tiny_rl_setup(tmp_path / "rl-inputs", "llama", tiny_tokenizer, PROMPTS, pairs=32, rm_steps=2)
    built, roles = [], trainer.Roles

    class Recorded(roles):  # the real roles, kept for a look at the reference after training
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(trainer, "Roles", Recorded)
    run = tmp_path / "rl"
    trainer.train_policy(tiny_rl_config(setup, run, model=inputs["model"], policy_adapter=str(sft),
                                        learning_rate=1e-2))
    metrics = read_metrics(run)
    assert metrics[0]["reward/kl"] == 0.0 and metrics[-1]["reward/kl"] != 0.0
    reference = get_peft_model_state_dict(built[0].backbone.model, adapter_name="reference")
    saved = load_file(str(sft / "adapter_model.safetensors"))
    assert reference.keys() == saved.keys() and all(torch.equal(reference[k], saved[k]) for k in saved)
    results = evaluate_policy(EvalConfig(policy=str(run), prompts=setup["prompts"], num_prompts=4, max_new_tokens=4,
                                         device="cpu"))
    assert results["anchor"] == "anchor"  # the SFT adapter, not the bare backbone
