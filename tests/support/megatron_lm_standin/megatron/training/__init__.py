"""Stand-in for Megatron-LM's megatron.training (see ../../README.md)."""

from .global_vars import get_args
from .training import pretrain

__all__ = ["get_args", "pretrain"]
