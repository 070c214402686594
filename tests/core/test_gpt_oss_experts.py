"""GPT-OSS's fused experts checked by peft itself: Megatron's per-expert [gate; up] LoRA -> transformers' gate_up_proj
with gate and up interleaved (gate = [..., ::2], up = [..., 1::2], the parameter [experts, in, out]), loaded into a
transformers GptOss model, against the same deltas merged into its weights by hand."""

import copy
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import save_file

from megatron_peft_export.core.archs import GPT_OSS, QWEN_MOE
from megatron_peft_export.core.experts import fuse_experts, refuse_missing_layout, unfuse_experts
from megatron_peft_export.core.geometry import ModelGeometry
from megatron_peft_export.core.peft_format import adapter_config
from megatron_peft_export.core.plan import allocate, apply_placements, plan_adapter
from megatron_peft_export.core.shards import ShardSpec
from megatron_peft_export.core.splits import join_rows, part_rows
from megatron_peft_export.errors import ShapeMismatchError, UnsupportedModelError

E, R, H, I, LAYERS = 4, 2, 16, 8, 2  # noqa: E741 (the expert width, as in the formulas)
SCALE = 1.5


def _hf():
    cfg = transformers.GptOssConfig(
        vocab_size=32,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=E,
        num_experts_per_tok=2,
        sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).float().eval()
    with torch.no_grad():  # transformers initializes the router and sinks to zero; make every path count
        for layer in model.model.layers:
            layer.mlp.router.weight.normal_(0, 0.5)
            layer.mlp.router.bias.normal_(0, 0.5)
            layer.self_attn.sinks.normal_(0, 0.5)
    return model


def _loras():
    g = torch.Generator().manual_seed(1)
    loras = {}
    for layer in range(LAYERS):
        loras[f"decoder.layers.{layer}.mlp.router"] = (torch.randn(R, H, generator=g), torch.randn(E, R, generator=g))
        for e in range(E):
            base = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}"
            loras[f"{base}.linear_fc1"] = (torch.randn(R, H, generator=g), torch.randn(2 * I, R, generator=g))
            loras[f"{base}.linear_fc2"] = (torch.randn(R, I, generator=g), torch.randn(H, R, generator=g))
    return {m: (a * 0.3, b * 0.3) for m, (a, b) in loras.items()}  # fc1's B rows are Megatron's [gate; up]


def _convert(loras, arch=GPT_OSS):
    geo = ModelGeometry(
        num_layers=LAYERS,
        hidden_size=H,
        num_attention_heads=2,
        num_query_groups=1,
        head_dim=8,
        ffn_hidden_size=I,
        gated_linear_unit=True,
        num_experts=E,
        moe_ffn_hidden_size=I,
    )
    pairs = [
        (ShardSpec(module=m, role=role, shape=tuple(t.shape), split_dim=None, tp_rank=0, tp_size=1, alpha=SCALE * R), t)
        for m, (a, b) in loras.items()
        for role, t in (("lora_A", a), ("lora_B", b))
    ]
    plan = plan_adapter([s for s, _ in pairs], geo, arch)
    tensors = allocate(plan)
    for placements, (_, t) in zip(plan.placements, pairs):
        apply_placements(tensors, placements, t)
    return plan, tensors


def _merged_by_hand(base, loras):
    """GPT-OSS applies W[e] as x @ W[e] ([in, out]), so a LoRA delta B @ A ([out, in]) lands transposed; gate row j of
    Megatron's fc1 is column 2j of gate_up_proj, up row j column 2j + 1."""
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for layer in range(LAYERS):
            mlp = merged.model.layers[layer].mlp
            a, b = loras[f"decoder.layers.{layer}.mlp.router"]
            mlp.router.weight += SCALE * b @ a
            for e in range(E):
                a1, b1 = loras[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1"]
                a2, b2 = loras[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc2"]
                gate, up = (SCALE * b1 @ a1).chunk(2)
                mlp.experts.gate_up_proj[e, :, 0::2] += gate.T
                mlp.experts.gate_up_proj[e, :, 1::2] += up.T
                mlp.experts.down_proj[e] += (SCALE * b2 @ a2).T
    return merged


def test_gpt_oss_fused_experts_load_into_transformers_and_match_merged_weights(tmp_path):
    loras = _loras()
    plan, tensors = _convert(loras)
    fused, replaced = fuse_experts(plan, tensors, GPT_OSS, E)
    config = adapter_config(plan, None, fused_experts=replaced)
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.router.weight"]
    assert config["target_modules"] == []
    save_file(fused, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = _hf()
    merged = _merged_by_hand(base, loras)
    tokens = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
    model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert set(peft.get_peft_model_state_dict(model)) == set(fused), "every file key is one peft holds, and back"
    with torch.no_grad():
        diff = (model(input_ids=tokens).logits - merged(input_ids=tokens).logits).abs().max().item()
        effect = (merged(input_ids=tokens).logits - _hf()(input_ids=tokens).logits).abs().max().item()
    assert diff < 1e-5 and effect > 1e-2, (diff, effect)


def test_unfusing_gpt_oss_experts_gives_back_the_per_expert_tensors_bit_for_bit():
    """Import reads the interleaved rows through the same declared order, backwards."""
    plan, tensors = _convert(_loras())
    fused, replaced = fuse_experts(plan, tensors, GPT_OSS, E)
    back = unfuse_experts(fused, GPT_OSS, E, sorted(replaced), R)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    qwen_fused, _ = fuse_experts(*_convert(_loras(), QWEN_MOE), QWEN_MOE, E)
    key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"
    assert not torch.equal(fused[key], qwen_fused[key]), "GPT-OSS rows are not Qwen's [gate; up]"


@pytest.mark.parametrize("order", ["blocks", "interleaved"])
def test_join_rows_and_part_rows_are_inverse(order):
    gate, up = torch.arange(12.0).view(3, 4), 100 + torch.arange(12.0).view(3, 4)
    joined = join_rows([gate, up], order)
    expected = (
        torch.cat([gate, up]) if order == "blocks" else torch.stack([gate[0], up[0], gate[1], up[1], gate[2], up[2]])
    )
    assert torch.equal(joined, expected)
    assert all(torch.equal(x, y) for x, y in zip(part_rows(joined, 2, order), (gate, up)))


def test_per_expert_layout_is_refused_for_gpt_oss_with_the_reason():
    with pytest.raises(UnsupportedModelError, match="gpt_oss: transformers has no per-expert GPT-OSS modules"):
        refuse_missing_layout("per_expert", GPT_OSS)
    assert refuse_missing_layout("auto", GPT_OSS) and refuse_missing_layout("fused", GPT_OSS)
    assert not refuse_missing_layout("per_expert", QWEN_MOE)


def test_fused_gpt_oss_layout_names_no_per_expert_fallback():
    loras = {m: t for m, t in _loras().items() if ".local_experts.2." not in m}
    plan, tensors = _convert(loras)
    with pytest.raises(ShapeMismatchError, match="needs every expert adapted.*gpt_oss family has no per-expert layout"):
        fuse_experts(plan, tensors, GPT_OSS, E)
