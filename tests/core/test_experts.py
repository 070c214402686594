"""The fused expert layout checked by peft itself: per-expert LoRA -> target_parameters tensors, loaded into a
transformers v5 Qwen3-MoE, against the same deltas merged into the expert weights by hand."""

import copy
import dataclasses
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import save_file

from megatron_peft_export.core.archs import QWEN_MOE
from megatron_peft_export.core.experts import expert_of, fuse_experts, fused_layout, unfuse_experts
from megatron_peft_export.core.geometry import ModelGeometry
from megatron_peft_export.core.peft_format import adapter_config
from megatron_peft_export.core.plan import allocate, apply_placements, plan_adapter
from megatron_peft_export.core.shards import ShardSpec
from megatron_peft_export.errors import DialectError, ShapeMismatchError

E, R, H, I, LAYERS = 4, 2, 16, 8, 2  # noqa: E741 (the ffn size, as in the formulas)
SCALE = 1.5


def _hf():
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=32,
        hidden_size=H,
        intermediate_size=24,
        moe_intermediate_size=I,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=E,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def _expert_loras(skip=None):
    g = torch.Generator().manual_seed(1)
    loras = {}
    for layer in range(LAYERS):
        for e in range(E):
            if (layer, e) == skip:
                continue
            base = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}"
            loras[f"{base}.linear_fc1"] = (
                torch.randn(R, H, generator=g) * 0.3,
                torch.randn(2 * I, R, generator=g) * 0.3,
            )  # B rows [gate; up]
            loras[f"{base}.linear_fc2"] = (torch.randn(R, I, generator=g) * 0.3, torch.randn(H, R, generator=g) * 0.3)
    return loras


GEOMETRY = ModelGeometry(
    num_layers=LAYERS,
    hidden_size=H,
    num_attention_heads=2,
    num_query_groups=1,
    head_dim=8,
    ffn_hidden_size=24,
    gated_linear_unit=True,
    num_experts=E,
    moe_ffn_hidden_size=I,
)


def _convert(loras):
    geo = GEOMETRY
    pairs = []
    for module, (a, b) in loras.items():
        for role, t in (("lora_A", a), ("lora_B", b)):
            pairs.append(
                (
                    ShardSpec(
                        module=module,
                        role=role,
                        shape=tuple(t.shape),
                        split_dim=None,
                        tp_rank=0,
                        tp_size=1,
                        alpha=SCALE * R,
                    ),
                    t,
                )
            )
    plan = plan_adapter([s for s, _ in pairs], geo, QWEN_MOE)
    tensors = allocate(plan)
    for placements, (_, t) in zip(plan.placements, pairs):
        apply_placements(tensors, placements, t)
    return plan, tensors


def test_dora_on_fused_target_parameters_is_refused_by_name():
    """peft has no DoRA on target_parameters (it refuses to load such an adapter): the config is never written."""
    plan, tensors = _convert(_expert_loras())
    _, replaced = fuse_experts(plan, tensors, QWEN_MOE, E)
    with pytest.raises(DialectError, match=r"^qwen2_moe: found DoRA on linears .*mlp\.experts\.down_proj"):
        adapter_config(dataclasses.replace(plan, use_dora=True), None, fused_experts=replaced, model_type="qwen2_moe")
    assert adapter_config(dataclasses.replace(plan, use_dora=True), None)["use_dora"] is True  # per-expert modules


