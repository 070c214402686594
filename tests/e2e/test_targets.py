"""target_modules that miss the adapter's own tensors, or match nothing in the base model (known from its config.json
alone, no weights), are refused by push (unless --allow-target-mismatch) and by load_hf_adapter; verify fails them."""

import json
import shutil
from pathlib import Path

import pytest

from megatron_peft_export.cli import main
from megatron_peft_export.errors import AdapterFileError
from megatron_peft_export.targets import base_model, check_targets, targeted, tensor_modules
from tests.e2e.test_bad_input import _import_each, exported  # noqa: F401  (the module fixture)
from tests.support.fake_hub import write_adapter
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
TINY_LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 64,
}
TINY_MOE = {
    "model_type": "qwen3_moe",
    "num_hidden_layers": 2,
    "hidden_size": 16,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 64,
}
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 64, "num_hidden_layers": 2}


def _keys(*modules, roles=("lora_A.weight", "lora_B.weight")):
    return [f"{P}{m}.{r}" for m in modules for r in roles]


def test_tensor_modules_are_peft_module_names():
    keys = _keys(Q, "model.layers.0.mlp.experts.base_layer.base_layer") + [
        f"{P}{Q}.lora_magnitude_vector",
        f"{P}model.embed_tokens.weight",
    ]
    assert tensor_modules(keys) == {Q, "model.layers.0.mlp.experts"}


@pytest.mark.parametrize(
    "config,module,expected",
    [
        ({"target_modules": ["q_proj"]}, Q, True),
        ({"target_modules": [Q]}, Q, True),
        ({"target_modules": ["proj"]}, Q, False),  # a suffix after a dot, never a substring
        ({"target_modules": ["self_attn.q_proj"]}, Q, True),
        ({"target_modules": r".*\.q_proj"}, Q, True),
        ({"target_modules": "q_proj"}, Q, False),  # a string is a regular expression matched in full
        ({"target_modules": "all-linear"}, Q, True),
        ({"target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj"]}, "model.layers.1.mlp.experts", True),
        ({"target_modules": None, "target_parameters": ["mlp.gate.weight"]}, "model.layers.1.mlp.gate", True),
        ({"target_modules": None, "target_parameters": ["mlp.gate.weight"]}, "model.layers.1.mlp.experts", False),
        ({"target_modules": None}, Q, False),
    ],
)
def test_targeted_follows_peft(config, module, expected):
    assert targeted(config, module) is expected


@pytest.mark.parametrize(
    "peft_kwargs",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": r".*layers\.1\..*_proj"},
        {"target_modules": ["down_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["k_proj"]},
        {"target_modules": ["model.layers.0.mlp.up_proj", "o_proj"]},
    ],
    ids=str,
)
def test_whatever_peft_targets_is_targeted_here(peft_kwargs):
    """The check is a superset of peft's own rule: it never refuses a module peft would adapt."""
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))
    config = LoraConfig(**peft_kwargs)
    ours = {k: v for k, v in peft_kwargs.items() if k == "target_modules"}
    names = [name for name, _ in model.named_modules() if name]
    by_peft = {n for n in names if check_target_module_exists(config, n)}
    assert by_peft and by_peft <= {n for n in names if targeted(ours, n)}


def test_targets_missing_the_weights_are_refused():
    keys = _keys(Q, "model.layers.0.self_attn.v_proj")
    with pytest.raises(
        AdapterFileError,
        match=r"target_modules \['nothing'\] match none of the 2 modules its weights are for \(e\.g\. model",
    ):
        check_targets({"target_modules": ["nothing"]}, keys, "a")
    with pytest.raises(
        AdapterFileError,
        match=r"miss 1 of the 2 modules its weights are for \(e\.g\. model\.layers\.0\.self_attn\.v_proj\)",
    ):
        check_targets({"target_modules": ["q_proj"]}, keys, "a")
    check_targets({"target_modules": ["q_proj", "v_proj"]}, keys, "a")


