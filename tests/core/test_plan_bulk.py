"""`plan_adapter` plans in bulk (per combination of module kind and shard form, then arrays of keys): its plan must be
the one a shard-by-shard planner written here gives (placements, shapes and dtypes in first-seen order, each module's
rank and alpha), the bulk path must be the one taken for clean adapters, and a hostile shard set is refused with the
message the shard-by-shard path gives (`_plan_each`, which names what is wrong)."""

import dataclasses

import pytest

from megatron_peft_export.core.archs import LLAMA, NEMOTRON_H, QWEN_MOE
from megatron_peft_export.core.plan import (
    _LAYER_RE,
    LoraSettings,
    _layers_and_suffixes,
    _module_settings,
    _plan_each,
    _plan_in_bulk,
    plan_adapter,
    plan_shard,
    resolve_target,
)
from megatron_peft_export.core.shards import SpecTable, StampedPlacements
from megatron_peft_export.errors import DialectError, ShapeMismatchError

from .test_hybrid import GEOMETRY as HYBRID
from .test_hybrid import _specs as mamba_specs
from .test_plan import geometry
from .test_plan_stamps import MOE, R, _canonical_specs, _moe_specs, _spec


def _reference(specs, geo, arch, vocab=None):
    """Shard by shard, the simple way: each shard's placements alone, each key's first shape and dtype, each module's
    lora_A rows and the alpha of the first shard naming it."""
    placements, shapes, dtypes, alphas = [], {}, {}, {}
    for spec in specs:
        target = resolve_target(spec.module, spec.part, geo, arch, vocab)
        placed = plan_shard(spec, target, geo)
        placements.append(placed)
        for p in placed:
            shapes.setdefault(p.key, p.shape)
            dtypes.setdefault(p.key, spec.dtype)
        for module in target.hf_modules:
            alphas.setdefault(module, spec.alpha)
    modules = {m: LoraSettings(shapes[f"base_model.model.{m}.lora_A.weight"][0], alphas[m]) for m in sorted(alphas)}
    return placements, shapes, dtypes, modules


