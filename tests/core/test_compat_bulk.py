"""The serving checks classify an adapter's keys on arrays when every key is a plain `<module>.lora_A.weight` or
`.lora_B.weight` (`_plain_modules`): what they find must be what the key-by-key classification finds, and every other
adapter (magnitudes, biases, odd keys, a lora_A without dimensions, a newline in a key) takes the key-by-key path."""

import pytest

from megatron_peft_export import compat

P = "base_model.model."


def _moe(layers=3, experts=4):
    shapes = {}
    for i in range(layers):
        for e in range(experts):
            for w, rows in (("w1", 6), ("w2", 16), ("w3", 6)):
                module = f"{P}model.layers.{i}.block_sparse_moe.experts.{e}.{w}"
                shapes[f"{module}.lora_A.weight"] = (2, 16 if w != "w2" else 6)
                shapes[f"{module}.lora_B.weight"] = (rows, 2)
    return shapes


PLAIN = {
    "moe": _moe(),
    "no prefix": {"model.layers.0.q_proj.lora_A.weight": (4, 8), "model.layers.0.q_proj.lora_B.weight": (8, 4)},
    "prefix and nothing else": {P + "lora_A.weight": (2, 3), P + "x.lora_B.weight": (3, 2)},
    "three-d lora_A": {P + "m.lora_A.weight": (2, 3, 4), P + "m.lora_B.weight": (3, 2)},
}
OTHER = {
    "magnitude": {**_moe(1, 1), P + "model.layers.0.block_sparse_moe.experts.0.w1.lora_magnitude_vector": (6,)},
    "bias": {**_moe(1, 1), P + "model.layers.0.q.lora_B.bias": (6,)},
    "full weight": {**_moe(1, 1), P + "model.embed_tokens.weight": (10, 16)},
    "lora_A without dimensions": {P + "m.lora_A.weight": (), P + "m.lora_B.weight": (3, 2)},
    "newline in a key": {P + "m\n.lora_A.weight": (2, 3), P + "m\n.lora_B.weight": (3, 2)},
    "bare suffix": {".lora_A.weight": (2, 3), "x.lora_B.weight": (3, 2)},
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_keys_are_classified_on_arrays_as_key_by_key(name):
    shapes = PLAIN[name]
    found = compat._plain_modules(shapes)
    assert found is not None
    assert found == compat._classified(shapes)
    assert found[0]["lora"] == list(shapes)


@pytest.mark.parametrize("name", list(OTHER))
def test_other_keys_take_the_key_by_key_path(name):
    assert compat._plain_modules(OTHER[name]) is None


CONFIGS = {
    "one scale": {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["w1", "w2", "w3"]},
    "patterns": {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["w1"],
        "alpha_pattern": {"model.layers.1.block_sparse_moe.experts.2.w1": 8},
    },
    "rank 3 in the config": {"peft_type": "LORA", "r": 3, "lora_alpha": 3, "target_modules": ["w1"]},
    "fused parameters": {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": [],
        "target_parameters": ["block_sparse_moe.experts.0.w1"],
    },
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(PLAIN) + list(OTHER))
def test_findings_and_scales_are_the_key_by_key_ones(monkeypatch, name, config):
    shapes = {**PLAIN, **OTHER}[name]
    cfg = CONFIGS[config]
    fast = (compat.check_adapter(cfg, shapes, "vllm"), compat.peft_scales(cfg, shapes), compat._modules(cfg, shapes))
    monkeypatch.setattr(compat, "_plain_modules", lambda shapes: None)
    slow = (compat.check_adapter(cfg, shapes, "vllm"), compat.peft_scales(cfg, shapes), compat._modules(cfg, shapes))
    assert fast == slow


def test_one_scale_modules_are_each_module_rank_and_alpha_over_r():
    shapes = _moe(2, 3)
    modules, kinds = compat._modules(CONFIGS["one scale"], shapes)
    names = sorted({k.removeprefix(P).rsplit(".", 2)[0] for k in shapes})
    assert list(modules) == names
    for name in names:
        assert modules[name] == (name, shapes[f"{P}{name}.lora_A.weight"][0], 2.0, False)
        assert type(modules[name]) is compat._Module
    assert kinds == {"lora": list(shapes), "magnitude": [], "bias": [], "other": []}
