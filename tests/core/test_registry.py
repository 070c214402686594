"""Every registry entry both ways: dialect x architecture names (live name -> checkpoint key -> live name), and every
fused split (split then merge, merge then split) on random tensors with the tiny models' shapes."""

import dataclasses
import itertools

import pytest
import torch

from megatron_peft_export.core.archs import ARCHS
from megatron_peft_export.core.geometry import ModelGeometry
from megatron_peft_export.core.plan import OUTPUT_LAYER, resolve_target
from megatron_peft_export.core.registry import DIALECTS, checkpoint_key, expand, match_key
from megatron_peft_export.core.splits import (
    merge_rows,
    split_rows,
    stack_experts,
    store_rows,
    stored_row_pieces,
    unstack_experts,
)
from megatron_peft_export.errors import DialectError
from megatron_peft_export.offline.keys import classify

# tests/support/tiny_gpt.py's TinyGPTConfig and tiny_moe.py's MoE sizes
TINY = ModelGeometry(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=8,
    num_query_groups=4,
    head_dim=8,
    ffn_hidden_size=96,
    gated_linear_unit=True,
    vocab_size=128,
    num_experts=4,
    moe_ffn_hidden_size=32,
    moe_shared_expert_intermediate_size=48,
)
MLA = dataclasses.replace(
    TINY, head_dim=12, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6
)
"""tests/support/tiny_deepseek.py's attention sizes (a q/k head is nope 8 + rope 4 wide)."""
LAYER, EXPERT = 3, 2
HYBRID = dict(mamba_num_heads=8, mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=4)
"""tests/support/tiny_hybrid.py's Mamba sizes."""
GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6)
"""tests/support/tiny_qwen3_next.py's gated delta-net sizes."""


def _entries():
    """(dialect, arch, Megatron module path, part) for every module each architecture maps and the dialect adapts."""
    for dialect, arch in itertools.product(DIALECTS, ARCHS):
        paths = [(m.megatron, m.parts) for m in arch.modules]
        for megatron, parts in paths + [(None, ())]:
            module = (
                OUTPUT_LAYER if megatron is None else f"decoder.layers.{LAYER}.{megatron}".replace("{e}", str(EXPERT))
            )
            if dialect.parts and not set(dialect.parts) & set(parts):
                continue
            yield pytest.param(dialect, arch, module, parts, id=f"{dialect.name}-{arch.name}-{module}")


@pytest.mark.parametrize(("dialect", "arch", "module", "parts"), list(_entries()))
def test_live_name_to_checkpoint_key_and_back(dialect, arch, module, parts):
    geometry = TINY if arch.fused_experts or arch.name == "qwen2_moe" else dataclasses.replace(TINY, num_experts=None)
    geometry = dataclasses.replace(geometry, gated_linear_unit=arch.name not in ("nemotron", "nemotron_h"))
    if arch.name == "nemotron_h":
        geometry = dataclasses.replace(geometry, **HYBRID)
    if arch.name == "qwen3_next":
        geometry = dataclasses.replace(geometry, **GDN, attention_output_gate=True)
    if arch.name == "deepseek_v3":
        geometry = MLA
    for decl, leaf, part in dialect.leaves("sft"):
        if part is not None and part not in parts:
            continue
        live = f"{module}.{leaf}"
        found = match_key(live)
        assert (found.family, found.module, found.tensor, found.part) == (dialect.family, module, decl, part), live
        assert found.adapter_name == ("sft" if dialect.named else None)
        key, index = checkpoint_key(dialect, module, leaf)
        stored = classify(key)
        assert (stored.dialect, stored.role, stored.part, stored.tensor) == (dialect.family, decl.role, part, decl)
        assert stored.adapter_name == found.adapter_name
        assert len(index) == len(stored.axes), key
        assert f"{expand(stored.module, stored.axes, index)}.{leaf}" == live
        refused = next((m.refused for m in arch.modules if module.endswith(m.megatron.replace("{e}", "2"))), "")
        if refused:  # mapped to be refused by name (core/archs.py)
            with pytest.raises(DialectError, match=f"^{arch.name}: found LoRA on "):
                resolve_target(module, part, geometry, arch)
            continue
        assert resolve_target(module, part, geometry, arch).hf_modules  # the architecture maps what the dialect names


