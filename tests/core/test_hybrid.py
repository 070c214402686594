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


# ------------------------------------------------------------------ MoE layers and the one table of family-only fields


def _mlp_specs(layers, module, rows=48):
    return [
        ShardSpec(
            module=f"decoder.layers.{i}.{module}",
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


MOE = dataclasses.replace(
    GEOMETRY,
    layer_pattern="M-ME",
    num_experts=4,
    moe_ffn_hidden_size=16,
    moe_shared_expert_intermediate_size=24,
    moe_layers=(3,),
)


def test_up_proj_is_short_only_when_the_mlp_and_the_shared_experts_both_carry_it():
    """Nemotron-H's dense MLP (-) and a MoE layer's shared experts (E) are both `up_proj`: the short name would put
    LoRA on both in peft, so it is written only when both kinds are adapted."""
    dense = _mlp_specs([1], "mlp.linear_fc1")
    shared = _mlp_specs([3], "mlp.shared_experts.linear_fc1", rows=24)
    assert target_modules(plan_adapter(dense, MOE, NEMOTRON_H)) == ["layers.1.mixer.up_proj"]
    assert target_modules(plan_adapter(dense + shared, MOE, NEMOTRON_H)) == ["up_proj"]


def test_every_family_only_geometry_field_is_one_row_of_the_table():
    from megatron_peft_export.core.geometry import FAMILY_FIELDS

    common = {
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "head_dim",
        "ffn_hidden_size",
        "gated_linear_unit",
        "vocab_size",
        "num_experts",
        "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size",
    }
    names = [f.name for f in FAMILY_FIELDS]
    assert len(names) == len(set(names))
    assert set(names) == {f.name for f in dataclasses.fields(ModelGeometry)} - common


def _nemotron_h_moe_config(**edit):
    config = {
        "model_type": "nemotron_h",
        "num_hidden_layers": 4,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 48,
        "mamba_num_heads": 8,
        "mamba_head_dim": 8,
        "n_groups": 2,
        "ssm_state_size": 4,
        "hybrid_override_pattern": "M-ME",
        "n_routed_experts": 4,
        "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 24,
        "n_shared_experts": 1,
    }
    return {**config, **edit}


def test_a_nemotron_h_moe_config_reads_its_shared_expert_width_and_its_e_layers():
    hf = ModelGeometry.from_hf_config(_nemotron_h_moe_config(), gated_linear_unit=False)
    assert (hf.moe_shared_expert_intermediate_size, hf.moe_layers, hf.moe_latent_size) == (24, (3,), None)
    MOE.check_matches(hf, "the base model's config.json")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"moe_latent_size": 16}, "moe_latent_size: Megatron model has None, the base model's config.json has 16"),
        ({"n_routed_experts": 8}, "num_experts: Megatron model has 4"),
        ({"hybrid_override_pattern": "MEME"}, "moe_layers: Megatron model has layers 3"),
        ({"moe_shared_expert_intermediate_size": 16}, "moe_shared_expert_intermediate_size: Megatron model has 24"),
    ],
)
def test_a_nemotron_h_moe_config_of_other_sizes_is_one_error(edit, field):
    hf = ModelGeometry.from_hf_config(_nemotron_h_moe_config(**edit), gated_linear_unit=False)
    with pytest.raises(ShapeMismatchError, match="the HF config does not describe the Megatron model") as error:
        MOE.check_matches(hf, "the base model's config.json")
    assert field in str(error.value)


def test_megatron_s_moe_layers_of_a_hybrid_model_are_its_pattern_s_e_layers():
    from types import SimpleNamespace

    config = SimpleNamespace(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        ffn_hidden_size=48,
        gated_linear_unit=False,
        num_moe_experts=4,
        moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=24,
        moe_layer_freq=1,
        is_hybrid_model=True,
        mamba_num_heads=8,
        mamba_head_dim=8,
        mamba_num_groups=2,
        mamba_state_dim=4,
    )
    expected = dataclasses.replace(MOE, attention_sinks=False, window_layers=())
    assert ModelGeometry.from_megatron(config, layer_pattern="M-ME") == expected


def test_lora_on_a_latent_moe_projection_is_refused_naming_the_family_and_what_is_missing():
    from megatron_peft_export.errors import DialectError

    latent = dataclasses.replace(MOE, moe_latent_size=16)
    for name in ("fc1_latent_proj", "fc2_latent_proj"):
        with pytest.raises(DialectError, match=r"^nemotron_h: found LoRA on a latent MoE's projection .*Transformer"):
            resolve_target(f"decoder.layers.3.mlp.{name}", None, latent, NEMOTRON_H)
