"""Prompts encoded as their tokenizer and template define them: one leading BOS where the model wants one, never
an EOS inside the prompt, and the BOS kept when a long prompt is cut from the left."""

import pytest
from tokenizers import processors

from conftest import make_tokenizer
from perlhf.data import cut_prompt_left, encode_example, prompt_token_ids

CHAT = [{"role": "user", "content": "hi"}]


def llama_like(single: str = "<s> $A"):
    """The conftest byte-level tokenizer with a BOS its post-processor adds, as Llama, Mistral and Gemma do."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", tokenizer.bos_token_id), ("<|im_end|>", tokenizer.eos_token_id)])
    return tokenizer


def test_plain_prompts_get_exactly_one_leading_bos():
    tokenizer = llama_like()
    bos, text = tokenizer.bos_token_id, tokenizer.encode("Q: hi", add_special_tokens=False)
    assert tokenizer("x")["input_ids"][0] == bos  # the tokenizer itself adds one: so must perlhf
    assert prompt_token_ids(tokenizer, "Q: hi") == [bos] + text
    assert prompt_token_ids(tokenizer, "<s>Q: hi") == [bos] + text  # a prompt written with its BOS keeps one
    example = encode_example(tokenizer, "Q: hi", "ok", max_length=32)
    assert example.input_ids == [bos] + text + tokenizer.encode("ok", add_special_tokens=False) + [
        tokenizer.eos_token_id]
    assert example.response_start == 1 + len(text) and example.input_ids.count(bos) == 1


def test_a_chat_template_writing_the_bos_gives_exactly_one():
    tokenizer = llama_like()
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    ids = prompt_token_ids(tokenizer, CHAT)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert encode_example(tokenizer, CHAT, "ok", 64).input_ids.count(tokenizer.bos_token_id) == 1


def test_a_tokenizer_without_bos_is_unchanged(tiny_tokenizer):
    assert tiny_tokenizer.bos_token_id is None
    for prompt in ("Q: hi", CHAT):
        rendered = prompt if isinstance(prompt, str) else tiny_tokenizer.apply_chat_template(
            CHAT, add_generation_prompt=True, tokenize=False)
        assert prompt_token_ids(tiny_tokenizer, prompt) == tiny_tokenizer.encode(rendered, add_special_tokens=False)


def test_an_eos_the_tokenizer_appends_stays_out_of_the_prompt():
    for single in ("<s> $A <|im_end|>", "$A <|im_end|>"):
        tokenizer = llama_like(single)
        eos = tokenizer.eos_token_id
        assert tokenizer("x")["input_ids"][-1] == eos
        assert prompt_token_ids(tokenizer, "Q: hi") == tokenizer("Q: hi")["input_ids"][:-1]  # all but the EOS
        example = encode_example(tokenizer, "Q: hi", "ok", 32)
        assert eos not in example.input_ids[:example.response_start] and example.input_ids[-1] == eos


def test_cutting_a_long_prompt_keeps_its_bos():
    tokenizer = llama_like()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text = tokenizer.encode("Q: hello there", add_special_tokens=False)
    ok = tokenizer.encode("ok", add_special_tokens=False)
    example = encode_example(tokenizer, "Q: hello there", "ok", max_length=8)
    assert example.truncated and example.input_ids == [bos] + text[-4:] + ok + [eos]
    assert example.response_start == 5
    # No room for the prompt at all: the BOS is the one prompt token kept, the response is cut from the right.
    assert encode_example(tokenizer, "Q: hi", "abcdef", max_length=4).input_ids == [bos] + tokenizer.encode(
        "abc", add_special_tokens=False)


def test_cut_prompt_left():
    assert cut_prompt_left([9, 1, 2, 3, 4], 3, bos_id=9) == [9, 3, 4]
    assert cut_prompt_left([9, 1, 2, 3, 4], 1, bos_id=9) == [9]
    assert cut_prompt_left([9, 1, 2], 3, bos_id=9) == [9, 1, 2]  # fits: unchanged
    assert cut_prompt_left([1, 2, 3, 4], 2, bos_id=9) == [3, 4]  # no BOS to keep
    assert cut_prompt_left([9, 1, 2, 3, 4], 2, bos_id=None) == [3, 4]
    with pytest.raises(ValueError, match="keep"):
        cut_prompt_left([1, 2], 0, bos_id=None)


def test_label_generate_samples_from_prompts_with_their_bos(tmp_path, monkeypatch):
    from conftest import save_tiny_model
    from perlhf.label import generate as generate_module
    from perlhf.label.cli import main

    tokenizer = llama_like()
    model_dir = save_tiny_model("llama", tmp_path / "model", tokenizer)
    (tmp_path / "prompts.txt").write_text("Hello?\nCount\n", encoding="utf-8")
    seen = []

    def fake_sample(model, tokenizer, prompt_ids, count, config, eos):
        seen.extend(prompt_ids)
        return [[{"text": f"reply {k}", "finish": "eos", "tokens": 2} for k in range(count)] for _ in prompt_ids]

    monkeypatch.setattr(generate_module, "_sample", fake_sample)
    assert main(["generate", "--db", str(tmp_path / "l.db"), "--model", model_dir, "--prompts",
                 str(tmp_path / "prompts.txt")]) == 0
    assert seen == [prompt_token_ids(tokenizer, "Hello?"), prompt_token_ids(tokenizer, "Count")]
    assert all(ids[0] == tokenizer.bos_token_id for ids in seen)
