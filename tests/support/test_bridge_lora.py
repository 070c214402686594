"""bridge_lora.py reproduces Megatron-Bridge's adapters: names, TP layout, math (dense, and MoE experts and router).

Facts checked here are listed with source references in BRIDGE_FACTS.md. All
torch work runs in forked gloo ranks (multiprocess.run_ranks); the parent only
compares what the ranks return.
"""

import zlib

import pytest
import torch

from tests.support import tiny_gpt as tg
from tests.support.multiprocess import run_ranks

CFG = tg.TinyGPTConfig()
ATOL = 1e-5
DIM, ALPHA = 8, 16
VARIANTS = ("lora", "canonical", "dora")


# ------------------------------------------------------------------ rank-side helpers


def _fill_dora_magnitudes(model_or_chunks, seed: int) -> None:
    """Layout-independent DoRA magnitudes (tg.fill_lora_random cannot place them).

    Bridge leaves ``adapter.weight_magnitude`` untagged (no tensor_model_parallel
    attribute) although, for a column-parallel base (linear_qkv, linear_fc1), it
    is a TP shard of the base's output rows, [gate_t; up_t] for gated fc1. Here
    the global vector is seeded from its global name and sliced like the base.
    """
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    chunks = model_or_chunks if isinstance(model_or_chunks, list) else [model_or_chunks]
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            for name, module in layer.named_modules():
                mag = getattr(getattr(module, "adapter", None), "weight_magnitude", None)
                if mag is None:
                    continue
                gname = f"decoder.layers.{layer.layer_number - 1}.{name}.adapter.weight_magnitude"
                n = module.to_wrap.output_size
                gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{gname}".encode()))
                full = 1.0 + 0.05 * torch.randn(n, generator=gen)
                if module.to_wrap.weight.partition_dim == 0:  # column-parallel base: sharded rows
                    stride = 2 if name.endswith("linear_fc1") and chunk.config.gated_linear_unit else 1
                    full = torch.cat(torch.split(full, n // (tp * stride))[rank::tp])
                with torch.no_grad():
                    mag.copy_(full)


def _build(variant, tp=1, pp=1, vpp=None, sp=False, cfg=CFG, quirks=False, fill=True, **kw):
    from tests.support.bridge_lora import apply_bridge_lora

    tg.init_parallel(tp=tp, pp=pp, vpp=vpp)
    model = tg.build_gpt(cfg, sequence_parallel=sp)
    apply_bridge_lora(model, variant=variant, dim=DIM, alpha=ALPHA, bridge_tp_quirks=quirks, **kw)
    if fill:
        tg.fill_lora_random(model, seed=7)
        _fill_dora_magnitudes(model, seed=11)
    return model


def _layouts_rank(rank, world_size, variant):
    from tests.support.bridge_lora import set_adapters_enabled

    tokens = tg.sample_tokens(CFG)
    tg.init_parallel(tp=1)
    out = {"base": tg.megatron_logits(tg.build_gpt(CFG), tokens)}
    for name, tp, pp, vpp, sp in [
        ("tp1", 1, 1, None, False),
        ("tp2", 2, 1, None, False),
        ("tp2-sp", 2, 1, None, True),
        ("pp2-vpp2", 1, 2, 2, False),
    ]:
        model = _build(variant, tp=tp, pp=pp, vpp=vpp, sp=sp)
        out[name] = tg.megatron_logits(model, tokens)
        if name == "tp2":
            set_adapters_enabled(model, False)
            out["tp2-disabled"] = tg.megatron_logits(model, tokens)
    ref = out["tp1"]
    return {name: (x - ref).abs().max().item() for name, x in out.items()} | {
        "disabled-vs-base": (out["tp2-disabled"] - out["base"]).abs().max().item()
    }


# ---------------------------------------------------------------------- logits


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_are_layout_independent(variant):
    diffs = run_ranks(_layouts_rank, 2, variant)[0]
    print(variant, diffs)
    assert diffs["base"] > 1e-2, f"random {variant} adapters do not change the logits"
    for layout in ("tp2", "tp2-sp", "pp2-vpp2"):
        assert diffs[layout] <= ATOL, (layout, diffs)
    assert diffs["disabled-vs-base"] <= ATOL, diffs


# ------------------------------------------------------------- names and layout


def _names_rank(rank, world_size, variant):
    model = _build(variant, tp=2, fill=False)
    params = {
        n: (
            tuple(p.shape),
            getattr(p, "tensor_model_parallel", None),
            getattr(p, "partition_dim", None),
            p.requires_grad,
        )
        for n, p in model.named_parameters()
    }
    return params, list(model.state_dict().keys())


def _expected_tp2(variant):
    """{named_parameters name (layer 0): (local shape at TP=2, tensor_model_parallel, partition_dim)}."""
    L = "decoder.layers.0."
    qkv, proj, fc1, fc2 = (
        L + "self_attention.linear_qkv.",
        L + "self_attention.linear_proj.",
        L + "mlp.linear_fc1.",
        L + "mlp.linear_fc2.",
    )
    # TinyGPTConfig: h=64, 8 heads, 4 groups, d=8 -> qkv rows 128; ffn 96 (fc1 rows 192); dim 8
    exp = {
        qkv + "to_wrap.weight": ((64, 64), True, 0),
        proj + "to_wrap.weight": ((64, 32), True, 1),
        fc1 + "to_wrap.weight": ((96, 64), True, 0),
        fc2 + "to_wrap.weight": ((64, 48), True, 1),
        # row-parallel base: A is RowParallelLinear (in sharded), B gathers its output
        proj + "adapter.linear_in.weight": ((8, 32), True, 1),
        proj + "adapter.linear_out.weight": ((32, 8), True, 0),
        fc2 + "adapter.linear_in.weight": ((8, 48), True, 1),
        fc2 + "adapter.linear_out.weight": ((32, 8), True, 0),
    }
    if variant == "canonical":
        parts = {
            qkv: {"adapter_q": 64, "adapter_k": 32, "adapter_v": 32},  # global q / kv rows
            fc1: {"adapter_up": 96, "adapter_gate": 96},  # ffn rows each
        }
        for mod, rows_of in parts.items():
            for key, rows in rows_of.items():
                exp[f"{mod}adapter.{key}.linear_in.weight"] = ((4, 64), True, 0)
                exp[f"{mod}adapter.{key}.linear_out.weight"] = ((rows // 2, 8), True, 0)
    else:
        # column-parallel base: A's rank dim is sharded (output all-gathered), B's out dim sharded
        exp[qkv + "adapter.linear_in.weight"] = ((4, 64), True, 0)
        exp[qkv + "adapter.linear_out.weight"] = ((64, 8), True, 0)
        exp[fc1 + "adapter.linear_in.weight"] = ((4, 64), True, 0)
        exp[fc1 + "adapter.linear_out.weight"] = ((96, 8), True, 0)
    if variant == "dora":
        # local rows of the base output; never tagged tensor-parallel by Bridge
        exp[qkv + "adapter.weight_magnitude"] = ((64,), None, None)
        exp[proj + "adapter.weight_magnitude"] = ((64,), None, None)
        exp[fc1 + "adapter.weight_magnitude"] = ((96,), None, None)
        exp[fc2 + "adapter.weight_magnitude"] = ((64,), None, None)
    return exp


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", VARIANTS)
def test_names_shapes_and_tp_attributes_at_tp2(variant):
    params, sd_keys = run_ranks(_names_rank, 2, variant)[0]
    layer0 = {n: v for n, v in params.items() if n.startswith("decoder.layers.0.") and "layernorm" not in n}
    expected = _expected_tp2(variant)
    assert {n: v[:3] for n, v in layer0.items()} == expected
    for name, (*_, trainable) in params.items():
        assert trainable == (".adapter." in name), name  # Bridge freezes everything else

    # state_dict: base keeps its pre-wrap key (no "to_wrap."), adapters under ".adapter.",
    # every megatron linear contributes an "_extra_state" entry
    sd0 = {k for k in sd_keys if k.startswith("decoder.layers.0.") and "layernorm" not in k}
    want = {n.replace(".to_wrap.", ".") for n in expected}
    want |= {n.rsplit(".", 1)[0] + "._extra_state" for n in want if n.endswith(".weight")}
    assert sd0 == want
    # a few literal names, spelled out
    if variant == "lora":
        assert "decoder.layers.0.self_attention.linear_qkv.to_wrap.weight" in params
        assert "decoder.layers.0.self_attention.linear_qkv.weight" in sd_keys
        assert "decoder.layers.0.mlp.linear_fc1.adapter.linear_out.weight" in sd_keys
    if variant == "canonical":
        assert "decoder.layers.0.self_attention.linear_qkv.adapter.adapter_q.linear_in.weight" in sd_keys
        assert "decoder.layers.0.mlp.linear_fc1.adapter.adapter_gate.linear_out.weight" in params
    if variant == "dora":
        assert "decoder.layers.0.self_attention.linear_proj.adapter.weight_magnitude" in sd_keys
        assert "decoder.layers.0.self_attention.linear_proj.adapter.weight_magnitude" in params


# ------------------------------------------------------------- torch_dist layout


def _torch_dist_rank(rank, world_size, variant, tp):
    """This rank's main-replica adapter shards as torch_dist would write them."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    model = _build(variant, tp=tp)
    sd = model.sharded_state_dict()
    apply_factories(sd)
    shards = []

    def visit(value):
        if isinstance(value, ShardedTensor):
            if ".adapter." in value.key and is_main_replica(value.replica_id):
                shards.append(
                    (value.key, value.global_shape, value.global_offset, value.prepend_axis_num, value.data.clone())
                )
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    visit(sd)
    return shards


def _assemble(per_rank):
    out = {}
    for shards in per_rank:
        for key, gshape, goff, npre, data in shards:
            full = out.setdefault(key, torch.full(gshape, float("nan")))
            idx = tuple(goff[:npre]) + tuple(slice(o, o + s) for o, s in zip(goff[npre:], data.shape))
            full[idx] = data
    for key, full in out.items():
        assert not torch.isnan(full).any(), f"{key} not fully covered"
    return out


def _swap_halves_per_rank(t, tp, dim):
    """Global layout the SwiGLU factory writes for a tensor that is NOT [gate; up]:
    rank r's shard is split in halves h0,h1 and stored at blocks r and r+tp of 2*tp."""
    blocks = torch.chunk(t, 2 * tp, dim=dim)  # true order: r0h0 r0h1 r1h0 r1h1 ...
    return torch.cat([blocks[2 * r] for r in range(tp)] + [blocks[2 * r + 1] for r in range(tp)], dim=dim)


def _rank_interleave(t, tp, dim):
    """Contiguous TP concat of [gate_t; up_t] shards, given the true [gate; up] tensor."""
    gate, up = torch.chunk(t, 2, dim=dim)
    g, u = torch.chunk(gate, tp, dim=dim), torch.chunk(up, tp, dim=dim)
    return torch.cat([x for r in range(tp) for x in (g[r], u[r])], dim=dim)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_dist_layout(variant):
    tp1 = _assemble(run_ranks(_torch_dist_rank, 1, variant, 1))
    tp2 = _assemble(run_ranks(_torch_dist_rank, 2, variant, 2))
    assert set(tp1) == set(tp2)
    # layer-stacked keys: no layer index, leading axis = num_layers
    fc1_b = (
        "decoder.layers.mlp.linear_fc1.adapter.linear_out.weight"
        if variant != "canonical"
        else "decoder.layers.mlp.linear_fc1.adapter.adapter_gate.linear_out.weight"
    )
    assert fc1_b in tp1 and tp1[fc1_b].shape[0] == CFG.num_layers
    for key in sorted(tp1):
        a, b = tp1[key], tp2[key]
        if variant == "canonical" and ".linear_fc1.adapter.adapter_" in key and key.endswith("linear_out.weight"):
            # Bridge applies the SwiGLU factory to the per-half B's too: TP-dependent permutation
            assert not torch.equal(a, b), key
            assert torch.equal(_swap_halves_per_rank(a, 2, dim=1), b), key
        elif variant == "dora" and key == "decoder.layers.mlp.linear_fc1.adapter.weight_magnitude":
            # magnitude is TP-sharded on axis 0 WITHOUT the SwiGLU split: [g0; u0; g1; u1]
            assert torch.equal(_rank_interleave(a, 2, dim=1), b), key
        else:
            assert torch.equal(a, b), key


# ---------------------------------------------------------------- DoRA vs peft


def _dora_vs_peft_rank(rank, world_size):
    import peft
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from torch import nn

    from tests.support.bridge_lora import apply_bridge_lora

    tg.init_parallel(tp=1)
    config = tg.transformer_config(CFG)
    init = nn.init.normal_
    holder = nn.Module()
    # qkv-like: column-parallel, bias added inside the output (skip_bias_add=False)
    holder.linear_qkv = ColumnParallelLinear(64, 40, config=config, init_method=init, bias=True, gather_output=False)
    # proj-like: row-parallel, no bias
    holder.linear_proj = RowParallelLinear(
        64, 48, config=config, init_method=init, bias=False, input_is_parallel=True, skip_bias_add=True
    )
    with torch.no_grad():
        holder.linear_qkv.bias.normal_()
    apply_bridge_lora(holder, variant="dora", dim=DIM, alpha=ALPHA, target_modules=("linear_qkv", "linear_proj"))

    twin = nn.Module()
    twin.q, twin.p = nn.Linear(64, 40, bias=True), nn.Linear(64, 48, bias=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("linear_qkv", "linear_proj"):
            w = getattr(holder, name)
            for p in (w.adapter.linear_in.weight, w.adapter.linear_out.weight):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            w.adapter.weight_magnitude.mul_(1 + 0.2 * torch.randn(w.adapter.weight_magnitude.shape, generator=gen))
        twin.q.weight.copy_(holder.linear_qkv.to_wrap.weight)
        twin.q.bias.copy_(holder.linear_qkv.to_wrap.bias)
        twin.p.weight.copy_(holder.linear_proj.to_wrap.weight)
    cfg = peft.LoraConfig(r=DIM, lora_alpha=ALPHA, use_dora=True, target_modules=["q", "p"], lora_dropout=0.0)
    twin = peft.get_peft_model(twin, cfg).base_model.model
    with torch.no_grad():
        for ours, theirs in (("linear_qkv", twin.q), ("linear_proj", twin.p)):
            w = getattr(holder, ours).adapter
            theirs.lora_A["default"].weight.copy_(w.linear_in.weight)
            theirs.lora_B["default"].weight.copy_(w.linear_out.weight)
            theirs.lora_magnitude_vector["default"].weight.copy_(w.weight_magnitude)
    holder.eval()
    twin.eval()
    x = torch.randn(5, 2, 64, generator=gen)
    with torch.no_grad():
        proj_ours, proj_bias = holder.linear_proj(x)
        qkv_ours, qkv_bias = holder.linear_qkv(x)
        w = holder.linear_qkv
        scale = w.adapter.weight_magnitude / w._get_weight_norm()
        return {
            "proj": (proj_ours - twin.p(x)).abs().max().item(),
            "proj_bias_is_none": proj_bias is None,
            "qkv_bias_returned": qkv_bias is not None,
            # Bridge scales the in-output bias by m/||W+sBA||; peft adds it unscaled
            "qkv_raw": (qkv_ours - twin.q(x)).abs().max().item(),
            "qkv_bias_term": (qkv_ours - twin.q(x) - (scale - 1) * w.to_wrap.bias).abs().max().item(),
        }


@pytest.mark.timeout(300)
def test_dora_math_vs_peft_dora():
    r = run_ranks(_dora_vs_peft_rank, 1)[0]
    print(r)
    assert r["proj_bias_is_none"] and not r["qkv_bias_returned"]
    assert r["proj"] <= 1e-5  # identical to peft's DoRA for a bias-free linear
    assert r["qkv_raw"] > 1e-3  # differs when the base adds its bias inside the output ...
    assert r["qkv_bias_term"] <= 1e-5  # ... by exactly (m/||W+sBA|| - 1) * bias


# ------------------------------------------------------------------ TP quirks


def _quirks_rank(rank, world_size):
    from megatron.core import parallel_state as ps

    tokens = tg.sample_tokens(CFG)
    res = {}
    tg.init_parallel(tp=1)
    ref = tg.megatron_logits(_build("dora", tp=1), tokens)
    quirky = tg.megatron_logits(_build("dora", tp=2, quirks=True), tokens)
    res["dora_quirks_tp2"] = (quirky - ref).abs().max().item()
    # Bridge's initial row-parallel magnitude is the norm over the rank's input columns only
    model = _build("dora", tp=2, quirks=True, fill=False)
    mag = model.decoder.layers[0].self_attention.linear_proj.adapter.weight_magnitude.detach()
    sq = mag.pow(2)
    torch.distributed.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
    full = tg.global_base_weights(CFG)["decoder.layers.0.self_attention.linear_proj.weight"].norm(dim=1)
    res["dora_partial_norm_sq_sums_to_full"] = (sq.sqrt() - full).abs().max().item()
    res["dora_partial_norm_is_partial"] = (mag - full).abs().max().item()

    ref = tg.megatron_logits(_build("canonical", tp=1), tokens)
    quirky = tg.megatron_logits(_build("canonical", tp=2, quirks=True), tokens)
    res["canonical_quirks_tp2"] = (quirky - ref).abs().max().item()
    odd = tg.TinyGPTConfig(seq_length=15)
    odd_tokens = tg.sample_tokens(odd)
    tg.megatron_logits(_build("canonical", tp=2, cfg=odd), odd_tokens)  # TP-consistent path: fine
    try:
        tg.megatron_logits(_build("canonical", tp=2, cfg=odd, quirks=True), odd_tokens)
        res["canonical_odd_tokens"] = "ok"
    except RuntimeError as e:
        res["canonical_odd_tokens"] = str(e)
    return res


@pytest.mark.timeout(300)
def test_bridge_tp_quirks():
    r = run_ranks(_quirks_rank, 2)[0]
    print(r)
    assert r["dora_quirks_tp2"] > 1e-2  # Bridge's DoRA at TP=2 is not the TP=1 function
    assert r["dora_partial_norm_sq_sums_to_full"] <= 1e-5
    assert r["dora_partial_norm_is_partial"] > 1e-2
    assert r["canonical_quirks_tp2"] <= ATOL  # global head counts: same values ...
    assert "is invalid for input of size" in r["canonical_odd_tokens"]  # ... but s*b % tp != 0 fails


# --------------------------------------------------------------- target matching


def _targets_rank(rank, world_size):
    from tests.support.bridge_lora import BridgeAdapterWrapper

    wild = _build("lora", fill=False, target_modules=("*.layers.1.*.linear_qkv", "linear_fc2"))
    part = _build("canonical", tp=2, target_modules=("linear_q", "linear_v", "linear_fc1_up"))
    tg.fill_lora_random(part, seed=7)
    logits = tg.megatron_logits(part, tg.sample_tokens(CFG))
    wrapped = sorted(n for n, m in wild.named_modules() if isinstance(m, BridgeAdapterWrapper))
    part_names = sorted(n for n, _ in part.named_parameters() if "layers.0." in n and ".adapter." in n)
    return wrapped, part_names, bool(torch.isfinite(logits).all())


@pytest.mark.timeout(300)
def test_target_matching():
    wrapped, part_names, finite = run_ranks(_targets_rank, 2)[0]
    assert wrapped == [
        "decoder.layers.0.mlp.linear_fc2",
        "decoder.layers.1.mlp.linear_fc2",
        "decoder.layers.1.self_attention.linear_qkv",
        "decoder.layers.2.mlp.linear_fc2",
        "decoder.layers.3.mlp.linear_fc2",
    ]
    p = "decoder.layers.0."
    assert part_names == sorted(
        [
            p + "mlp.linear_fc1.adapter.adapter_up.linear_in.weight",
            p + "mlp.linear_fc1.adapter.adapter_up.linear_out.weight",
            p + "self_attention.linear_qkv.adapter.adapter_q.linear_in.weight",
            p + "self_attention.linear_qkv.adapter.adapter_q.linear_out.weight",
            p + "self_attention.linear_qkv.adapter.adapter_v.linear_in.weight",
            p + "self_attention.linear_qkv.adapter.adapter_v.linear_out.weight",
        ]
    )
    assert finite


# ------------------------------------------------------------------ MoE (BRIDGE_FACTS.md section 7)


def _expert_names_rank(rank, world_size, expert_adapters, layout):
    from tests.support import tiny_moe
    from tests.support.bridge_lora import apply_bridge_lora

    tiny_moe.init_moe_parallel(**layout)
    model = tiny_moe.build_moe_gpt(tiny_moe.MIXTRAL_LIKE, grouped_experts=True)
    apply_bridge_lora(model, dim=DIM, alpha=ALPHA, target_modules=("linear_fc1", "linear_fc2", "router"), expert_adapters=expert_adapters)
    return {
        name.removeprefix("decoder.layers.0.mlp."): (tuple(p.shape), getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None)
        for name, p in model.named_parameters() if name.startswith("decoder.layers.0.mlp.") and ".adapter." in name
    }


# hidden 64, moe ffn 32 (fc1 out 64), 4 experts; EP2 x ETP2: 2 local experts, expert TP 2; router on the TP group (1 here)
_EXPERT_SHAPES = {
    "shared": {
        "experts.linear_fc1.adapter.linear_in.weight": ((DIM // 2, 64), 0),
        "experts.linear_fc1.adapter.linear_out.weight": ((64 // 2, DIM), 0),
        "experts.linear_fc2.adapter.linear_in.weight": ((DIM, 32 // 2), 1),
        "experts.linear_fc2.adapter.linear_out.weight": ((64 // 2, DIM), 0),
    },
    "per_expert": {
        "experts.linear_fc1.adapter.linear_in.weight": ((2, DIM // 2, 64), 1),
        "experts.linear_fc1.adapter.linear_out.weight": ((2, 64 // 2, DIM), 1),
        "experts.linear_fc2.adapter.linear_in.weight": ((2, DIM, 32 // 2), 2),
        "experts.linear_fc2.adapter.linear_out.weight": ((2, 64 // 2, DIM), 1),
    },
}
_ROUTER_SHAPES = {"router.adapter.linear_in.weight": ((DIM, 64), 0), "router.adapter.linear_out.weight": ((4, DIM), 0)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("expert_adapters", ["shared", "per_expert"])
def test_grouped_expert_adapter_names_shapes_and_tp_axes_at_ep2_etp2(expert_adapters):
    for names in run_ranks(_expert_names_rank, 4, expert_adapters, {"ep": 2, "etp": 2}):
        assert names == {**_EXPERT_SHAPES[expert_adapters], **_ROUTER_SHAPES}


@pytest.mark.timeout(300)
def test_shared_outer_names_and_shapes_at_ep2():
    names = run_ranks(_expert_names_rank, 2, "shared_outer", {"ep": 2})[0]
    assert names == {
        "experts.linear_fc1.adapter.linear_in.weight": ((DIM, 64), 0),  # shared A: a ColumnParallelLinear over expert TP (1)
        "experts.linear_fc1.adapter.linear_out.weight": ((2, 64, DIM), None),  # per-expert B: no TP attributes
        "experts.linear_fc2.adapter.linear_in.weight": ((2, DIM, 32), None),
        "experts.linear_fc2.adapter.linear_out.weight": ((64, DIM), 1),  # shared B: a RowParallelLinear
        **_ROUTER_SHAPES,
    }


def _fc2_etp2_rank(rank, world_size, expert_adapters):
    import torch.distributed as dist

    from tests.support import tiny_moe
    from tests.support.bridge_lora import apply_bridge_lora

    tiny_moe.init_moe_parallel(tp=2, etp=2)
    model = tiny_moe.build_moe_gpt(tiny_moe.MIXTRAL_LIKE, sequence_parallel=True, grouped_experts=True)
    apply_bridge_lora(model, dim=DIM, alpha=ALPHA, target_modules=("linear_fc2",), expert_adapters=expert_adapters)
    tiny_moe.fill_moe_lora_random(model, seed=3)
    adapter = model.decoder.layers[0].mlp.experts.linear_fc2.adapter
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))  # one expert's tokens, full ffn; rank t holds columns t
    a, b = adapter.linear_in.weight.detach(), adapter.linear_out.weight.detach()
    a, b = (a, b) if a.dim() == 2 else (a[0], b[0])
    y = adapter(x.chunk(2, dim=1)[rank].contiguous(), [5, 0, 0, 0]).detach()
    dist.all_reduce(y)  # the token dispatcher sums the expert-TP ranks' outputs
    parts = [torch.empty_like(t) for t in (a, a, b, b)]
    dist.all_gather(parts[:2], a.contiguous())
    dist.all_gather(parts[2:], b.contiguous())
    scale = ALPHA / DIM
    lora = scale * x @ torch.cat(parts[:2], 1).T @ torch.cat(parts[2:], 0).T
    block_diagonal = 2 * scale * torch.cat([x.chunk(2, 1)[t] @ parts[t].T @ parts[2 + t].T for t in range(2)], dim=1)
    return (y - block_diagonal).abs().max().item(), (y - lora).abs().max().item()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("expert_adapters", ["shared", "per_expert"])
def test_expert_fc2_at_etp2_computes_etp_times_a_block_diagonal_update(expert_adapters):
    """Why the exporter refuses it: summed over expert TP, the adapter gives 2 x blockdiag(B_t A_t) x, not B A x."""
    for to_block_diagonal, to_lora in run_ranks(_fc2_etp2_rank, 2, expert_adapters):
        assert to_block_diagonal < 1e-5 and to_lora > 1e-2, (to_block_diagonal, to_lora)