def _dense_gqa(layers, tp):
    """Fused qkv (several placements per HF key from one shard) and gate/up at TP `tp`."""
    specs = []
    for i in layers:
        qkv, fc1 = f"decoder.layers.{i}.self_attention.linear_qkv", f"decoder.layers.{i}.mlp.linear_fc1"
        specs += [_spec(qkv, "lora_A", (R, 16), None, t, tp) for t in range(tp)]
        specs += [_spec(qkv, "lora_B", (32 // tp, R), 0, t, tp) for t in range(tp)]
        specs += [_spec(fc1, "lora_A", (R, 16), None, t, tp) for t in range(tp)]
        specs += [_spec(fc1, "lora_B", (24 // tp, R), 0, t, tp) for t in range(tp)]
    return specs


def _with(specs, **changes):
    return [dataclasses.replace(s, **changes) for s in specs]


def _alpha_objects(specs):
    """Equal alphas, each its own float object (as a checkpoint's per-key settings give)."""
    return [dataclasses.replace(s, alpha=float(str(s.alpha))) for s in specs]


CLEAN = {
    "moe tp1": (_moe_specs(range(3), range(4), 1), MOE, QWEN_MOE, None),
    "moe tp2": (_moe_specs(range(3), range(4), 2), MOE, QWEN_MOE, None),
    "moe alpha objects": (_alpha_objects(_moe_specs(range(3), range(4), 1)), MOE, QWEN_MOE, None),
    "moe per-layer alphas": (
        [dataclasses.replace(s, alpha=float(s.module.split(".")[2]) + 1) for s in _moe_specs(range(3), range(4), 2)],
        MOE,
        QWEN_MOE,
        None,
    ),
    "moe two ranks": (
        [
            dataclasses.replace(s, shape=(2, s.shape[1]) if s.role == "lora_A" else (s.shape[0], 2))
            if "fc2" in s.module
            else s
            for s in _moe_specs(range(2), range(2), 1)
        ],
        MOE,
        QWEN_MOE,
        None,
    ),
    "moe bf16": (_with(_moe_specs(range(2), range(2), 1), dtype="bfloat16"), MOE, QWEN_MOE, None),
    "dense gqa tp1": (_dense_gqa(range(2), 1), geometry(), LLAMA, None),
    "dense gqa tp2": (_dense_gqa(range(2), 2), geometry(), LLAMA, None),
    "canonical parts and output layer": (_canonical_specs(range(2)), geometry(vocab=40), LLAMA, None),
    "padded vocabulary": (
        [_spec("output_layer", "lora_A", (R, 16)), _spec("output_layer", "lora_B", (24, R), 0, 0, 2)]
        + [_spec("output_layer", "lora_B", (24, R), 0, 1, 2)],
        geometry(vocab=40),
        LLAMA,
        48,
    ),
    "hybrid": (mamba_specs([0, 2]), HYBRID, NEMOTRON_H, None),
}


def _as_table(specs):
    """The specs as a SpecTable (what the offline export plans): templates whose own module is none of theirs."""
    return SpecTable([dataclasses.replace(s, module="template.{e}") for s in specs], [s.module for s in specs])


@pytest.mark.parametrize("table", [False, True], ids=["specs", "table"])
@pytest.mark.parametrize("name", list(CLEAN))
def test_the_bulk_plan_is_the_shard_by_shard_one(name, table):
    specs, geo, arch, vocab = CLEAN[name]
    placements, shapes, dtypes, modules = _reference(specs, geo, arch, vocab)
    specs = _as_table(specs) if table else specs
    assert _plan_in_bulk(specs, geo, arch, vocab) is not None  # the bulk path took it
    plan = plan_adapter(specs, geo, arch, vocab)
    assert plan.placements == placements
    assert isinstance(plan.placements, StampedPlacements) == table
    assert [plan.placements[n] for n in range(-len(placements), len(placements))] == placements + placements
    assert plan.placements[1:-1:2] == placements[1:-1:2] and plan.placements[::-1] == placements[::-1]
    with pytest.raises(IndexError):
        plan.placements[len(placements)]
    assert list(plan.shapes.items()) == list(shapes.items())
    assert list(plan.dtypes.items()) == list(dtypes.items())
    assert list(plan.modules.items()) == list(modules.items())
    assert all(type(p).__name__ == "Placement" for placed in plan.placements for p in placed)


def test_mixed_dtypes_keep_each_key_first_shard_dtype():
    """Shards of one key in two dtypes are not refused: the key takes its first shard's (the bulk path leaves that to
    the shard-by-shard one)."""
    specs = _moe_specs(range(2), range(2), 2)
    specs = [dataclasses.replace(s, dtype="bfloat16") if s.tp_rank else s for s in specs]
    plan = plan_adapter(specs, MOE, QWEN_MOE)
    assert list(plan.dtypes.items()) == list(_reference(specs, MOE, QWEN_MOE)[2].items())
    assert set(plan.dtypes.values()) == {"float32"}


def _each_error(specs, geo, arch):
    """The message of the shard-by-shard path (planning, then module settings)."""
    try:
        _, shapes, _, alphas = _plan_each(specs, geo, arch, None)
        _module_settings(shapes, alphas)
    except (ShapeMismatchError, DialectError) as exc:
        return type(exc), str(exc)
    return None


MOE_SPECS = _moe_specs(range(2), range(2), 2)
HOSTILE = {
    "a shard given twice": (
        [*MOE_SPECS, MOE_SPECS[-2]],
        MOE,
        QWEN_MOE,
        r"down_proj\.lora_B\.weight: overlap at index 0",
    ),
    "a TP shard missing": (
        [s for s in MOE_SPECS if s != MOE_SPECS[-3]],
        MOE,
        QWEN_MOE,
        r"down_proj\.lora_A\.weight: filled 3 of 6 along dim 1",
    ),
    "one TP rank's shards alone": (
        [s for s in MOE_SPECS if s.tp_rank == 0],
        MOE,
        QWEN_MOE,
        r"the adapter shards do not tile the HF tensors exactly once: .* \(shards missing\)",
    ),
    "a layer past the model": (_moe_specs([0, 1, 5], range(2), 1), MOE, QWEN_MOE, "layer 5 is past the model's 3"),
    "an expert past the model": (_moe_specs([0], [0, 9], 1), MOE, QWEN_MOE, "expert 9 is past the model's 4 experts"),
    "a layer of another kind": (mamba_specs([0, 2, 1]), HYBRID, NEMOTRON_H, r"layer 1 of the hybrid pattern"),
    "shards disagree on rows": (
        _moe_specs([0, 1], [0], 1)
        + [_spec("decoder.layers.2.mlp.experts.local_experts.0.linear_fc1", "lora_B", (9, R))],
        MOE,
        QWEN_MOE,
        "expected 12 output rows in total",
    ),
    "one module, two alphas": (
        [dataclasses.replace(s, alpha=2.0) if s.role == "lora_B" and "layers.1." in s.module else s for s in MOE_SPECS],
        MOE,
        QWEN_MOE,
        r"several scales \[2\.0, 8\.0\]",
    ),
    "lora_B without lora_A": (
        [s for s in _moe_specs([0], [0], 1) if not (s.role == "lora_A" and s.module.endswith("fc2"))],
        MOE,
        QWEN_MOE,
        "has lora_B but no lora_A",
    ),
    "ranks differ": (
        [
            dataclasses.replace(s, shape=(R + 1, s.shape[1])) if s.role == "lora_A" and "fc2" in s.module else s
            for s in _moe_specs([0], [0], 1)
        ],
        MOE,
        QWEN_MOE,
        "lora_A has rank 5, lora_B has rank 4",
    ),
    "a gap in the rows": (
        [dataclasses.replace(s, tp_rank=0) if s.role == "lora_B" and s.tp_rank == 1 else s for s in _dense_gqa([0], 2)],
        geometry(layers=1),
        LLAMA,
        "overlap at index 0",
    ),
    "unknown module": (
        _canonical_specs([0]) + [_spec("decoder.layers.1.mlp.nothing", "lora_A", (R, 16))],
        geometry(vocab=40),
        LLAMA,
        "no HF name for Megatron module",
    ),
}


@pytest.mark.parametrize("table", [False, True], ids=["specs", "table"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_shard_sets_are_refused_as_shard_by_shard(name, table):
    specs, geo, arch, message = HOSTILE[name]
    expected = _each_error(specs, geo, arch)
    assert expected is not None
    with pytest.raises((ShapeMismatchError, DialectError), match=message) as found:
        plan_adapter(_as_table(specs) if table else specs, geo, arch)
    assert (type(found.value), str(found.value)) == expected


def test_dora_magnitudes_everywhere_or_refused():
    specs = _moe_specs([0, 1], [0, 1], 1)
    magnitudes = [
        _spec(f"decoder.layers.{i}.mlp.experts.local_experts.{e}.{linear}", "magnitude", (rows,))
        for i in (0, 1)
        for e in (0, 1)
        for linear, rows in (("linear_fc1", 12), ("linear_fc2", 16))
    ] + [_spec(f"decoder.layers.{i}.self_attention.linear_qkv", "magnitude", (32,)) for i in (0, 1)]
    assert _plan_in_bulk([*specs, *magnitudes], MOE, QWEN_MOE, None) is not None
    assert plan_adapter([*specs, *magnitudes], MOE, QWEN_MOE).use_dora
    assert not plan_adapter(specs, MOE, QWEN_MOE).use_dora
    with pytest.raises(
        DialectError, match=r"DoRA magnitude found for some modules but not for .*experts\.0\.gate_proj"
    ):
        plan_adapter([*specs, magnitudes[1]], MOE, QWEN_MOE)


def test_one_rank_and_alpha_needs_no_lookup_per_module():
    """One rank, one alpha, a lora_A and a lora_B per module: the modules share one LoraSettings, no lookup; a lora_B
    of another rank, or a module without lora_B, is looked up (and refused by name)."""
    from megatron_peft_export.core.plan import _one_setting

    specs = [s for s in _moe_specs(range(2), range(2), 1) if "experts" in s.module]  # one placement per key
    *_, alphas, _, ranks = _plan_in_bulk(specs, MOE, QWEN_MOE, None)
    modules = _one_setting(alphas, ranks)
    assert modules is not None and len({id(s) for s in modules.values()}) == 1
    assert modules == _reference(specs, MOE, QWEN_MOE)[3]
    no_b = [s for s in specs if not (s.role == "lora_B" and s.module.endswith("experts.1.linear_fc2"))]
    *_, alphas, _, ranks = _plan_in_bulk(no_b, MOE, QWEN_MOE, None)
    assert _one_setting(alphas, ranks) is None
    with pytest.raises(ShapeMismatchError, match=r"experts\.1\.down_proj: has lora_A but no lora_B"):
        plan_adapter(no_b, MOE, QWEN_MOE)


@pytest.mark.parametrize(
    "modules",
    [
        ["decoder.layers.3.mlp.linear_fc1", "decoder.layers.12.self_attention.linear_qkv", "output_layer"],
        ["decoder.layers.0.x", "decoder.layers.1.", "decoder.layers..x", "decoder.layers.01.x", "decoder.layers.1"],
        ["decoder.layers.\u0663.x", "decoder.layers.2.a.b.c", "xdecoder.layers.2.a", " decoder.layers.2.a"],
        ["decoder.layers.4.x\n", "decoder.layers.5.y"],  # `$` matches before a last newline: one match per module
        ["decoder.layers.4.x\ndecoder.layers.6.z", "decoder.layers.5.y"],
        ["", "decoder.layers.5.y"],
        ["decoder.layers.7.\r", "decoder.layers.8.\t", "decoder.layers.9.\u2028"],
        [],
    ],
)
def test_layers_and_suffixes_match_the_layer_pattern_per_module(modules):
    """One search over the joined modules gives what `_LAYER_RE` gives per module, on odd paths too."""
    matches = {m: _LAYER_RE.match(m) for m in modules}
    expected = (
        {m: int(found.group(1)) for m, found in matches.items() if found},
        {m: found.group(2) for m, found in matches.items() if found},
    )
    assert _layers_and_suffixes(modules) == expected
