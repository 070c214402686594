"""The MoE harness proves itself: Megatron MoE on CPU equals its HF twins at every layout.

Covers ``tiny_moe``: base logits vs Mixtral / Qwen3-MoE / Qwen2-MoE twins at
EP, TP x EP with sequence parallel, expert TP, PP, with SequentialMLP or grouped (TEGroupedMLP) experts; routing
identical to HF's
(top-2 of 4, several experts per token); ModelOpt LoRA on routed experts
independent of the EP layout and exportable to peft ``target_parameters``;
and the facts about ModelOpt's expert LoRA under expert TP (it is not
expert-TP aware). All torch work runs in forked ranks; the parent only
compares Python values.
"""

import dataclasses

import pytest

from tests.support import tiny_moe as tm
from tests.support.multiprocess import run_ranks

ATOL = 1e-5
QWEN3_NO_RENORM = dataclasses.replace(tm.QWEN3_MOE_LIKE, norm_topk_prob=False)
QWEN2_ALLGATHER = dataclasses.replace(tm.QWEN2_MOE_LIKE, moe_token_dispatcher_type="allgather")


def _base_vs_hf(rank, world_size, cfg, family, layout):
    layout = dict(layout)
    sp, grouped = layout.pop("sp", False), layout.pop("grouped", False)
    tm.init_moe_parallel(**layout)
    model = tm.build_moe_gpt(cfg, sequence_parallel=sp, grouped_experts=grouped)
    tokens = tm.sample_tokens(cfg)
    logits = tm.megatron_moe_logits(model, tokens)
    if rank != 0:
        return None
    ref = tm.hf_logits(tm.hf_moe_twin(cfg, family), tokens)
    return (logits - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "world,cfg,family,layout",
    [
        (1, tm.MIXTRAL_LIKE, "mixtral", {}),
        (1, tm.QWEN3_MOE_LIKE, "qwen3_moe", {}),
        (1, QWEN3_NO_RENORM, "qwen3_moe", {}),
        (1, tm.QWEN2_MOE_LIKE, "qwen2_moe", {}),
        (2, tm.MIXTRAL_LIKE, "mixtral", {"ep": 2}),
        (2, tm.QWEN3_MOE_LIKE, "qwen3_moe", {"tp": 2, "ep": 2, "etp": 1, "sp": True}),
        (4, tm.QWEN3_MOE_LIKE, "qwen3_moe", {"tp": 2, "ep": 2, "sp": True}),
        (4, QWEN2_ALLGATHER, "qwen2_moe", {"tp": 2, "ep": 2, "sp": True}),
        (2, tm.MIXTRAL_LIKE, "mixtral", {"tp": 2, "etp": 2, "sp": True}),
        (4, tm.QWEN2_MOE_LIKE, "qwen2_moe", {"ep": 2, "etp": 2}),
        (2, tm.QWEN3_MOE_LIKE, "qwen3_moe", {"pp": 2}),
        (4, tm.MIXTRAL_LIKE, "mixtral", {"pp": 2, "ep": 2}),
        (1, tm.MIXTRAL_LIKE, "mixtral", {"grouped": True}),
        (4, tm.QWEN3_MOE_LIKE, "qwen3_moe", {"tp": 2, "ep": 2, "sp": True, "grouped": True}),
        (4, tm.MIXTRAL_LIKE, "mixtral", {"ep": 2, "etp": 2, "grouped": True}),
    ],
    ids=[
        "mixtral-ep1",
        "qwen3-ep1",
        "qwen3-no-renorm-ep1",
        "qwen2-shared-ep1",
        "mixtral-ep2",
        "qwen3-tp2-etp1-ep2-sp",
        "qwen3-tp2xep2-sp",
        "qwen2-tp2xep2-sp-allgather",
        "mixtral-tp2-etp2-sp",
        "qwen2-tp1-etp2-ep2",
        "qwen3-pp2",
        "mixtral-pp2xep2",
        "mixtral-grouped-ep1",
        "qwen3-grouped-tp2xep2-sp",
        "mixtral-grouped-ep2-etp2",
    ],
)
def test_moe_base_model_matches_hf_twin(world, cfg, family, layout):
    diff, scale = run_ranks(_base_vs_hf, world, cfg, family, layout)[0]
    print(f"max|diff|={diff:.2e} max|logit|={scale:.2f}")
    assert scale > 0.5, "logits too small for the comparison to mean anything"
    assert diff <= ATOL


