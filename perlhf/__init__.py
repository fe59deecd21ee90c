"""perlhf: Parameter-Efficient RLHF. LoRA reward models and LoRA RL on one shared, frozen backbone."""

__version__ = "0.1.0"

import warnings

# PEFT 0.21 still asks transformers 5 for a deprecated attribute on every adapter; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
