"""Write a random-initialised model of a given config, with the embedded SmolLM2 tokenizer, as a model directory any
perlhf command or benchmark takes as --model. Only the shapes matter for memory and time, so a benchmark can measure a
model size that is not on this machine.

  python benchmarks/random_model.py benchmarks/configs/smollm2-360m runs/smollm2-360m-random
"""

from __future__ import annotations

import sys
from pathlib import Path


def write_random_model(config_dir: str, out_dir: Path, device: str = "cpu") -> Path:
    """The model of `config_dir`'s config.json with random weights, saved to `out_dir` (kept if already there)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from perlhf.models import load_tokenizer, resolve_dtype

    out_dir = Path(out_dir)
    if not (out_dir / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir),
                                                     dtype=resolve_dtype(None, torch.device(device)))
        model.save_pretrained(out_dir)
        # the SmolLM2 tokenizer's 49152 ids fit the vocabulary of every config in benchmarks/configs
        load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct").save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(write_random_model(sys.argv[1], Path(sys.argv[2])))