def _routing(rank, world_size, cfg, family):
    tm.init_moe_parallel()
    tokens = tm.sample_tokens(cfg)
    ours = tm.megatron_routing(tm.build_moe_gpt(cfg), tokens)
    theirs = tm.hf_routing(tm.hf_moe_twin(cfg, family), tokens)
    report = []
    for layer, hf in enumerate(theirs):
        mg = ours[layer]
        report.append(
            {
                "same_map": bool((mg["map"] == hf["map"]).all()),
                "weights_diff": (mg["weights"] - hf["weights"]).abs().max().item(),
                "experts_per_token": sorted(set(hf["map"].sum(1).tolist())),
                "tokens_per_expert": hf["map"].sum(0).tolist(),
                "distinct_pairs": len({tuple(row.nonzero().flatten().tolist()) for row in hf["map"]}),
                "weight_sums": (hf["weights"].sum(1).min().item(), hf["weights"].sum(1).max().item()),
                "margin": hf["margin"],
            }
        )
    return report


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "cfg,family",
    [(tm.MIXTRAL_LIKE, "mixtral"), (tm.QWEN3_MOE_LIKE, "qwen3_moe"), (QWEN3_NO_RENORM, "qwen3_moe")],
    ids=["mixtral", "qwen3", "qwen3-no-renorm"],
)
def test_router_matches_hf_and_spreads_tokens(cfg, family):
    for layer, r in enumerate(run_ranks(_routing, 1, cfg, family)[0]):
        print(layer, r)
        assert r["same_map"], f"layer {layer}: megatron and HF choose different experts"
        assert r["weights_diff"] <= 1e-6, (layer, r)
        assert r["experts_per_token"] == [cfg.moe_router_topk], (layer, r)
        assert min(r["tokens_per_expert"]) > 0, f"layer {layer}: an expert gets no token {r}"
        assert r["distinct_pairs"] >= 3, (layer, r)
        low, high = r["weight_sums"]
        if cfg.norm_topk_prob:
            assert abs(low - 1) < 1e-6 and abs(high - 1) < 1e-6, (layer, r)
        else:
            assert high < 1 - 1e-3, f"layer {layer}: top-k weights look renormalized {r}"
        assert r["margin"] > 1e-5, f"layer {layer}: near-tie in routing {r}"


def _lora_across_ep_layouts(rank, world_size):
    cfg = tm.QWEN3_MOE_LIKE
    tokens = tm.sample_tokens(cfg)
    logits = {}
    for name, layout in [
        ("ep1", {}),
        ("ep2", {"ep": 2}),
        ("ep4", {"ep": 4}),
        ("pp2xep2", {"pp": 2, "ep": 2}),
    ]:
        tm.init_moe_parallel(**layout)
        model = tm.build_moe_gpt(cfg)
        if name == "ep1":
            logits["no-lora"] = tm.megatron_moe_logits(model, tokens)
        tm.apply_modelopt_lora(model, rank=8, scale=2.0, targets=tm.EXPERT_LORA_TARGETS)
        tm.fill_moe_lora_random(model, seed=7)
        if name == "ep1":
            wrapped = {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n}
            n_expert_linears = sum(".local_experts." in n for n in wrapped)
        logits[name] = tm.megatron_moe_logits(model, tokens)
    diffs = {name: (x - logits["ep1"]).abs().max().item() for name, x in logits.items()}
    return diffs, n_expert_linears


@pytest.mark.timeout(300)
def test_modelopt_expert_lora_is_ep_layout_independent():
    diffs, n_expert_linears = run_ranks(_lora_across_ep_layouts, 4)[0]
    print(diffs)
    cfg = tm.QWEN3_MOE_LIKE
    assert n_expert_linears == cfg.num_layers * cfg.num_experts * 2, "LoRA missing on routed experts"
    assert diffs["no-lora"] > 1e-2, "random LoRA did not change the logits"
    for layout in ("ep2", "ep4", "pp2xep2"):
        assert diffs[layout] <= ATOL, (layout, diffs)


# ------------------------------------------- ModelOpt expert LoRA -> peft target_parameters

PEFT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _expert_lora_shards(rank, world_size, cfg, lora_rank, scale):
    """EP2, LoRA on routed experts only: this rank's adapter tensors by global name, and the logits."""
    from tests.support import tiny_gpt as tg

    tm.init_moe_parallel(ep=2)
    model = tm.build_moe_gpt(cfg)
    # "*experts*" also matches mlp.shared_experts (exported below as plain target_modules)
    tm.apply_modelopt_lora(model, rank=lora_rank, scale=scale, targets=("*experts*linear_fc1*", "*experts*linear_fc2*"))
    tm.fill_moe_lora_random(model, seed=11)
    tensors = {
        tg._global_name(model, name): param.detach().clone()
        for name, param in model.named_parameters()
        if "lora" in name
    }
    tokens = tm.sample_tokens(cfg)
    routing = tm.megatron_routing(model, tokens)
    least_used = min(int(r["map"].sum(0).min()) for r in routing.values())
    return tensors, tm.megatron_moe_logits(model, tokens), least_used


