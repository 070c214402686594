"""The Megatron-LM `args` a torch_dist checkpoint records in common.pt: the sizes the offline reader looks for."""

from __future__ import annotations

import argparse
from typing import Any


def recorded_args(cfg: Any, *, swiglu: bool = True, **extra: Any) -> argparse.Namespace:
    """Megatron-LM's args for a tiny model config (`cfg`: num_layers, hidden_size, ffn_hidden_size, heads, query
    groups, kv_channels, vocab_size), with the parallel layout and family fields given in `extra`."""
    fields = dict(
        num_layers=extra["num_layers"] if "num_layers" in extra else cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=True,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        swiglu=swiglu,
        padded_vocab_size=cfg.vocab_size,
    )
    return argparse.Namespace(**{**fields, **extra})