def test_fused_expert_adapter_loads_into_transformers_v5_and_matches_merged_weights(tmp_path):
    assert int(transformers.__version__.split(".")[0]) >= 5
    loras = _expert_loras()
    plan, tensors = _convert(loras)
    fused, replaced = fuse_experts(plan, tensors, QWEN_MOE, E)
    assert sorted(replaced) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    config = adapter_config(plan, None, fused_experts=replaced)
    assert (
        config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        and config["target_modules"] == []
    )
    save_file(fused, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    base = _hf()
    merged = copy.deepcopy(base)
    with torch.no_grad():  # the HF expert weights plus scale * B @ A, by hand
        for layer in range(LAYERS):
            experts = merged.model.layers[layer].mlp.experts
            for e in range(E):
                a1, b1 = loras[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1"]
                a2, b2 = loras[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc2"]
                experts.gate_up_proj[e] += SCALE * b1 @ a1
                experts.down_proj[e] += SCALE * b2 @ a2
    tokens = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
    model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    loaded = peft.get_peft_model_state_dict(model)
    assert set(loaded) == set(fused), "every file key must be one peft holds, and the reverse"
    with torch.no_grad():
        diff = (model(input_ids=tokens).logits - merged(input_ids=tokens).logits).abs().max().item()
        effect = (merged(input_ids=tokens).logits - _hf()(input_ids=tokens).logits).abs().max().item()
    assert diff < 1e-5 and effect > 1e-2, (diff, effect)


def _placed(loras):
    """The fused tensors filled through `fused_layout`'s views: the plan's placements write straight into them."""
    plan, _ = _convert(loras)
    layout = fused_layout(plan, QWEN_MOE, E)
    written = {key: torch.full(shape, float("nan")) for key, shape in layout.shapes.items()}
    targets = layout.targets(written)
    assert targets.keys() == plan.shapes.keys()
    pairs = [t for a_b in loras.values() for t in a_b]
    for placements, t in zip(plan.placements, pairs):
        apply_placements(targets, placements, t)
    return layout, written


def test_stacking_by_placement_gives_what_fusing_the_per_expert_tensors_gives():
    """Placed into views of the fused tensors, the shards give fuse_experts' tensors and modules, in its key order,
    every value written (the fused tensors start as NaN)."""
    plan, tensors = _convert(_expert_loras())
    expected, replaced = fuse_experts(plan, tensors, QWEN_MOE, E)
    layout, written = _placed(_expert_loras())
    assert list(written) == list(expected) and layout.replaced == replaced
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_stacking_by_placement_leaves_the_uncommon_cases_to_fuse_experts():
    """An expert without adapter, or gate and up with lora_A from different shards: no layout, so fuse_experts runs
    (and refuses, naming the problem)."""
    plan, _ = _convert(_expert_loras(skip=(1, 2)))
    assert fused_layout(plan, QWEN_MOE, E) is None
    loras = _expert_loras()
    first = "decoder.layers.0.mlp.experts.local_experts.0"
    canonical = [(f"{first}.linear_fc1", part) for part in ("gate", "up")]
    specs = [
        ShardSpec(module=m, role=role, shape=shape, split_dim=None, tp_rank=0, tp_size=1, alpha=SCALE * R, part=part)
        for m, part in canonical
        for role, shape in (("lora_A", (R, H)), ("lora_B", (I, R)))
    ]
    specs += [
        ShardSpec(module=m, role=role, shape=tuple(t.shape), split_dim=None, tp_rank=0, tp_size=1, alpha=SCALE * R)
        for m, (a, b) in loras.items()
        if m != f"{first}.linear_fc1"
        for role, t in (("lora_A", a), ("lora_B", b))
    ]
    plan = plan_adapter(specs, GEOMETRY, QWEN_MOE)
    assert fused_layout(plan, QWEN_MOE, E) is None


def test_fused_layout_needs_every_expert():
    plan, tensors = _convert(_expert_loras(skip=(1, 2)))
    with pytest.raises(ShapeMismatchError, match="needs every expert adapted.*expert_layout='per_expert'"):
        fuse_experts(plan, tensors, QWEN_MOE, E)


def test_expert_fc1_at_etp2_is_deinterleaved_per_expert():
    """Expert tensor parallelism shards each expert's fc1 like a dense fc1: a rank holds [gate_t; up_t]."""
    geo = dataclasses.replace(GEOMETRY, num_layers=1)
    g = torch.Generator().manual_seed(5)
    gate, up, a = torch.randn(I, R, generator=g), torch.randn(I, R, generator=g), torch.randn(R, H, generator=g)
    module = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1"
    pairs = [
        (
            ShardSpec(module=module, role="lora_B", shape=(I, R), split_dim=0, tp_rank=t, tp_size=2, alpha=2.0),
            torch.cat([gate.chunk(2)[t], up.chunk(2)[t]]),
        )
        for t in range(2)
    ]
    pairs.append(
        (ShardSpec(module=module, role="lora_A", shape=(R, H), split_dim=None, tp_rank=0, tp_size=2, alpha=2.0), a)
    )
    plan = plan_adapter([s for s, _ in pairs], geo, QWEN_MOE)
    tensors = allocate(plan)
    for placements, (_, t) in zip(plan.placements, pairs):
        apply_placements(tensors, placements, t)
    assert torch.equal(tensors["base_model.model.model.layers.0.mlp.experts.3.gate_proj.lora_B.weight"], gate)
    assert torch.equal(tensors["base_model.model.model.layers.0.mlp.experts.3.up_proj.lora_B.weight"], up)


@pytest.mark.parametrize("linears", [("linear_fc1", "linear_fc2"), ("linear_fc2",)], ids=["both", "down_only"])
def test_unfusing_gives_back_the_per_expert_tensors_bit_for_bit(linears):
    """Import reads fused adapters through the inverse; with one targeted parameter peft does not nest a base_layer."""
    loras = {m: t for m, t in _expert_loras().items() if m.endswith(linears)}
    plan, tensors = _convert(loras)
    fused, replaced = fuse_experts(plan, tensors, QWEN_MOE, E)
    back = unfuse_experts(fused, QWEN_MOE, E, sorted(replaced), R)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(
        ShapeMismatchError,
        match="the adapter holds 4 experts .* the Megatron model has 2 experts; load it into a model",
    ):
        unfuse_experts(fused, QWEN_MOE, 2, sorted(replaced), R)
    with pytest.raises(ShapeMismatchError, match="does not know as fused experts"):
        unfuse_experts(fused, QWEN_MOE, E, ["mlp.experts.w13"], R)


def test_expert_of_reads_the_expert_index_of_per_expert_keys():
    assert expert_of(QWEN_MOE, "base_model.model.model.layers.1.mlp.experts.12.up_proj.lora_B.weight") == 12
    assert expert_of(QWEN_MOE, "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight") is None


def test_router_lora_is_a_2d_target_parameter_of_the_v5_router(tmp_path):
    """transformers v5's router is not an nn.Linear: its weight is targeted as a parameter, with plain [r, in], [out, r]
    factors."""
    g = torch.Generator().manual_seed(7)
    loras = {
        f"decoder.layers.{layer}.mlp.router": (torch.randn(R, H, generator=g), torch.randn(E, R, generator=g))
        for layer in range(LAYERS)
    }
    plan, tensors = _convert(loras)
    fused, replaced = fuse_experts(plan, tensors, QWEN_MOE, E)
    assert replaced == {"mlp.gate.weight": ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]}
    assert torch.equal(
        fused["base_model.model.model.layers.1.mlp.gate.lora_B.weight"], loras["decoder.layers.1.mlp.router"][1]
    )
    config = adapter_config(plan, None, fused_experts=replaced)
    assert (config["target_modules"], config["target_parameters"]) == ([], ["mlp.gate.weight"])
    back = unfuse_experts(fused, QWEN_MOE, E, sorted(replaced), R)  # import's direction
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    save_file(fused, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base, merged = _hf(), _hf()
    with torch.no_grad():
        for layer in range(LAYERS):
            a, b = loras[f"decoder.layers.{layer}.mlp.router"]
            merged.model.layers[layer].mlp.gate.weight += SCALE * b @ a
    tokens = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
    model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert set(peft.get_peft_model_state_dict(model)) == set(fused)
    with torch.no_grad():
        diff = (model(input_ids=tokens).logits - merged(input_ids=tokens).logits).abs().max().item()
        effect = (merged(input_ids=tokens).logits - _hf()(input_ids=tokens).logits).abs().max().item()
    assert diff < 1e-5 and effect > 1e-3, (diff, effect)


def test_fused_tensors_hold_exactly_the_per_expert_numbers_at_peft_positions():
    """Every number of the fused layout, read at the position peft's target_parameters LoRA defines (lora_A rows
    e*r + j = expert e's A row j; lora_B column j*experts + e = expert e's B column j, rows [gate; up] for gate_up),
    is the per-expert adapter's number, bit for bit; element by element here, independent of the bulk copies."""
    loras = _expert_loras()
    plan, tensors = _convert(loras)
    fused, _ = fuse_experts(plan, tensors, QWEN_MOE, E)
    prefix = "base_model.model.model.layers"
    for layer in range(LAYERS):
        for parameter, linear in (("base_layer", "linear_fc1"), ("", "linear_fc2")):
            module = f"{prefix}.{layer}.mlp.experts" + (".base_layer" if parameter else "")
            a, b = fused[f"{module}.lora_A.weight"], fused[f"{module}.lora_B.weight"]
            for e in range(E):
                lora_a, lora_b = loras[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{linear}"]
                for j in range(R):
                    assert a[e * R + j].tolist() == lora_a[j].tolist()
                    assert b[:, j * E + e].tolist() == lora_b[:, j].tolist()