def _export_and_compare(rank, world_size, cfg, family, shards, lora_rank, scale, out_dir):
    """Hand-export the expert LoRA (TP=ETP=1: whole per-expert tensors) with tiny_moe.peft_expert_lora."""
    import peft
    from peft.tuners.lora.layer import ParamWrapper
    from safetensors.torch import load_file

    lora, logits = {}, shards[0][1]
    for tensors, _, _ in shards:
        lora.update(tensors)
    shared = bool(cfg.moe_shared_expert_intermediate_size)
    config = peft.LoraConfig(
        r=lora_rank,
        lora_alpha=scale * lora_rank,
        target_modules=[f"shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")] if shared else [],
        target_parameters=PEFT_TARGETS,
    )
    model = peft.get_peft_model(tm.hf_moe_twin(cfg, family), config)
    for i, layer in enumerate(model.base_model.model.model.layers):
        if shared:  # fused fc1: its one A under gate and up, B split by rows [gate; up]
            prefix = f"decoder.layers.{i}.mlp.shared_experts"
            fc1_a, fc1_b = (lora[f"{prefix}.linear_fc1.lora_{x}_default.weight"] for x in "ab")
            gate_b, up_b = fc1_b.chunk(2, dim=0)
            fc2_a, fc2_b = (lora[f"{prefix}.linear_fc2.lora_{x}_default.weight"] for x in "ab")
            for proj, a, b in (("gate_proj", fc1_a, gate_b), ("up_proj", fc1_a, up_b), ("down_proj", fc2_a, fc2_b)):
                module = getattr(layer.mlp.shared_expert, proj)
                module.lora_A["default"].weight.data.copy_(a)
                module.lora_B["default"].weight.data.copy_(b)
        wrappers, module = {}, layer.mlp.experts
        while isinstance(module, ParamWrapper):
            wrappers[module.parameter_name] = module
            module = module.base_layer
        for hf_param, linear in (("gate_up_proj", "linear_fc1"), ("down_proj", "linear_fc2")):
            prefix = f"decoder.layers.{i}.mlp.experts.local_experts"
            a = [lora[f"{prefix}.{e}.{linear}.lora_a_default.weight"] for e in range(cfg.num_experts)]
            b = [lora[f"{prefix}.{e}.{linear}.lora_b_default.weight"] for e in range(cfg.num_experts)]
            lora_a, lora_b = tm.peft_expert_lora(a, b)
            wrappers[hf_param].lora_A["default"].weight.data.copy_(lora_a)
            wrappers[hf_param].lora_B["default"].weight.data.copy_(lora_b)
    model.save_pretrained(out_dir)
    keys = {
        k: tuple(v.shape)
        for k, v in load_file(out_dir / "adapter_model.safetensors").items()
        if ".layers.0.mlp.experts." in k
    }
    diff = tm.compare_moe_peft(out_dir, cfg, tm.sample_tokens(cfg), logits, family=family)
    return diff, keys


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "cfg,family", [(tm.MIXTRAL_LIKE, "mixtral"), (tm.QWEN2_MOE_LIKE, "qwen2_moe")], ids=["mixtral", "qwen2"]
)
def test_modelopt_expert_lora_exports_to_peft_target_parameters(cfg, family, tmp_path):
    lora_rank, scale = 4, 2.0
    shards = run_ranks(_expert_lora_shards, 2, cfg, lora_rank, scale)
    assert min(least_used for _, _, least_used in shards) > 0, "an expert got no token: its LoRA is untested"
    diff, keys = run_ranks(_export_and_compare, 1, cfg, family, shards, lora_rank, scale, tmp_path)[0]
    print(f"HF+PEFT vs Megatron EP2: {diff:.2e}", keys)
    assert diff <= ATOL
    # Two parameters of one module: peft nests ParamWrappers in the module's parameter
    # order, so gate_up_proj (registered first) is the inner one, under "base_layer".
    r_e, h, f = lora_rank * cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
    layer = "base_model.model.model.layers.0.mlp.experts"
    assert keys == {
        f"{layer}.base_layer.lora_A.weight": (r_e, h),
        f"{layer}.base_layer.lora_B.weight": (2 * f, r_e),
        f"{layer}.lora_A.weight": (r_e, f),
        f"{layer}.lora_B.weight": (h, r_e),
    }


# ------------------------------------------------ ModelOpt expert LoRA under expert TP


def _group_name(group):
    from megatron.core import parallel_state as ps

    if group is ps.get_expert_tensor_parallel_group():
        return "expert-tp"
    return "tp" if group is ps.get_tensor_model_parallel_group() else "other"


