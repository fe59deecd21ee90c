"""Shared fixtures: a tiny byte-level tokenizer and tiny random causal LMs of several architectures, built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The suite's models are tiny: on a 2-core machine a second intra-op thread costs more than it gives.
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("PERLHF_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level vocabulary (256 symbols) plus specials: any text encodes, no training needed.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# Families for the conformance suite: GPT-2 keeps its default dropout of 0.1 (embeddings, attention, residual),
# Gemma-2 soft-caps its logits (a cap of 2 makes it matter for tiny random weights), Cohere scales them.
ARCHITECTURES = ("llama", "qwen2", "gpt2", "gemma2", "cohere")


def make_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import (AutoModelForCausalLM, CohereConfig, Gemma2Config, GPT2Config, LlamaConfig,
                              Qwen2Config)

    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True)
    elif arch == "qwen2":
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                            bos_token_id=vocab_size - 3, eos_token_id=vocab_size - 1)
    elif arch == "gemma2":
        config = Gemma2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                              final_logit_softcapping=2.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=8,
                              attn_implementation="eager")
    elif arch == "cohere":
        config = CohereConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              logit_scale=4.0, pad_token_id=vocab_size - 3, bos_token_id=vocab_size - 3,
                              eos_token_id=vocab_size - 1)
    else:
        raise ValueError(arch)
    config.pad_token_id = vocab_size - 3
    config.eos_token_id = vocab_size - 1
    config.bos_token_id = vocab_size - 3
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["llama"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer):
    """A saved tiny random model directory, loadable by `--model DIR`."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    make_model(request.param, len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_model(arch: str, path: Path, tokenizer) -> str:
    make_model(arch, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_rl_setup(root: Path, arch: str, tokenizer, prompts: list[str], pairs: int, rm_steps: int = 0,
                  **rm_options) -> dict:
    """The RL tests' inputs in `root`: a tiny `arch` model, `pairs` preference pairs over `prompts` ("Sure!
    Lovely." preferred to "no i"), a prompts.txt and, with rm_steps > 0, a LoRA reward model trained on them."""
    import json

    from perlhf.reward import RewardConfig, train_reward_model

    model = save_tiny_model(arch, root / arch, tokenizer)
    (root / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": prompts[i % len(prompts)], "chosen": "Sure! Lovely.", "rejected": f"no {i}"}) + "\n"
        for i in range(pairs)))
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = {"arch": arch, "root": root, "model": model, "pairs": str(root / "pairs.jsonl"),
           "prompts": str(root / "prompts.txt")}
    if rm_steps:
        train_reward_model(RewardConfig(model=model, data=out["pairs"], output_dir=str(root / "rm"), max_steps=rm_steps,
                                        eval_steps=0, save_steps=rm_steps, device="cpu", **rm_options))
        out["rm"] = str(root / "rm")
    return out


def tiny_rl_config(setup: dict, out, **overrides):
    """An RLConfig on a `tiny_rl_setup`: 3 iterations of 4 prompts, 6 new tokens, on CPU."""
    from perlhf.rl.trainer import RLConfig

    values = dict(model=setup["model"], reward_model=setup["rm"], prompts=setup["prompts"], output_dir=str(out),
                  max_steps=3, batch_size=4, max_new_tokens=6, save_steps=2, device="cpu", seed=0)
    return RLConfig(**{**values, **overrides})


def write_resume_inputs(root: Path) -> dict:
    """The data of the kill-and-resume runs (tests/test_faults.py, benchmarks/fault_injection.py): ~100 explicit
    preference pairs and 24 prompts."""
    import json
    import random

    rng = random.Random(0)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for i in range(100):
            handle.write(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
                                     "rejected": f"Maybe {rng.randint(0, 999)} or so, I am not sure at all"}) + "\n")
    (root / "prompts.txt").write_text("".join(f"Tell me something about the number {i}\n" for i in range(24)),
                                      encoding="utf-8")
    return {"pairs": str(root / "pairs.jsonl"), "prompts": str(root / "prompts.txt")}


def resume_run_env(repo: Path) -> dict:
    """Environment of a kill-and-resume subprocess. One thread: CPU kernels then reduce in one fixed order, so
    runs repeat bit for bit; unbuffered, so what a killed run printed is not lost."""
    return {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
