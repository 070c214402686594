"""Hybrid (Nemotron-H) planning: the layer pattern decides which layer may hold which linear, and target_modules
names a module short only when every layer of its kind carries it."""

import dataclasses

import pytest

from megatron_peft_export.core.archs import NEMOTRON_H
from megatron_peft_export.core.geometry import ModelGeometry
from megatron_peft_export.core.peft_format import target_modules
from megatron_peft_export.core.plan import plan_adapter, resolve_target
from megatron_peft_export.core.shards import ShardSpec
from megatron_peft_export.errors import ShapeMismatchError

GEOMETRY = ModelGeometry(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=8,
    ffn_hidden_size=48,
    gated_linear_unit=False,
    mamba_num_heads=8,
    mamba_head_dim=8,
    mamba_num_groups=2,
    mamba_state_dim=4,
    layer_pattern="M*M-",
)


def test_a_linear_in_a_layer_of_another_kind_is_refused_by_name():
    assert resolve_target("decoder.layers.2.mixer.in_proj", None, GEOMETRY, NEMOTRON_H).hf_modules == (
        "backbone.layers.2.mixer.in_proj",
    )
    with pytest.raises(ShapeMismatchError, match=r"layer 1 of the hybrid pattern 'M\*M-' is '\*' \(attention\)"):
        resolve_target("decoder.layers.1.mixer.in_proj", None, GEOMETRY, NEMOTRON_H)


def test_the_layer_pattern_has_one_symbol_per_layer():
    with pytest.raises(ShapeMismatchError, match="one symbol per layer"):
        dataclasses.replace(GEOMETRY, layer_pattern="M*M")
    with pytest.raises(ShapeMismatchError, match="layer pattern"):
        dataclasses.replace(GEOMETRY, layer_pattern="M*MX")


def _specs(layers):
    rows = 2 * 64 + 2 * 8 + 8  # z, x, B, C, dt
    return [
        ShardSpec(
            module=f"decoder.layers.{i}.mixer.in_proj",
            role=role,
            shape=shape,
            split_dim=None,
            tp_rank=0,
            tp_size=1,
            alpha=8.0,
        )
        for i in layers
        for role, shape in (("lora_A", (4, 32)), ("lora_B", (rows, 4)))
    ]


def test_target_modules_short_when_every_mamba_layer_is_adapted_else_paths_without_backbone():
    assert target_modules(plan_adapter(_specs([0, 2]), GEOMETRY, NEMOTRON_H)) == ["in_proj"]
    assert target_modules(plan_adapter(_specs([2]), GEOMETRY, NEMOTRON_H)) == ["layers.2.mixer.in_proj"]
