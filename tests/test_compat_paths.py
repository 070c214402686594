"""The quick paths of the serving checks (`compat`) and of the rank check (`peft_dir.check_ranks`) decide exactly what
the key-by-key rules decide: each adapter below, ordinary, MoE-sized or malformed, is checked both ways (the quick
paths switched off: every key through its regular expression, every module checked alone) and the findings, scales
and errors compared."""

import random

import pytest

from megatron_peft_export import compat
from megatron_peft_export.errors import AdapterFileError
from megatron_peft_export.io import peft_dir

P = "base_model.model."
_B = "lora_B.weight"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}


def _moe(layers=3, experts=4, r=4):
    shapes = {}
    for i in range(layers):
        shapes[f"{P}model.layers.{i}.self_attn.q_proj.lora_A.weight"] = (r, 16)
        shapes[f"{P}model.layers.{i}.self_attn.q_proj.lora_B.weight"] = (32, r)
        for e in range(experts):
            for w, (o, n) in (("w1", (24, 16)), ("w2", (16, 24)), ("w3", (24, 16))):
                stem = f"{P}model.layers.{i}.block_sparse_moe.experts.{e}.{w}"
                shapes[f"{stem}.lora_A.weight"] = (r, n)
                shapes[f"{stem}.lora_B.weight"] = (o, r)
    return shapes


