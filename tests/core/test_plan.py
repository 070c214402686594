"""Exact-value tests of the planner: shard global tensors the way Megatron does, plan, reassemble, compare
with the HF tensors computed here by independent reshapes."""

import dataclasses

import pytest
import torch

from megatron_peft_export.core.archs import LLAMA, NEMOTRON, QWEN2_MOE, QWEN_MOE
from megatron_peft_export.core.geometry import ModelGeometry
from megatron_peft_export.core.peft_format import adapter_config
from megatron_peft_export.core.plan import allocate, apply_placements, plan_adapter
from megatron_peft_export.core.shards import ShardSpec
from megatron_peft_export.errors import DialectError, ShapeMismatchError

R = 4


def geometry(heads=8, groups=4, head_dim=2, hidden=16, ffn=12, layers=2, gated=True, vocab=None):
    return ModelGeometry(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        ffn_hidden_size=ffn,
        gated_linear_unit=gated,
        vocab_size=vocab,
    )


def shards_of(module, role, full, split_dim, tp, alpha=8.0, part=None):
    """Megatron's TP sharding of a global tensor: contiguous chunks along split_dim (replicated if None)."""
    pieces = [full] * tp if split_dim is None else list(full.chunk(tp, dim=split_dim))
    return [
        (
            ShardSpec(
                module=module,
                role=role,
                part=part,
                shape=tuple(p.shape),
                split_dim=split_dim,
                tp_rank=t,
                tp_size=tp,
                alpha=alpha,
            ),
            p,
        )
        for t, p in enumerate(pieces)
    ]


def export(pairs, geo, arch=LLAMA, megatron_vocab=None):
    plan = plan_adapter([s for s, _ in pairs], geo, arch, megatron_vocab)
    tensors = allocate(plan)
    for placements, (_, data) in zip(plan.placements, pairs):
        apply_placements(tensors, placements, data)
    return plan, tensors


def key(module, role):
    return f"base_model.model.{module}.{'lora_magnitude_vector' if role == 'magnitude' else role + '.weight'}"


def rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("heads,groups", [(8, 4), (8, 8), (8, 2)])
def test_fused_qkv_gqa(tp, heads, groups):
    if groups % tp:
        pytest.skip("a TP rank holds whole query groups")
    geo = geometry(heads=heads, groups=groups)
    d, hpg = geo.head_dim, heads // groups
    a, b = rand(R, geo.hidden_size), rand((heads + 2 * groups) * d, R)
    mod = "decoder.layers.1.self_attention.linear_qkv"
    plan, out = export(shards_of(mod, "lora_A", a, None, tp) + shards_of(mod, "lora_B", b, 0, tp), geo)
    per_group = b.view(groups, hpg + 2, d, R)
    expected = {
        "q_proj": per_group[:, :hpg].reshape(-1, R),
        "k_proj": per_group[:, hpg],
        "v_proj": per_group[:, hpg + 1],
    }
    for name, want in expected.items():
        m = f"model.layers.1.self_attn.{name}"
        assert torch.equal(out[key(m, "lora_B")], want.reshape(-1, R))
        assert torch.equal(out[key(m, "lora_A")], a)
    assert len(out) == 6


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_fc1_deinterleaves_gate_and_up(tp):
    geo = geometry(ffn=12)
    gate, up = rand(12, R), rand(12, R) + 10
    # Megatron's TP shard t of fc1 is [gate_t; up_t]; the naive concatenation of shards is [g0;u0;g1;u1;...].
    local = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
    mod = "decoder.layers.0.mlp.linear_fc1"
    pairs = [
        (ShardSpec(module=mod, role="lora_B", shape=tuple(x.shape), split_dim=0, tp_rank=t, tp_size=tp, alpha=8.0), x)
        for t, x in enumerate(local)
    ]
    pairs += shards_of(mod, "lora_A", rand(R, 16), None, tp)
    _, out = export(pairs, geo)
    assert torch.equal(out[key("model.layers.0.mlp.gate_proj", "lora_B")], gate)
    assert torch.equal(out[key("model.layers.0.mlp.up_proj", "lora_B")], up)


