"""perlhf: Parameter-Efficient RLHF. LoRA reward models and LoRA RL on one shared, frozen backbone."""

__version__ = "0.1.0"

import os
import sys
import warnings


def _machine_busy(samples: int = 5) -> bool:
    """Whether another process is computing as perlhf starts: in most of a few looks 10 ms apart, the kernel counts
    a runnable task besides this one. (The load average would count the user's previous command.) Linux only."""
    import time

    seen = 0
    try:
        for look in range(samples):
            with open("/proc/loadavg", encoding="ascii") as handle:
                seen += int(handle.read().split()[3].split("/")[0]) > 1
            time.sleep(0.01 if look < samples - 1 else 0)
    except (OSError, ValueError, IndexError):
        return False
    return seen > samples // 2


# torch's CPU kernels run on OpenMP threads that meet at a barrier after every operation. Spinning there, a thread
# burns the core its sibling needs whenever another process holds the other core: `perlhf demo --quick` took 2.9x
# as long beside one busy process, and sleeping at once (PASSIVE) keeps that near a fair share. On a quiet machine
# spinning is faster (generation 1.35x, a reward-model step 1.1-1.2x; benchmarks/contention.py), so threads sleep
# only where the machine is busy when perlhf starts. libgomp reads this when torch loads it, so it is set before
# torch is imported (once torch is loaded it has no effect, so perlhf does not look); a value in the environment wins.
chose_passive_wait = "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules and _machine_busy()
if chose_passive_wait:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

# PEFT 0.21 still asks transformers 5 for a deprecated attribute on every adapter; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import logging

# bitsandbytes (imported by PEFT when installed) asks, at import, for an optional kernel it would fetch from the Hub;
# its own CPU kernels are used instead, so the message is noise to anyone without Hub access.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# LLM.int8 (--quantize 8bit) rounds activations through float16 by design; bitsandbytes says so at every layer call.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