@pytest.mark.parametrize(
    ("module", "leaf", "dialect", "key", "index"),
    [  # as megatron-core, ModelOpt and Bridge save them (tests/support/BRIDGE_FACTS.md, tests/offline/test_keys.py)
        ("decoder.layers.3.self_attention.linear_qkv", "lora_a_sft.weight", "modelopt", None, ()),
        (
            "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1",
            "lora_b_default.weight",
            "modelopt",
            "decoder.layers.1.mlp.experts.experts.linear_fc1.lora_b_default.weight",
            (2,),
        ),
        (
            "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1",
            "adapter.linear_in.weight",
            "bridge-lora",
            "decoder.layers.mlp.experts.experts.linear_fc1.adapter.linear_in.weight",
            (1, 2),
        ),
        (
            "decoder.layers.0.mlp.linear_fc1",
            "adapter.adapter_gate.linear_out.weight",
            "bridge-canonical",
            "decoder.layers.mlp.linear_fc1.adapter.adapter_gate.linear_out.weight",
            (0,),
        ),
        ("output_layer", "adapter.linear_out.weight", "bridge-lora", None, ()),
    ],
)
def test_checkpoint_keys_are_the_saved_ones(module, leaf, dialect, key, index):
    declared = next(d for d in DIALECTS if d.name == dialect)
    assert checkpoint_key(declared, module, leaf) == (key or f"{module}.{leaf}", index)


def _fused_qkv(q, k, v, geometry):
    """megatron's linear_qkv rows, written from its layout: per query group, its query heads' rows, then k, then v."""
    groups, d = geometry.num_query_groups, geometry.head_dim
    per = [q.unflatten(0, (groups, -1)), k.unflatten(0, (groups, d)), v.unflatten(0, (groups, d))]
    return torch.cat(per, dim=1).flatten(0, 1)


@pytest.mark.parametrize(("heads", "groups", "tp"), [(8, 4, 1), (8, 4, 2), (8, 4, 4), (8, 8, 2), (8, 1, 1), (8, 2, 2)])
def test_qkv_split_and_merge_are_inverse(heads, groups, tp):
    geometry = dataclasses.replace(TINY, num_attention_heads=heads, num_query_groups=groups)
    d = geometry.head_dim
    q, k, v = torch.randn(heads * d, 5), torch.randn(groups * d, 5), torch.randn(groups * d, 5)
    shards = _fused_qkv(q, k, v, geometry).chunk(tp)  # TP splits whole query groups
    out = split_rows(shards, "qkv", (heads * d, groups * d, groups * d), geometry)
    assert all(torch.equal(a, b) for a, b in zip(out, (q, k, v)))
    merged = merge_rows(out, "qkv", (heads + 2 * groups) * d, geometry, tp)
    assert all(torch.equal(a, b) for a, b in zip(merged, shards))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gate_up_split_and_merge_are_inverse(tp):
    ffn = TINY.ffn_hidden_size
    gate, up = torch.randn(ffn, 8), torch.randn(ffn, 8)
    shards = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]  # each rank: [gate_t; up_t]
    out = split_rows(shards, "gate_up", (ffn, ffn), TINY)
    assert torch.equal(out[0], gate) and torch.equal(out[1], up)
    assert all(torch.equal(a, b) for a, b in zip(merge_rows(out, "gate_up", 2 * ffn, TINY, tp), shards))


@pytest.mark.parametrize("tp", [1, 2])
def test_mamba_in_proj_split_and_merge_are_inverse(tp):
    """megatron's MambaMixer.in_proj, written from its layout: each TP rank holds [z_t; x_t; B_t; C_t; dt_t], its share
    of heads (z, x, dt) and groups (B, C); HF's in_proj is [z; x; B; C; dt]."""
    geometry = dataclasses.replace(TINY, **HYBRID)
    d_inner, bc, heads = 8 * 8, 2 * 4, 8
    parts = [torch.randn(n, 5) for n in (d_inner, d_inner, bc, bc, heads)]
    shards = [torch.cat([p.chunk(tp)[t] for p in parts]) for t in range(tp)]
    hf = torch.cat(parts)
    assert torch.equal(split_rows(shards, "mamba_in", (hf.shape[0],), geometry)[0], hf)
    assert all(torch.equal(a, b) for a, b in zip(merge_rows([hf], "mamba_in", hf.shape[0], geometry, tp), shards))


