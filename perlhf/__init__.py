"""perlhf: Parameter-Efficient RLHF. LoRA reward models and LoRA RL on one shared, frozen backbone."""

__version__ = "0.1.0"

import os
import warnings

# torch's CPU kernels run on OpenMP threads that meet at a barrier after every operation. Spinning there, a thread
# burns the core its sibling needs whenever another process holds the other core: `perlhf demo --quick` took 2.9x
# as long beside one busy process. Sleeping at once keeps that near a fair share (benchmarks/contention.py).
# libgomp reads this when torch loads it, so it is set before torch is imported; a value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# PEFT 0.21 still asks transformers 5 for a deprecated attribute on every adapter; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import logging

# bitsandbytes (imported by PEFT when installed) asks, at import, for an optional kernel it would fetch from the Hub;
# its own CPU kernels are used instead, so the message is noise to anyone without Hub access.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# LLM.int8 (--quantize 8bit) rounds activations through float16 by design; bitsandbytes says so at every layer call.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
