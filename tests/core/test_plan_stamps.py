"""The planner stamps a combination's placements out per layer (`_Planner`): for every shard it must give what
`resolve_target` then `plan_shard` give for that shard alone, errors included (a later shard of a stamped combination
in a layer past the model's, or of another kind in a hybrid pattern, is refused by name all the same)."""

import dataclasses

import pytest

from megatron_peft_export.core.archs import LLAMA, NEMOTRON_H, QWEN_MOE
from megatron_peft_export.core.plan import plan_adapter, plan_shard, resolve_target
from megatron_peft_export.core.shards import ShardSpec
from megatron_peft_export.errors import DialectError, ShapeMismatchError

from .test_hybrid import GEOMETRY as HYBRID
from .test_hybrid import _specs as mamba_specs
from .test_plan import geometry

R = 4


def _spec(module, role, shape, split_dim=None, tp_rank=0, tp_size=1, part=None, alpha=8.0):
    return ShardSpec(
        module=module,
        role=role,
        part=part,
        shape=shape,
        split_dim=split_dim,
        tp_rank=tp_rank,
        tp_size=tp_size,
        alpha=alpha,
    )


def _moe_specs(layers, experts, tp, ffn=6):
    specs = []
    for i in layers:
        specs += [_spec(f"decoder.layers.{i}.self_attention.linear_qkv", "lora_A", (R, 16))]
        specs += [
            _spec(f"decoder.layers.{i}.self_attention.linear_qkv", "lora_B", (32 // tp, R), 0, t, tp) for t in range(tp)
        ]
        for e in experts:
            module = f"decoder.layers.{i}.mlp.experts.local_experts.{e}"
            specs += [_spec(f"{module}.linear_fc1", "lora_A", (R, 16), None, t, tp) for t in range(tp)]
            specs += [_spec(f"{module}.linear_fc1", "lora_B", (2 * ffn // tp, R), 0, t, tp) for t in range(tp)]
            specs += [_spec(f"{module}.linear_fc2", "lora_A", (R, ffn // tp), 1, t, tp) for t in range(tp)]
            specs += [_spec(f"{module}.linear_fc2", "lora_B", (16, R), None, t, tp) for t in range(tp)]
    return specs


def _canonical_specs(layers):
    specs = []
    for i in layers:
        for part, rows in (("q", 16), ("k", 8), ("v", 8)):
            specs += [
                _spec(f"decoder.layers.{i}.self_attention.linear_qkv", "lora_A", (R, 16), part=part),
                _spec(f"decoder.layers.{i}.self_attention.linear_qkv", "lora_B", (rows, R), part=part),
            ]
        specs += [_spec(f"decoder.layers.{i}.mlp.linear_fc2", "lora_A", (R, 12))]
        specs += [_spec(f"decoder.layers.{i}.mlp.linear_fc2", "lora_B", (16, R))]
    return specs + [_spec("output_layer", "lora_A", (R, 16)), _spec("output_layer", "lora_B", (40, R))]


MOE = dataclasses.replace(geometry(layers=3), num_experts=4, moe_ffn_hidden_size=6)
CASES = {
    "moe tp1": (_moe_specs(range(3), range(4), 1), MOE, QWEN_MOE),
    "moe tp2": (_moe_specs(range(3), range(4), 2), MOE, QWEN_MOE),
    "moe layer past the model after stamps": (_moe_specs([0, 1, 5, 2], range(4), 1), MOE, QWEN_MOE),
    "moe expert past the model": (_moe_specs([0, 1], [0, 1, 7], 1), MOE, QWEN_MOE),
    "moe rows that do not fit one layer": (
        _moe_specs([0, 1], [0], 1)
        + [_spec("decoder.layers.2.mlp.experts.local_experts.0.linear_fc1", "lora_B", (9, R))],
        MOE,
        QWEN_MOE,
    ),
    "hybrid": (mamba_specs([0, 2]), HYBRID, NEMOTRON_H),
    "hybrid layer of another kind after stamps": (mamba_specs([0, 2, 1, 3, 9]), HYBRID, NEMOTRON_H),
    "canonical parts and output layer": (_canonical_specs(range(2)), geometry(vocab=40), LLAMA),
    "unknown module": (
        _canonical_specs([0]) + [_spec("decoder.layers.1.mlp.nothing", "lora_A", (R, 16))],
        geometry(vocab=40),
        LLAMA,
    ),
}


def _alone(spec, geo, arch):
    try:
        return plan_shard(spec, resolve_target(spec.module, spec.part, geo, arch), geo)
    except (ShapeMismatchError, DialectError) as exc:
        return str(exc)


@pytest.mark.parametrize("name", list(CASES))
def test_stamped_placements_are_each_shards_own(name):
    specs, geo, arch = CASES[name]
    alone = [_alone(spec, geo, arch) for spec in specs]
    errors = list(dict.fromkeys(found for found in alone if isinstance(found, str)))
    try:
        plan = plan_adapter(specs, geo, arch)
    except (ShapeMismatchError, DialectError) as exc:
        assert errors and exc.found[: len(errors)] == errors
        return
    assert not errors
    assert plan.placements == [[] if spec.is_replica else placed for spec, placed in zip(specs, alone)]
    if name == "moe tp1":
        assert len({tuple(p) for placed in plan.placements for p in placed}) == sum(map(len, plan.placements))


def test_a_tensor_filled_twice_or_partly_is_refused_by_name():
    """Coverage keeps a key's first placement alone and lists the rest only when there are more: a shard given twice
    overlaps, a TP shard missing leaves rows unfilled."""
    specs = _moe_specs(range(2), range(2), 2)
    with pytest.raises(ShapeMismatchError, match=r"experts\.1\.down_proj\.lora_B\.weight: overlap at index 0 of dim 0"):
        plan_adapter([*specs, specs[-2]], MOE, QWEN_MOE)
    with pytest.raises(ShapeMismatchError, match=r"experts\.1\.down_proj\.lora_A\.weight: filled 3 of 6 along dim 1"):
        plan_adapter([s for s in specs if s != specs[-3]], MOE, QWEN_MOE)
