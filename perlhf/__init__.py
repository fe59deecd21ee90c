"""perlhf: Parameter-Efficient RLHF. LoRA reward models and LoRA RL on one shared, frozen backbone."""

__version__ = "0.1.0"
