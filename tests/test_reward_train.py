"""Reward-model training end to end on tiny random models: pairs, ratings, --full, reload, CLI, accelerate launch."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model
from perlhf.cli import main
from perlhf.reward import RewardConfig, encode_records, evaluate, load_reward_model, train_reward_model

TOPICS = ["cats", "dogs", "tea", "rain", "maps", "jazz", "bread", "trains"]


def write_pairs(path: Path, n: int = 160) -> Path:
    rng = random.Random(0)
    with path.open("w") as handle:
        for i in range(n):
            topic = rng.choice(TOPICS)
            handle.write(json.dumps({"prompt": f"Tell me about {topic}.", "chosen": f"Sure! {topic} are lovely.",
                                     "rejected": f"no {i % 7} go away"}) + "\n")
    return path


def write_ratings(path: Path, n: int = 160) -> Path:
    rng = random.Random(1)
    with path.open("w") as handle:
        for i in range(n):
            good = rng.random() < 0.5
            topic = rng.choice(TOPICS)
            reply = f"Sure! {topic} are lovely." if good else f"no {i % 7} go away"
            handle.write(json.dumps({"prompt": f"About {topic}?", "response": reply, "label": int(good)}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("rm")
    return {arch: save_tiny_model(arch, root / arch, tiny_tokenizer) for arch in ("llama", "gpt2", "qwen2")}


def config(model, data, out, **overrides) -> RewardConfig:
    values = dict(model=model, data=str(data), output_dir=str(out), max_steps=30, per_device_train_batch_size=8,
                  learning_rate=2e-3, eval_steps=15, save_steps=15, logging_steps=5, seed=0, device="cpu")
    values.update(overrides)
    return RewardConfig(**values)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_lora_pairs_learn_and_reload_gives_the_same_scores(arch, tiny_dirs, tmp_path):
    out = tmp_path / "rm"
    summary = train_reward_model(config(tiny_dirs[arch], write_pairs(tmp_path / "pairs.jsonl"), out))
    assert summary["final"]["eval/accuracy"] > 0.9
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_config.yaml", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert any((out / "tensorboard").iterdir())
    reloaded = load_reward_model(out, device="cpu", verbose=False)
    from perlhf.data import load_preferences
    from perlhf.training import load_split

    _, val = load_split(config(tiny_dirs[arch], tmp_path / "pairs.jsonl", out), load_preferences, None, verbose=False)
    examples, _ = encode_records(val, reloaded.tokenizer, reloaded.max_length)
    again = evaluate(reloaded, examples, reloaded.tokenizer.pad_token_id, 16)
    assert again["eval/margin"] == pytest.approx(summary["final"]["eval/margin"], abs=1e-5)
    assert again["eval/loss"] == pytest.approx(summary["final"]["eval/loss"], abs=1e-5)


def test_pointwise_ratings_train_with_bce(tiny_dirs, tmp_path):
    summary = train_reward_model(config(tiny_dirs["llama"], write_ratings(tmp_path / "r.jsonl"), tmp_path / "rm"))
    assert summary["kind"] == "pointwise"
    assert summary["final"]["eval/roc_auc"] > 0.9


def test_full_fine_tuning_trains_every_weight_and_reloads(tiny_dirs, tmp_path):
    out = tmp_path / "full"
    summary = train_reward_model(config(tiny_dirs["llama"], write_pairs(tmp_path / "p.jsonl"), out, full=True,
                                        learning_rate=1e-3))
    from transformers import AutoModelForCausalLM

    every = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).parameters())
    assert summary["trainable_parameters"] == every + 32  # every weight, and the head (hidden size 32)
    reloaded = load_reward_model(out, device="cpu", verbose=False)
    scores = reloaded.score(["Tell me about cats."] * 2, ["Sure! cats are lovely.", "no 3 go away"])
    assert scores[0] > scores[1]


def test_cli_train_eval_score(tiny_dirs, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "rm"
    assert main(["rm", "train", "--model", tiny_dirs["llama"], "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "20", "--learning-rate", "2e-3", "--eval-steps", "0", "--device", "cpu"]) == 0
    assert main(["rm", "eval", "--rm", str(out), "--data", str(data), "--limit", "40", "--output",
                 str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["eval/accuracy"] > 0.9
    capsys.readouterr()
    assert main(["rm", "score", "--rm", str(out), "--prompt", "Tell me about tea.", "--response", "Sure! tea are lovely."]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(line["score"], float)


def test_yaml_config_and_flag_precedence(tiny_dirs, tmp_path):
    import argparse

    from perlhf import config as cfg

    (tmp_path / "c.yaml").write_text(f"model: {tiny_dirs['llama']}\ndata: x.jsonl\nlora-rank: 4\nmax_steps: 7\n")
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, RewardConfig)
    built = cfg.build(RewardConfig, parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--max-steps", "9"]))
    assert (built.lora_rank, built.max_steps, built.data) == (4, 9, "x.jsonl")


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_dirs, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "rm"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "perlhf.cli", "rm", "train", "--model",
         tiny_dirs["llama"], "--data", str(data), "--output-dir", str(out), "--max-steps", "10",
         "--per-device-train-batch-size", "4", "--learning-rate", "2e-3", "--eval-steps", "5", "--save-steps", "5"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    from perlhf.data import load_preferences
    from perlhf.training import load_split

    _, val = load_split(RewardConfig(data=str(data)), load_preferences, None, verbose=False)
    # both processes evaluated their shard and the gathered metrics cover every validation pair once
    assert results["steps"] == 10 and results["validation_examples"] == results["final"]["eval/examples"] == len(val)
    assert (out / "adapter_model.safetensors").exists()


def test_the_head_trains_at_its_own_learning_rate(tiny_dirs, tmp_path):
    """--head-learning-rate: the head is its own AdamW group, at its own rate, kept through a resume."""
    out = tmp_path / "rm"
    options = dict(learning_rate=1e-4, head_learning_rate=3e-2, lr_scheduler_type="constant", warmup_ratio=0.0)
    train_reward_model(config(tiny_dirs["llama"], write_pairs(tmp_path / "p.jsonl"), out, **options))
    state = torch.load(next((out / "checkpoints").glob("*")) / "training_state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-4, 3e-2]
    assert len(groups[1]["params"]) == 1  # the head's weight alone