@pytest.mark.parametrize("tp", [1, 2])
def test_gated_delta_net_in_proj_split_and_merge_are_inverse(tp):
    """megatron's GatedDeltaNet.in_proj: each rank [q_t; k_t; v_t; z_t; b_t; a_t]; HF in_proj_qkvz per key head
    [q_g; k_g; v_g; z_g] and in_proj_ba [b_g; a_g], v/z/b/a those of the value heads key head g serves."""
    geometry = dataclasses.replace(TINY, **GDN)
    nk, nv, hk, hv = 2, 4, 8, 6
    q, k, v, z = (torch.randn(n, 3) for n in (nk * hk, nk * hk, nv * hv, nv * hv))
    b, a = torch.randn(nv, 3), torch.randn(nv, 3)
    shards = [torch.cat([p.chunk(tp)[t] for p in (q, k, v, z, b, a)]) for t in range(tp)]
    per_key = [p.reshape(nk, -1, 3) for p in (q, k, v, z, b, a)]
    qkvz, ba = torch.cat(per_key[:4], 1).reshape(-1, 3), torch.cat(per_key[4:], 1).reshape(-1, 3)
    out = split_rows(shards, "gdn_in", (qkvz.shape[0], ba.shape[0]), geometry)
    assert torch.equal(out[0], qkvz) and torch.equal(out[1], ba)
    merged = merge_rows([qkvz, ba], "gdn_in", qkvz.shape[0] + ba.shape[0], geometry, tp)
    assert all(torch.equal(x, y) for x, y in zip(merged, shards))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_qkv_split_and_merge_are_inverse(tp):
    """megatron's linear_qkv with attention_output_gate: per group [q heads; their gates; k; v]; HF q_proj per head
    [q_h; gate_h]."""
    geometry, d, heads, groups = TINY, TINY.head_dim, TINY.num_attention_heads, TINY.num_query_groups
    q, gate = torch.randn(heads, d, 3), torch.randn(heads, d, 3)
    k, v = torch.randn(groups * d, 3), torch.randn(groups * d, 3)
    per_group = [x.reshape(groups, -1, 3) for x in (q.reshape(-1, 3), gate.reshape(-1, 3), k, v)]
    fused = torch.cat(per_group, 1).reshape(-1, 3)
    q_proj = torch.stack([q, gate], 1).reshape(-1, 3)
    out = split_rows(fused.chunk(tp), "qkv_gated", (2 * heads * d, groups * d, groups * d), geometry)
    assert all(torch.equal(x, y) for x, y in zip(out, (q_proj, k, v)))
    merged = merge_rows(out, "qkv_gated", fused.shape[0], geometry, tp)
    assert all(torch.equal(x, y) for x, y in zip(merged, fused.chunk(tp)))


@pytest.mark.parametrize("tp", [1, 2])
def test_plain_rows_drop_the_padded_vocabulary_and_merge_pads_with_zeros(tp):
    hf = torch.randn(TINY.vocab_size - 3, 8)
    shards = merge_rows([hf], "plain", TINY.vocab_size, TINY, tp)
    assert torch.equal(torch.cat(shards)[: hf.shape[0]], hf) and not torch.cat(shards)[hf.shape[0] :].any()
    assert torch.equal(split_rows(shards, "plain", (hf.shape[0],), TINY)[0], hf)


@pytest.mark.parametrize(("layout", "tp"), itertools.product(["rank_blocks", "rank_halves", "whole"], [1, 2, 3]))
def test_stored_rows_and_their_pieces_are_inverse(layout, tp):
    tp = 1 if layout == "whole" else tp
    shards = [torch.randn(12, 4) for _ in range(tp)]
    stored = store_rows(layout, shards)
    if layout == "rank_halves":  # Bridge's SwiGLU rearrangement: every shard's first halves, then the second halves
        assert torch.equal(stored[:6], shards[0][:6]) and torch.equal(stored[-6:], shards[-1][6:])
    pieces = stored_row_pieces(layout, stored.shape[0], tp)
    back = [torch.cat([stored[start : start + n] for start, n in rows]) for rows in pieces]
    assert all(torch.equal(a, b) for a, b in zip(back, shards))


@pytest.mark.parametrize("modules", [1, 2])
def test_expert_stacking_and_unstacking_are_inverse(modules):
    experts, r = TINY.num_experts, 4
    a = [torch.randn(r, TINY.hidden_size) for _ in range(experts)]
    b = [[torch.randn(TINY.moe_ffn_hidden_size, r) for _ in range(modules)] for _ in range(experts)]
    fused_a, fused_b = stack_experts(a, b)
    # peft's target_parameters layout: lora_A rows e*r + j, lora_B columns j*experts + e
    assert torch.equal(fused_a[EXPERT * r + 1], a[EXPERT][1])
    assert torch.equal(fused_b[: TINY.moe_ffn_hidden_size, 1 * experts + EXPERT], b[EXPERT][0][:, 1])
    back = unstack_experts(fused_a, fused_b, r, modules)
    for e in range(experts):
        assert torch.equal(back[e][0], a[e]) and all(torch.equal(x, y) for x, y in zip(back[e][1], b[e]))
    again = stack_experts([x for x, _ in back], [y for _, y in back])
    assert torch.equal(again[0], fused_a) and torch.equal(again[1], fused_b)