def _modelopt_expert_tp_facts(rank, world_size):
    cfg = tm.MIXTRAL_LIKE
    tokens = tm.sample_tokens(cfg)
    facts = {}

    def lora_logits(layout, targets, scale, sp=False):
        tm.init_moe_parallel(**layout)
        model = tm.build_moe_gpt(cfg, sequence_parallel=sp)
        tm.apply_modelopt_lora(model, rank=4, scale=scale, targets=targets)
        tm.fill_moe_lora_random(model, seed=5)
        return model, tm.megatron_moe_logits(model, tokens)

    # EP2 (TP=ETP=1): how ModelOpt builds an expert's LoRA sub-layers.
    model, _ = lora_logits({"ep": 2}, tm.ROUTED_EXPERT_TARGETS, 2.0)
    expert = model.decoder.layers[0].mlp.experts.local_experts[0]
    fc1_b = expert.linear_fc1._lora_adapters["default"]["lora_b"]
    fc2_a = expert.linear_fc2._lora_adapters["default"]["lora_a"]
    facts["ep2"] = {
        "base_fc1_is_expert": expert.linear_fc1.is_expert,
        "base_fc1_allreduce": expert.linear_fc1.weight.allreduce,
        "fc1_lora_b": (type(fc1_b).__name__, fc1_b.is_expert, fc1_b.weight.partition_dim),
        "fc2_lora_a": (type(fc2_a).__name__, fc2_a.is_expert, fc2_a.weight.partition_dim),
        "lora_allreduce": sorted({getattr(p, "allreduce", True) for n, p in expert.named_parameters() if "lora" in n}),
        "base_group": _group_name(expert.linear_fc1.tp_group),
        "fc1_lora_b_group": _group_name(fc1_b.tp_group),
        "fc2_lora_a_group": _group_name(fc2_a.tp_group),
    }
    # TP = ETP = 2 without SP: fc1 LoRA right, fc2 LoRA added once per TP rank.
    ref_fc1 = lora_logits({}, (tm.ROUTED_EXPERT_TARGETS[0],), 2.0)[1]
    ref_fc2 = lora_logits({}, (tm.ROUTED_EXPERT_TARGETS[1],), 2.0)[1]
    ref_fc2_x2 = lora_logits({}, (tm.ROUTED_EXPERT_TARGETS[1],), 4.0)[1]
    fc1 = lora_logits({"tp": 2}, (tm.ROUTED_EXPERT_TARGETS[0],), 2.0)[1]
    facts["tp2-etp2"] = {"fc1_vs_tp1": (fc1 - ref_fc1).abs().max().item()}
    fc2 = lora_logits({"tp": 2}, (tm.ROUTED_EXPERT_TARGETS[1],), 2.0)[1]
    facts["tp2-etp2"]["fc2_vs_tp1"] = (fc2 - ref_fc2).abs().max().item()
    facts["tp2-etp2"]["fc2_vs_tp1_double_scale"] = (fc2 - ref_fc2_x2).abs().max().item()
    # Both ranks fail at the same op, so the world stays in step for the next layout.
    for name, layout, sp in [("tp1-etp2", {"etp": 2}, False), ("tp2-etp2-sp", {"tp": 2}, True)]:
        try:
            lora_logits(layout, (tm.ROUTED_EXPERT_TARGETS[0],), 2.0, sp=sp)
            facts[name] = "ran"
        except RuntimeError as e:
            facts[name] = str(e)
    return facts


@pytest.mark.timeout(300)
def test_modelopt_expert_lora_is_not_expert_tp_aware():
    """Fact sheet (modelopt 0.47): LoRA on routed experts is only right at TP = ETP = 1.

    ModelOpt builds an expert linear's lora_b (column-parallel base) / lora_a
    (row-parallel base) as plain megatron Column/RowParallelLinear on the
    regular TP group (is_expert=False, no expert-TP group, allreduce=True, so
    Megatron DDP would also reduce their grads over the dense DP group, across
    ranks holding different experts). If this test starts failing, ModelOpt
    changed: update the exporter's expert rules and DESIGN.md.
    """
    facts = run_ranks(_modelopt_expert_tp_facts, 2)[0]
    print(facts)
    assert facts["ep2"] == {
        "base_fc1_is_expert": True,
        "base_fc1_allreduce": False,
        "fc1_lora_b": ("ColumnParallelLinear", False, 0),
        "fc2_lora_a": ("RowParallelLinear", False, 1),
        "lora_allreduce": [True],
        "base_group": "expert-tp",
        "fc1_lora_b_group": "tp",
        "fc2_lora_a_group": "tp",
    }
    assert facts["tp2-etp2"]["fc1_vs_tp1"] <= ATOL
    assert facts["tp2-etp2"]["fc2_vs_tp1"] > 1e-2
    assert facts["tp2-etp2"]["fc2_vs_tp1_double_scale"] <= ATOL
    assert "must match the size" in facts["tp1-etp2"]
    assert "must match the size" in facts["tp2-etp2-sp"]