ODD_KEYS = [
    ({f"{P}a\nb.lora_A.weight": (4, 16), f"{P}a\nb.lora_B.weight": (8, 4)}, "newline inside"),
    ({f"{P}m.lora_A.weight\n": (4, 16), f"{P}m.lora_B.weight": (8, 4)}, "trailing newline"),
    ({".lora_A.weight": (4, 16), "lora_B.weight": (8, 4)}, "no module"),
    ({"model.layers.0.q_proj.lora_A.weight": (4, 16), "model.layers.0.q_proj.lora_B.weight": (8, 4)}, "no prefix"),
    ({f"{P}decoder.layers.0.linear_fc1.lora_A.weight": (4, 16)}, "megatron name"),
    ({f"{P}m.lora_A.default.weight": (4, 16), f"{P}m.lora_B.default.weight": (8, 4)}, "adapter name"),
    ({f"{P}m.lora_A.bias": (4,), f"{P}m.lora_B.bias": (8,)}, "bias"),
    ({f"{P}e.lora_embedding_A": (4, 16), f"{P}e.lora_embedding_A.weight": (4, 16)}, "embedding"),
    ({f"{P}m.lora_magnitude_vector": (8,), f"{P}n.lora_magnitude_vector.weight": (9,)}, "magnitudes"),
    ({f"{P}m.lora_A.weight": (5, 16), f"{P}m.lora_B.weight": (8, 4)}, "ranks differ"),
    ({f"{P}m.lora_A.weight": (4,), f"{P}m.lora_B.weight": (8, 4, 1)}, "wrong dims"),
    ({f"{P}m.lora_A.weight": (4, 16), "m.lora_A.weight": (6, 16), f"{P}m.lora_B.weight": (8, 4)}, "prefix twice"),
    ({f"{P}m.weight": (8, 16), f"{P}lm_head.weight": (8, 16)}, "full weights"),
    ({f"{P}x.lora_B.lora_A.weight": (4, 16), f"{P}x.lora_B.weight": (8, 4)}, "role inside the module"),
    ({f"{P}model.layers.0.mlp.experts.base_layer.lora_A.weight": (8, 16)}, "fused experts, rows of 2 experts"),
    ({f"{P}model.layers.1.mlp.experts.lora_B.weight": (16, 8)}, "fused experts B"),
    ({f"{P}model.layers.0.self_attn.qkv_proj.lora_A.weight": (4, 16)}, "fused name"),
    ({f"{P}c_attn.lora_B.weight": (8, 4), f"{P}x.Wqkv.lora_A.weight": (4, 16)}, "fused names, one without a parent"),
    ({f"{P}x.xc_attn.lora_A.weight": (4, 16), f"{P}c_attn.x.lora_B.weight": (8, 4)}, "fused name inside others"),
    ({f"{P}x.c_attn.lora_A.bias": (4,), f"{P}y.W_pack.lora_A.weight.z": (4, 16)}, "fused names of other keys"),
    ({f"{P}y.c_attn.lora_B.lora_A.weight": (4, 16), f"{P}x.xc_attn.lora_B.weight": (8, 4)}, "fused name, then not"),
    ({f"{P}.lora_A.weight": (4, 16), P + _B: (8, 4)}, "empty module"),
    ({f"junk\n{P}m.lora_A.weight": (4, 16), f"{P}m.lora_B.weight\nx": (8, 4)}, "prefix and suffix on other lines"),
    ({f"{P}m.lora_A.weight\n{P}n.lora_B.weight": (4, 16), "x": (8, 4)}, "two keys in one"),
    ({f"{P}m.lora_A.weight": (), f"{P}m.lora_B.weight": (8, 4)}, "no dimension"),
    ({f"{P}x.lora_magnitude_vector.lora_A.weight": (4, 16), f"{P}y.lora_a_.lora_B.weight": (8, 4)}, "names inside"),
    ({f"{P}e.lora_embedding_A.weight": (4, 16), f"{P}e.lora_embedding_B.weight": (8, 4)}, "embedding A and B"),
    ({}, "empty"),
]
CONFIGS = [
    {},
    {"rank_pattern": {"model.layers.1.block_sparse_moe.experts.2.w1": 8}, "alpha_pattern": {"layers\\.0\\..*": 2}},
    {"alpha_pattern": {"q_proj": 3}},
    {"use_rslora": True, "lora_alpha": 6},
    {"use_dora": True},
    {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
    {"target_parameters": ["model.layers.0.mlp.experts.gate_up_proj"], "r": 2},
    {"r": 8},
    {"r": "4"},
]


def _cases():
    rng = random.Random(7)
    cases = []
    for n, config in enumerate(CONFIGS):
        cases.append((f"moe-{n}", {**CONFIG, **config}, _moe()))
        for odd, name in ODD_KEYS:
            cases.append((f"{name}-{n}", {**CONFIG, **config}, {**_moe(2, 2), **odd}))
            cases.append((f"{name}-alone-{n}", {**CONFIG, **config}, dict(odd)))
    for k in range(30):  # random mixtures, in random key orders
        picked = [odd for odd, _ in rng.sample(ODD_KEYS, 3)]
        items = list(
            {**_moe(2, rng.randint(1, 3), rng.choice([4, 2])), **{k: v for o in picked for k, v in o.items()}}.items()
        )
        rng.shuffle(items)
        cases.append((f"random-{k}", {**CONFIG, **rng.choice(CONFIGS)}, dict(items)))
    return cases


CASES = _cases()


def _outcome(call):
    try:
        return "ok", call()
    except AdapterFileError as exc:
        return "error", str(exc)


def _everything(config, shapes):
    found = {}
    for target in compat.TARGETS:
        for version in compat.VLLM_VERSIONS:
            for model_type in ("mixtral", "qwen3_moe", "gpt_oss", None):
                found[target, version, model_type] = _outcome(
                    lambda t=target, v=version, m=model_type: compat.check_adapter(
                        config, shapes, t, vllm_version=v, model_type=m
                    )
                )
    found["scales"] = _outcome(lambda: compat.peft_scales(config, shapes))
    found["ranks"] = _outcome(lambda: peft_dir.check_ranks(config, shapes, "here"))
    found["header"] = _outcome(lambda: peft_dir.check_shapes(config, {k: ("F32", s) for k, s in shapes.items()}, "x"))
    return found


class _KeyByKey(compat._Keys):
    """`compat._Keys` as its definitions read key by key: no key is taken as plain, the prefix looked for in each."""

    def __init__(self, shapes):
        super().__init__(shapes)
        self.prefixed = all(key.startswith(P) for key in shapes)
        self.plain = False


@pytest.mark.parametrize("name, config, shapes", CASES, ids=[c[0] for c in CASES])
def test_quick_paths_decide_what_the_key_by_key_rules_decide(monkeypatch, name, config, shapes):
    quick = _everything(config, shapes)
    with monkeypatch.context() as m:
        m.setattr(compat, "_Keys", _KeyByKey)  # no key read as a whole
        m.setattr(compat, "_PLAIN_SUFFIXES", frozenset())  # every key through _LORA_KEY
        m.setattr(compat, "_MEGATRON_NAMES", ("",))  # "" is in every text: every key searched alone
        m.setattr(peft_dir, "_ranks_agree", lambda *args: False)  # every module checked alone
        slow = _everything(config, shapes)
    assert quick == slow


def test_the_quick_paths_are_taken_on_an_ordinary_moe_adapter(monkeypatch):
    """Not a vacuous comparison: on a clean MoE adapter no key goes through the regular expressions."""
    monkeypatch.setattr(compat, "_LORA_KEY", None)
    monkeypatch.setattr(compat, "_MEGATRON_NAME", None)
    monkeypatch.setattr(peft_dir, "_ROLE", None)
    monkeypatch.setattr(compat, "_keys_each", None)  # the keys listed in one pass each, not key by key
    monkeypatch.setattr(compat, "_plain_keys", None)  # nor their module names made
    for target in compat.TARGETS:
        findings = compat.check_adapter({**CONFIG, "r": 4}, _moe(), target, model_type="mixtral")
        assert [f.code for f in findings] == (["rank-size"] if target == "vllm" else [])


def test_keys_read_as_a_whole_are_the_keys_read_one_by_one():
    """`_Keys`' counts on the joined keys tell what each key tells: one line each, the prefix, all plain (then the
    shapes of each role and the fused module names), on every key set above and on single odd keys."""
    singles = [k for odd, _ in ODD_KEYS for k in odd] + [
        *(P, P[:-1], f"\n{P}", f"{P}\n", f"{P}m.lora_A.weight\n", f"\n{P}m.lora_B.weight", f"{P}lora_A.weight"),
    ]
    for shapes in [c[2] for c in CASES] + [{k: (4, 16)} for k in singles] + [{k: (4, 16) for k in singles}]:
        keys = compat._Keys(shapes)
        single = not any("\n" in k for k in shapes)
        prefixed = all(k.startswith(P) for k in shapes)
        plain = single and prefixed and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in shapes)
        assert (keys.single, keys.prefixed, keys.plain) == (single, prefixed, plain), shapes
        if plain:
            roles = [{s for k, s in shapes.items() if k.endswith(f".lora_{role}.weight")} for role in "AB"]
            assert list(keys.role_shapes) == roles
            names, _ = compat._plain_keys(shapes)
            shorts = {name.rpartition(".")[2] for name in names}
            assert [n for n in compat._FUSED_NAMES if keys.ends_in_module(n)] == [
                n for n in compat._FUSED_NAMES if n in shorts
            ]