def test_non_gated_fc1_is_one_module():
    geo = geometry(gated=False)
    b = rand(12, R)
    mod = "decoder.layers.0.mlp.linear_fc1"
    _, out = export(shards_of(mod, "lora_B", b, 0, 2) + shards_of(mod, "lora_A", rand(R, 16), None, 2), geo, NEMOTRON)
    assert torch.equal(out[key("model.layers.0.mlp.up_proj", "lora_B")], b)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_a_split_on_input_dim(tp):
    geo = geometry()
    a, b = rand(R, geo.ffn_hidden_size), rand(geo.hidden_size, R)
    mod = "decoder.layers.0.mlp.linear_fc2"
    _, out = export(shards_of(mod, "lora_A", a, 1, tp) + shards_of(mod, "lora_B", b, None, tp), geo)
    assert torch.equal(out[key("model.layers.0.mlp.down_proj", "lora_A")], a)
    assert torch.equal(out[key("model.layers.0.mlp.down_proj", "lora_B")], b)


def test_bridge_column_parallel_a_split_on_rank_dim_goes_to_each_fused_module():
    geo = geometry()
    a, b = rand(R, geo.hidden_size), rand(2 * geo.ffn_hidden_size, R)
    mod = "decoder.layers.0.mlp.linear_fc1"
    _, out = export(shards_of(mod, "lora_A", a, 0, 2) + shards_of(mod, "lora_B", b[:], 0, 1), geo)
    for name in ("gate_proj", "up_proj"):
        assert torch.equal(out[key(f"model.layers.0.mlp.{name}", "lora_A")], a)


@pytest.mark.parametrize("tp", [1, 2])
def test_dora_magnitude_follows_output_rows(tp):
    geo = geometry(heads=8, groups=2)
    d, hpg = geo.head_dim, 4
    rows = (8 + 4) * d
    mag, b = rand(rows), rand(rows, R)
    mod = "decoder.layers.0.self_attention.linear_qkv"
    pairs = (
        shards_of(mod, "lora_A", rand(R, 16), 0, tp)
        + shards_of(mod, "lora_B", b, 0, tp)
        + shards_of(mod, "magnitude", mag, 0, tp)
    )
    plan, out = export(pairs, geo)
    per_group = mag.view(2, hpg + 2, d)
    assert torch.equal(out[key("model.layers.0.self_attn.q_proj", "magnitude")], per_group[:, :hpg].reshape(-1))
    assert torch.equal(out[key("model.layers.0.self_attn.v_proj", "magnitude")], per_group[:, hpg + 1].reshape(-1))
    assert plan.use_dora and adapter_config(plan, None)["use_dora"] is True


def test_canonical_parts_map_to_their_own_module():
    geo = geometry(heads=8, groups=2)
    mod = "decoder.layers.0.self_attention.linear_qkv"
    k_b, k_a = rand(2 * geo.head_dim, R), rand(R, 16)
    pairs = shards_of(mod, "lora_A", k_a, 0, 2, part="k") + shards_of(mod, "lora_B", k_b, 0, 2, part="k")
    plan, out = export(pairs, geo)
    assert set(out) == {
        key("model.layers.0.self_attn.k_proj", "lora_A"),
        key("model.layers.0.self_attn.k_proj", "lora_B"),
    }
    assert torch.equal(out[key("model.layers.0.self_attn.k_proj", "lora_B")], k_b)


