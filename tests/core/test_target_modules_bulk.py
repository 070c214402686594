"""`target_modules` reads each distinct (short name, layer) once: its names must be those of a module-by-module
reading written here (short names for modules adapted in every layer that has them, full paths for the rest, without
a renamed prefix)."""

import re
from collections import defaultdict

import pytest

from megatron_peft_export.core.peft_format import target_modules
from megatron_peft_export.core.plan import AdapterPlan, LoraSettings


def _reference(plan, skip=frozenset()):
    layers = defaultdict(set)
    modules = [m for m in plan.modules if m not in skip]
    for module in modules:
        match = re.search(r"layers\.(\d+)\.", module)
        layers[module.split(".")[-1]].add(int(match.group(1)) if match else -1)
    every = set(range(plan.num_layers))
    short = {name for name, found in layers.items() if found == plan.layers_of.get(name, every) or found == {-1}}
    names = set()
    for m in modules:
        last = m.split(".")[-1]
        names.add(last if last in short else m.removeprefix(plan.renamed_prefix) if plan.renamed_prefix else m)
    return sorted(names)


def _plan(modules, layers=3, layers_of=None, renamed=""):
    settings = LoraSettings(2, 4.0)
    return AdapterPlan({}, {}, [], dict.fromkeys(modules, settings), False, layers, layers_of or {}, renamed)


EXPERTS = [f"model.layers.{i}.block_sparse_moe.experts.{e}.w{k}" for i in range(3) for e in range(4) for k in (1, 2, 3)]
CASES = {
    "every layer": (_plan(EXPERTS), frozenset()),
    "a layer missing one": (_plan([m for m in EXPERTS if m != "model.layers.1.block_sparse_moe.experts.0.w2"]), None),
    "one layer only": (_plan([m for m in EXPERTS if ".layers.2." in m]), None),
    "outside the layers": (_plan(["lm_head", *EXPERTS]), None),
    "zero-padded layer": (_plan(["model.layers.01.q", "model.layers.0.q", "model.layers.2.q"]), None),
    "renamed prefix": (
        _plan(["model.language_model.layers.0.q", "model.language_model.layers.1.k"], 2, None, "model."),
        None,
    ),
    "hybrid kinds": (
        _plan(
            ["backbone.layers.0.mixer.in_proj", "backbone.layers.2.mixer.in_proj"], 4, {"in_proj": frozenset({0, 2})}
        ),
        None,
    ),
    "skipped": (_plan(EXPERTS), frozenset(m for m in EXPERTS if m.endswith("w2") and ".layers.0." in m)),
    "unsorted": (_plan(EXPERTS[::-1][:20] + EXPERTS[:-20][::3]), None),
    "layer prefixes of others": (
        _plan([f"model.layers.{i}.{m}" for i in (1, 10, 11, 2, 0) for m in ("q", "k", "mlp.layers.7.v")], 12),
        None,
    ),
    "odd layer texts": (
        _plan(
            [
                "model.layers.1",
                "model.layers.1.",
                "model.layers.1.q",
                "model.layers.1/q",
                "model.layers.x.layers.1.q",
                "model.layers.x.layers.1.k",
                "model.layers.1.layers.0.q",
                "model.layers..q",
                "layers.1.q",
                "layers.١.q",
                "model.layers.0.q",
                "q",
            ],
            2,
        ),
        None,
    ),
    "empty": (_plan([]), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_target_modules_as_module_by_module(name):
    plan, skip = CASES[name]
    skip = skip or frozenset()
    assert target_modules(plan, skip) == _reference(plan, skip)


@pytest.mark.parametrize("alpha", [4.0, 4, float("nan")])
def test_one_shared_setting_gives_the_config_of_equal_separate_ones(alpha):
    """Modules sharing one LoraSettings object (what the planner gives) skip the per-module patterns: the config is
    the one of the same settings as separate objects (counted module by module)."""
    from megatron_peft_export.core.peft_format import adapter_config

    shared = _plan(EXPERTS)
    one = LoraSettings(2, alpha)
    shared.modules = dict.fromkeys(EXPERTS, one)
    separate = _plan(EXPERTS)
    separate.modules = {m: LoraSettings(2, alpha) for m in EXPERTS}
    fused = {"block_sparse_moe.experts": EXPERTS[:6]}
    a, b = adapter_config(shared, "base", fused_experts=fused), adapter_config(separate, "base", fused_experts=fused)
    assert repr(a) == repr(b)
    if alpha == alpha:
        assert a["rank_pattern"] == a["alpha_pattern"] == {}


def test_one_search_per_run_of_a_layer(monkeypatch):
    """The layer index is searched once per run of modules of one layer (and once per module without one), not once
    per module."""
    from megatron_peft_export.core import peft_format

    searched = []
    pattern = peft_format._LAYER_INDEX

    class Counting:
        def search(self, text):
            searched.append(text)
            return pattern.search(text)

    monkeypatch.setattr(peft_format, "_LAYER_INDEX", Counting())
    assert target_modules(_plan(["lm_head", *EXPERTS])) == ["lm_head", "w1", "w2", "w3"]
    assert len(searched) == 3 + 1