def test_the_base_model_comes_from_its_config_and_both_expert_layouts_fit():
    llama = base_model(TINY_LLAMA, "tiny-llama")
    check_targets({"target_modules": ["q_proj"]}, _keys(Q, "model.layers.1.self_attn.q_proj"), "a", llama)
    with pytest.raises(AdapterFileError, match=r"match no module of the base model \(tiny-llama\)"):
        check_targets({"target_modules": ["c_attn"]}, _keys("transformer.h.0.attn.c_attn"), "a", llama)
    with pytest.raises(
        AdapterFileError,
        match=r"1 of the 2 modules its weights are for are not in the base model \(tiny-llama\), e\.g\. "
        r"model\.layers\.2",
    ):
        check_targets(
            {"target_modules": ["q_proj"]}, _keys(Q, "model.layers.2.self_attn.q_proj"), "a", llama
        )  # 2 layers only
    moe = base_model(TINY_MOE, "tiny-moe")
    per_expert = [
        f"model.layers.{i}.mlp.experts.{e}.{p}"
        for i in (0, 1)
        for e in range(4)
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    check_targets(
        {"target_modules": ["gate_proj", "up_proj", "down_proj"]}, _keys(*per_expert), "a", moe
    )  # transformers v4, vLLM
    fused = {
        "target_modules": [],
        "target_parameters": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"],
    }
    check_targets(
        fused,
        _keys("model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer", "model.layers.0.mlp.gate"),
        "a",
        moe,
    )  # v5
    with pytest.raises(
        AdapterFileError,
        match=r"not in the base model \(tiny-moe\), e\.g\. model\.layers\.0\.mlp\.experts\.4\.gate_proj",
    ):
        check_targets(
            {"target_modules": ["gate_proj"]}, _keys("model.layers.0.mlp.experts.4.gate_proj"), "a", moe
        )  # 4 experts: 0..3


@pytest.mark.parametrize(
    "claims",
    [{"num_hidden_layers": 10**9}, {"num_experts": 10**9}, {"num_hidden_layers": "2"}, {"num_hidden_layers": -1}],
    ids=str,
)
def test_a_config_claiming_absurd_sizes_builds_nothing(claims):
    assert base_model({**TINY_MOE, **claims}, "huge") is None


def test_unknown_families_come_from_transformers_alone():
    gpt2 = base_model(TINY_GPT2, "gpt2")
    assert "transformer.h.1.attn.c_attn" in gpt2.modules and not any("q_proj" in m for m in gpt2.modules)
    assert base_model({"model_type": "no-such-family", "num_hidden_layers": 2}, "x") is None


# --------------------------------------------------------------------------------------------------- push and import


def _adapter(path: Path, base: Path | str, target_modules) -> Path:
    write_adapter(path, base_model=str(base))
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": target_modules}))
    return path


@pytest.mark.parametrize(
    "case,base_config,target_modules,message",
    [
        (
            "targets miss the weights",
            TINY_LLAMA,
            ["k_proj"],
            "target_modules ['k_proj'] match none of the 1 modules its weights are for",
        ),
        (
            "targets miss the weights, no local base",
            None,
            "nothing",
            "target_modules 'nothing' match none of the 1 modules",
        ),
        ("another model's adapter", TINY_GPT2, ["q_proj"], "match no module of the base model"),
    ],
)
def test_push_refuses_targets_that_match_nothing_unless_asked(
    hub, tmp_path, capsys, case, base_config, target_modules, message
):
    base = tmp_path / "base"
    if base_config is not None:
        base.mkdir()
        (base / "config.json").write_text(json.dumps(base_config))
    adapter = _adapter(tmp_path / "adapter", base if base_config else "some-org/not-here", target_modules)
    push = ["push", str(adapter), "--repo-id", "me/run", "--endpoint", hub.endpoint, "--retries", "0"]
    assert main(push) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ")
        and err.count("\n") == 1
        and message in err
        and "pass --allow-target-mismatch to push it anyway" in err
    ), err
    assert hub.requests == []
    assert main([*push, "--allow-target-mismatch"]) == 0 and len(hub.commits) == 1


def test_push_checks_against_the_base_model_named_on_the_command_line(hub, tmp_path, capsys):
    llama, gpt2 = tmp_path / "llama", tmp_path / "gpt2"
    for path, config in ((llama, TINY_LLAMA), (gpt2, TINY_GPT2)):
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
    adapter = _adapter(tmp_path / "adapter", llama, ["q_proj"])
    push = ["push", str(adapter), "--repo-id", "me/run", "--endpoint", hub.endpoint, "--retries", "0"]
    assert (
        main([*push, "--base-model", str(gpt2)]) == 2 and "match no module of the base model" in capsys.readouterr().err
    )
    assert main(push) == 0
    other = _adapter(
        tmp_path / "other", gpt2, ["q_proj"]
    )  # --base-model not on this machine: the adapter's own base is checked
    assert main([*push[:1], str(other), *push[2:], "--base-model", "some-org/not-here"]) == 2
    assert f"match no module of the base model ({gpt2})" in capsys.readouterr().err


def test_load_hf_adapter_refuses_targets_that_miss_its_weights(exported, tmp_path):  # noqa: F811
    cases = {"targets_nothing": ["nothing"], "targets_one_of_seven": ["q_proj"]}
    for name, targets in cases.items():
        shutil.copytree(exported / "live", tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, "target_modules": targets}))
    (found, unchanged) = run_ranks(_import_each, 1, str(tmp_path), sorted(cases))[0]
    assert unchanged, "no adapter parameter may change when an import is refused"
    assert (
        found["targets_nothing"].startswith("AdapterFileError: ")
        and "match none of the 28 modules its weights are for" in found["targets_nothing"]
    )
    assert "miss 24 of the 28 modules" in found["targets_one_of_seven"], found