def test_partial_targets_and_rank_alpha_patterns():
    geo = geometry(layers=2)
    pairs = []
    for layer in range(2):  # q/k/v in both layers (short names), o_proj only in layer 1 (full path)
        qkv = f"decoder.layers.{layer}.self_attention.linear_qkv"
        pairs += shards_of(qkv, "lora_A", rand(R, 16), None, 1) + shards_of(qkv, "lora_B", rand(32, R), 0, 1)
    proj = "decoder.layers.1.self_attention.linear_proj"
    pairs += shards_of(proj, "lora_A", rand(2, 16), 1, 1, alpha=3.0) + shards_of(
        proj, "lora_B", rand(16, 2), None, 1, alpha=3.0
    )
    plan, _ = export(pairs, geo)
    config = adapter_config(plan, "base")
    assert config["target_modules"] == ["k_proj", "model.layers.1.self_attn.o_proj", "q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"]) == (R, 8)
    assert config["rank_pattern"] == {"model.layers.1.self_attn.o_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.1.self_attn.o_proj": 3}


def test_output_layer_drops_padded_vocabulary_rows():
    geo = geometry(vocab=10)
    b = rand(12, R)  # Megatron pads the vocabulary to 12
    pairs = shards_of("output_layer", "lora_B", b, 0, 2) + shards_of("output_layer", "lora_A", rand(R, 16), None, 2)
    _, out = export(pairs, geo, megatron_vocab=12)
    assert torch.equal(out[key("lm_head", "lora_B")], b[:10])


def test_missing_shard_is_an_error():
    geo = geometry()
    mod = "decoder.layers.0.mlp.linear_fc2"
    pairs = shards_of(mod, "lora_A", rand(R, 12), 1, 2)[:1] + shards_of(mod, "lora_B", rand(16, R), None, 2)
    with pytest.raises(ShapeMismatchError, match="filled 6 of 12"):
        export(pairs, geo)


def test_shape_contradicting_geometry_names_the_module():
    geo = geometry(groups=4)
    mod = "decoder.layers.0.self_attention.linear_qkv"
    pairs = shards_of(mod, "lora_B", rand(20, R), 0, 1) + shards_of(mod, "lora_A", rand(R, 16), None, 1)
    with pytest.raises(ShapeMismatchError, match=r"linear_qkv.*expected 32 output rows.*found 20"):
        export(pairs, geo)


def test_query_groups_not_divisible_by_tp():
    geo = geometry(heads=6, groups=3)
    mod = "decoder.layers.0.self_attention.linear_qkv"
    b = rand(12 * 2, R)
    pairs = [
        (ShardSpec(module=mod, role="lora_B", shape=(12, R), split_dim=0, tp_rank=t, tp_size=2, alpha=1.0), x)
        for t, x in enumerate(b.chunk(2))
    ]
    with pytest.raises(ShapeMismatchError, match=r"query groups \(3\) is not divisible by the tensor-parallel size 2"):
        export(pairs, geo)


def test_mismatched_ranks_between_a_and_b():
    geo = geometry()
    mod = "decoder.layers.0.mlp.linear_fc2"
    pairs = shards_of(mod, "lora_A", rand(R, 12), 1, 1) + shards_of(mod, "lora_B", rand(16, R + 1), None, 1)
    with pytest.raises(ShapeMismatchError, match="lora_A has rank 4, lora_B has rank 5"):
        export(pairs, geo)


