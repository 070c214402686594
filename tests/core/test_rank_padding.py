"""Rank padding: one rank for every module, the same B @ A * alpha / r, no truncation."""

import pytest
import torch

from megatron_peft_export.core.archs import LLAMA
from megatron_peft_export.core.peft_format import adapter_config
from megatron_peft_export.core.rank_padding import pad_ranks
from megatron_peft_export.errors import ShapeMismatchError
from tests.core.test_plan import export, geometry, key, shards_of


def _adapter(r_qkv=4, r_fc2=2):
    geo = geometry()
    gen = torch.Generator().manual_seed(0)
    qkv_out = (geo.num_attention_heads + 2 * geo.num_query_groups) * geo.head_dim
    pairs = []
    for layer in range(geo.num_layers):
        qkv, fc2 = f"decoder.layers.{layer}.self_attention.linear_qkv", f"decoder.layers.{layer}.mlp.linear_fc2"
        pairs += shards_of(qkv, "lora_A", torch.randn(r_qkv, geo.hidden_size, generator=gen), None, 1, alpha=8.0)
        pairs += shards_of(qkv, "lora_B", torch.randn(qkv_out, r_qkv, generator=gen), 0, 1, alpha=8.0)
        pairs += shards_of(fc2, "lora_A", torch.randn(r_fc2, geo.ffn_hidden_size, generator=gen), 1, 1, alpha=3.0)
        pairs += shards_of(fc2, "lora_B", torch.randn(geo.hidden_size, r_fc2, generator=gen), None, 1, alpha=3.0)
    return export(pairs, geo, LLAMA)


def _delta(plan, tensors, module):
    s = plan.modules[module]
    return tensors[key(module, "lora_B")] @ tensors[key(module, "lora_A")] * (s.alpha / s.r)


def test_padding_keeps_every_module_delta_and_drops_rank_pattern():
    plan, tensors = _adapter()
    assert adapter_config(plan, None)["rank_pattern"]  # two ranks before
    padded_plan, padded = pad_ranks(plan, tensors, 16)
    for module in plan.modules:
        assert padded[key(module, "lora_A")].shape[0] == 16 and padded[key(module, "lora_B")].shape[1] == 16
        assert padded_plan.shapes[key(module, "lora_A")] == tuple(padded[key(module, "lora_A")].shape)
        torch.testing.assert_close(_delta(padded_plan, padded, module), _delta(plan, tensors, module), rtol=0, atol=1e-6)
    config = adapter_config(padded_plan, None)
    assert config["r"] == 16 and config["rank_pattern"] == {}
    assert config["lora_alpha"] == 32  # q/k/v: 8 * 16 / 4, the scale 2 kept; down_proj: 3 * 16 / 2 = 24 (scale 1.5)
    assert set(config["alpha_pattern"].values()) == {24}


def test_padding_to_the_same_rank_changes_nothing_and_never_truncates():
    plan, tensors = _adapter(r_qkv=4, r_fc2=4)
    same_plan, same = pad_ranks(plan, tensors, 4)
    assert all(torch.equal(same[k], tensors[k]) for k in tensors) and same_plan.modules == plan.modules
    with pytest.raises(ShapeMismatchError, match="pass pad_rank_to >= 4"):
        pad_ranks(plan, tensors, 2)