ALIKE = [c for c in CASES if not {"rank_pattern", "alpha_pattern", "target_parameters"} & c[1].keys()]


@pytest.mark.parametrize("name, config, shapes", ALIKE, ids=[c[0] for c in ALIKE])
def test_modules_alike_held_at_once_are_the_modules_made_one_by_one(name, config, shapes):
    """Without rank or alpha patterns and fused parameters `_modules` holds the modules at once (`_Alike`); with a
    pattern that matches no module (so the same ranks and scales) each is made alone: the same modules, and the same
    ranks, scales and fused modules for the rules."""

    def facts(config):
        modules, kinds = compat._modules(config, shapes)
        answers = (compat._ranks(modules), compat._scales(modules), compat._fused(modules))
        return type(modules), dict(modules.items()), list(modules), kinds, answers

    at_once = _outcome(lambda: facts(config))
    one_by_one = _outcome(lambda: facts({**config, "alpha_pattern": {"^no module has this name$": 1}}))
    assert at_once[0] == one_by_one[0]
    if at_once[0] == "ok":
        assert (at_once[1][0], one_by_one[1][0]) == (compat._Alike, dict)
        assert at_once[1][1:] == one_by_one[1][1:]


def test_holds_any_is_any_name_in_the_text():
    """`_holds_any` (names searched only when each of their characters is in the text) answers as a search of each
    name: on random texts and names of a small alphabet (characters present and absent, names empty, repeated, longer
    than the text) and on the MoE keys with and without a Megatron name among them."""
    rng = random.Random(3)
    for _ in range(3000):
        text = "".join(rng.choice("ab.\nq_") for _ in range(rng.randint(0, 12)))
        names = ["".join(rng.choice("ab.q_xv") for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(0, 4))]
        assert compat._holds_any(text, names) == any(name in text for name in names), (text, names)
    keys = "\n".join(_moe())
    for extra in ("", "\nx.linear_fc1.lora_A.weight", "\nx.adapter.linear_out.weight", "\nqkv.to_wrap.x"):
        text = keys + extra
        expected = any(name in text for name in compat._MEGATRON_NAMES)
        assert compat._holds_any(text, compat._MEGATRON_NAMES) == expected == bool(extra)