def test_shared_expert_fc1_at_tp2_splits_like_a_dense_fc1_and_needs_its_width():
    """Qwen2-MoE's shared expert: fc1 B's TP shards are [gate_t; up_t]; a geometry without the shared width, or a name
    map
    without a shared expert (Qwen3-MoE), refuses it instead of sizing it like a routed expert."""
    geo = dataclasses.replace(geometry(), num_experts=4, moe_ffn_hidden_size=6, moe_shared_expert_intermediate_size=10)
    module = "decoder.layers.1.mlp.shared_experts.linear_fc1"
    gate, up, a = torch.randn(10, R), torch.randn(10, R), torch.randn(R, 16)
    b_shards = [torch.cat([gate[:5], up[:5]]), torch.cat([gate[5:], up[5:]])]
    pairs = shards_of(module, "lora_A", a, None, 2)[:1] + [
        (ShardSpec(module=module, role="lora_B", shape=(10, R), split_dim=0, tp_rank=t, tp_size=2, alpha=8.0), b)
        for t, b in enumerate(b_shards)
    ]
    _, tensors = export(pairs, geo, QWEN2_MOE)
    assert torch.equal(tensors[key("model.layers.1.mlp.shared_expert.gate_proj", "lora_B")], gate)
    assert torch.equal(tensors[key("model.layers.1.mlp.shared_expert.up_proj", "lora_B")], up)
    assert torch.equal(tensors[key("model.layers.1.mlp.shared_expert.up_proj", "lora_A")], a)
    with pytest.raises(ShapeMismatchError, match="moe_shared_expert_intermediate_size None"):
        export(pairs, dataclasses.replace(geo, moe_shared_expert_intermediate_size=None), QWEN2_MOE)
    with pytest.raises(
        ShapeMismatchError,
        match="no HF name for Megatron module 'decoder.layers.1.mlp.shared_experts.linear_fc1' in the qwen3_moe",
    ):
        export(pairs, geo, QWEN_MOE)


def test_planning_errors_keep_their_type():
    """An adapter the dialect cannot place is a DialectError; one that contradicts the model a ShapeMismatchError."""
    geo = geometry()
    sub = ShardSpec(
        module="decoder.layers.0.mlp.linear_fc2",
        role="lora_A",
        part="gate",
        shape=(R, 12),
        split_dim=None,
        tp_rank=0,
        tp_size=1,
        alpha=8.0,
    )
    with pytest.raises(DialectError, match="unknown sub-adapter 'gate'") as raised:
        plan_adapter([sub], geo, LLAMA)
    assert not isinstance(raised.value, ShapeMismatchError)
    past = ShardSpec(
        module="decoder.layers.5.mlp.linear_fc2",
        role="lora_A",
        shape=(R, 12),
        split_dim=None,
        tp_rank=0,
        tp_size=1,
        alpha=8.0,
    )
    with pytest.raises(ShapeMismatchError, match="layer 5 is past the model's 2 layers"):
        plan_adapter([sub, past], geo, LLAMA)


@pytest.mark.parametrize("tp", [1, 2])
def test_many_experts_and_layers_of_one_kind_each_land_in_their_own_module(tp):
    """The planner computes a module kind's placements once and stamps them out per shard: every layer's and expert's
    shards (fc1 B's TP shards [gate_t; up_t], fc2 A split on its input dim) must still fill that layer's and expert's
    HF tensors, compared with the global tensors split here."""
    layers, experts, ffn = 3, 4, 6
    geo = dataclasses.replace(geometry(layers=layers), num_experts=experts, moe_ffn_hidden_size=ffn)
    pairs, expected = [], {}
    for i in range(layers):
        for e in range(experts):
            module = f"decoder.layers.{i}.mlp.experts.local_experts.{e}"
            a1, gate, up = rand(R, 16) + 100 * i + e, rand(ffn, R) - e, rand(ffn, R) + 10 * i
            a2, b2 = rand(R, ffn) * (e + 1), rand(16, R) - 7 * i
            local = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
            pairs += shards_of(f"{module}.linear_fc1", "lora_A", a1, None, tp)
            pairs += [
                (spec, local[t])
                for t, (spec, _) in enumerate(shards_of(f"{module}.linear_fc1", "lora_B", gate.repeat(2, 1), 0, tp))
            ]
            pairs += shards_of(f"{module}.linear_fc2", "lora_A", a2, 1, tp)
            pairs += shards_of(f"{module}.linear_fc2", "lora_B", b2, None, tp)
            hf = f"model.layers.{i}.mlp.experts.{e}"
            for name, a, b in (("gate_proj", a1, gate), ("up_proj", a1, up), ("down_proj", a2, b2)):
                expected[key(f"{hf}.{name}", "lora_A")], expected[key(f"{hf}.{name}", "lora_B")] = a, b
    _, out = export(pairs, geo, QWEN_MOE)
    assert out.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(out[name], tensor), name
