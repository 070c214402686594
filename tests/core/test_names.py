"""Adapter names, the adapter directory's name and the other cheap options are checked when a configuration is
made (HookConfig, YAML, export_adapter's arguments, the CLI, the Megatron-LM flags), never first at a save."""

import argparse

import pytest

from megatron_peft_export import export_adapter
from megatron_peft_export.cli import main
from megatron_peft_export.config import HookConfig
from megatron_peft_export.core.names import check_name
from megatron_peft_export.errors import ExportError
from megatron_peft_export.export import ExportOptions
from megatron_peft_export.integrations import megatron_lm

GOOD = ["hf_adapter", "default", "math-v2", "a", "_x", "A.b_c-1", "x" * 128]
BAD = [
    "",
    ".",
    "..",
    "x\n",
    "\nx",
    "a/b",
    "a\\b",
    "../x",
    "x" * 129,
    "a b",
    "a\tb",
    "a\0b",
    "-x",
    ".hidden",
    "x\r",
    "é",
    "a\u2028b",
    7,
    None,
    ["x"],
]


@pytest.mark.parametrize("name", GOOD)
def test_plain_names_pass(name):
    assert check_name(name, "subdir") == name


@pytest.mark.parametrize("name", BAD, ids=repr)
def test_anything_else_is_refused_naming_the_option(name):
    with pytest.raises(ExportError, match=r"^subdir: expected a plain directory name"):
        check_name(name, "subdir")


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("subdir", "..", "subdir: expected a plain directory name"),
        ("subdir", "hf_adapter\n", "subdir: expected a plain directory name"),
        ("adapter_name", "x\n", "adapter_name: expected a plain directory name"),
        ("adapter_names", ["default", "math\n"], "adapter_names: expected a plain directory name"),
        ("adapter_names", ["default", ".."], "adapter_names: expected a plain directory name"),
        ("dtype", "bf17", "dtype: expected bfloat16, float16 or float32"),
        ("dtype", ["bfloat16"], "dtype: expected bfloat16, float16 or float32"),
        ("expert_layout", "fusd", "expert_layout: expected one of auto, per_expert, fused"),
        ("model_type", "gpt2", "found 'gpt2'"),
        ("pad_rank_to", 0, "pad_rank_to: expected a rank >= 1"),
        ("every_n_saves", "2", "every_n_saves: expected an integer >= 1"),
        ("max_pending", 0, "max_pending: expected an integer >= 1"),
        ("collective_timeout", 0, "collective_timeout: expected seconds > 0"),
        ("publish_timeout", float("nan"), "publish_timeout: expected seconds >= 0"),
        ("sigterm_grace", -1, "sigterm_grace: expected seconds >= 0 (or null)"),
        ("enabled", "yes", "enabled: expected true or false"),
        ("verify", "yes", "verify: expected a mapping of VerifyConfig fields"),
        ("on_error", "ignore", "on_error: expected 'warn' or 'raise'"),
    ],
)
def test_hook_config_refuses_a_bad_value_when_it_is_made(field, value, fragment):
    with pytest.raises(ExportError) as raised:
        HookConfig(**{field: value})
    assert fragment in str(raised.value)
    with pytest.raises(ExportError) as raised:  # the same from a YAML section
        HookConfig.from_mapping({field: value})
    assert fragment in str(raised.value)


def test_the_defaults_and_good_values_pass():
    HookConfig()
    HookConfig(
        subdir="peft",
        adapter_name="sft",
        adapter_names=["math", "default"],
        dtype="bf16",
        expert_layout="fused",
        model_type="qwen3_moe",
        pad_rank_to=16,
        sigterm_grace=None,
    )


@pytest.mark.parametrize(
    "kwargs", [{"adapter_name": "x\n"}, {"dtype": "bf17"}, {"expert_layout": "v5"}, {"pad_rank_to": -1}], ids=str
)
def test_export_adapter_refuses_bad_arguments_before_touching_the_model(tmp_path, kwargs):
    with pytest.raises(ExportError):
        ExportOptions(**kwargs)
    with pytest.raises(ExportError):  # no process group, no model: it fails before either is used
        export_adapter(object(), tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [["--adapter-name", "x\n"], ["--dtype", "float32", "--expert-layout", "auto", "--adapter-name", ".."]],
    ids=str,
)
def test_cli_export_refuses_a_bad_adapter_name_with_one_line(tmp_path, capsys, argv):
    assert main(["export", str(tmp_path / "nothing"), "--output", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: adapter_name: expected a plain directory name") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--hf-adapter-dir-name", ".."),
        ("--hf-adapter-dir-name", "hf_adapter\n"),
        ("--hf-adapter-name", "a/b"),
        ("--hf-adapter-names", "default,.."),
        ("--hf-adapter-dtype", "bf17"),
        ("--hf-adapter-expert-layout", "v5"),
    ],
)
def test_megatron_lm_flags_refuse_a_bad_value_when_parsed(capsys, flag, value):
    parser = megatron_lm.add_args(argparse.ArgumentParser(prog="pretrain_gpt.py"))
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--export-hf-adapter", flag, value])
    assert exited.value.code == 2 and flag in capsys.readouterr().err
    args = parser.parse_args(
        ["--export-hf-adapter", "--hf-adapter-names", "math,default", "--hf-adapter-dir-name", "peft"]
    )
    assert megatron_lm.config_from_args(args).adapter_names == ["math", "default"]
