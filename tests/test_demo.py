"""The demo pipeline end to end on a tiny model, and the simulated human's preference by hand."""

import json

import pytest

from conftest import save_tiny_model
from perlhf.demo import DemoConfig, demo_prompts, gold_preference, run_demo
from perlhf.metrics import read_metrics


def test_gold_preference_by_hand():
    prompt = [{"role": "user", "content": "How can I cook rice?"}]
    # finished (+1), 5 words (neither too long nor too short), uses 'cook' and 'rice' (2 of 2 topic words: +0.5)
    assert gold_preference(prompt, "Rinse rice, then cook it.") == pytest.approx(1.5)
    # cut off: no +1; on-topic half (rice only): 0.5 * 0.5
    assert gold_preference(prompt, "Rice is a grain that") == pytest.approx(0.25)
    # 40 words, finished, off-topic: 1 - 0.03 * (40 - 15)
    assert gold_preference(prompt, " ".join(["word"] * 40) + ".") == pytest.approx(0.25)
    # one word is too short to help: 1 - 0.5 + 0.25
    assert gold_preference(prompt, "Rice.") == pytest.approx(0.75)
    # two rude phrases: 1 + 0.25 - 2
    assert gold_preference(prompt, "Shut up, rice is stupid.") == pytest.approx(-0.75)
    assert gold_preference(prompt, "   ") == -2.0


def test_demo_prompts_are_ours_and_distinct():
    prompts = demo_prompts()
    assert len(prompts) == len(set(prompts)) >= 200


def test_demo_runs_every_stage_on_a_tiny_model(tmp_path, tiny_tokenizer, monkeypatch):
    import perlhf.demo

    # A random tiny model writes random bytes, which the gold judge mostly scores as ties; a judge that
    # separates any two texts keeps enough pairs to exercise every stage (the gold judge is tested above).
    monkeypatch.setattr(perlhf.demo, "gold_preference", lambda prompt, response: len(response.strip()))
    model = save_tiny_model("llama", tmp_path / "tiny", tiny_tokenizer)
    run = tmp_path / "demo"
    evaluation = run_demo(DemoConfig(model=model, quick=True, output_dir=str(run), device="cpu"))
    assert set(evaluation["judges"]) == {"reward_model", "gold"}
    assert 0.0 <= evaluation["judges"]["gold"]["win_rate"] <= 1.0
    assert (run / "report" / "index.html").exists() and (run / "report" / "win_rate.png").exists()
    assert (run / "export" / "policy_adapter" / "adapter_model.safetensors").exists()
    assert (run / "export" / "reward_adapter" / "adapter_model.safetensors").exists()
    saved = json.loads((run / "evaluation.json").read_text())
    assert saved["reward_model_accuracy"] is not None and saved["prompts"] == 16
    pairs = json.loads((run / "data" / "pairs.json").read_text())
    # 4 samples per prompt give 6 comparisons each: every one is a pair or a counted tie
    assert pairs["pairs"] + pairs["ties_skipped"] == 32 * 6
    assert sum(1 for _ in (run / "data" / "pairs.jsonl").open()) == pairs["pairs"]


def test_demo_with_sft_starts_every_later_stage_from_the_sft_anchor(tmp_path, tiny_tokenizer, monkeypatch):
    import perlhf.demo
    from perlhf.demo import TIPS

    monkeypatch.setattr(perlhf.demo, "gold_preference", lambda prompt, response: len(response.strip()))
    model = save_tiny_model("llama", tmp_path / "tiny", tiny_tokenizer)
    run = tmp_path / "demo"
    evaluation = run_demo(DemoConfig(model=model, quick=True, sft=True, output_dir=str(run), device="cpu"))
    sft_records = [json.loads(line) for line in (run / "data" / "sft.jsonl").open()]
    assert {r["completion"] for r in sft_records} <= set(TIPS.values())  # perlhf's own text, nothing else
    held_out = {json.loads(line)["prompt"][0]["content"] for line in (run / "data" / "eval_prompts.jsonl").open()}
    assert not held_out & {r["prompt"][0]["content"] for r in sft_records}
    assert (run / "sft" / "adapter_model.safetensors").exists() and evaluation["sft_validation_loss"] > 0
    assert evaluation["anchor"] == "anchor"  # evaluated against the SFT adapter
    assert read_metrics(run / "policy_run")[0]["reward/kl"] == 0.0  # RL started from it, its frozen copy the reference
    assert "SFT anchor" in (run / "report" / "index.html").read_text()
