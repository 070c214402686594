"""The option schema: each option declared once, and every surface made from it agrees with it (the config
dataclasses, the YAML section, export_adapter's keywords, the Megatron-LM flags, the CLI, docs/options.md); a bad value
is refused where a config is made, as an OptionError carrying the option, what it expected and what it found."""

import argparse
import ast
import dataclasses
import inspect
import math
from pathlib import Path

import pytest

from megatron_peft_export import export_adapter, load_hf_adapter
from megatron_peft_export.cli import main
from megatron_peft_export.config import HookConfig, PushConfig, VerifyConfig
from megatron_peft_export.core import options as schema
from megatron_peft_export.core.names import RULE
from megatron_peft_export.errors import ExportError, OptionError
from megatron_peft_export.export import ExportOptions
from megatron_peft_export.integrations import megatron_lm
from megatron_peft_export.services.delivery import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {
    "HookConfig": HookConfig,
    "VerifyConfig": VerifyConfig,
    "PushConfig": PushConfig,
    "ExportOptions": ExportOptions,
}


def test_the_committed_docs_table_is_the_generated_one():
    committed = (ROOT / "docs" / "options.md").read_text()
    assert committed == schema.markdown(), (
        "docs/options.md is stale: python -m megatron_peft_export.core.options --markdown > docs/options.md"
    )


def test_every_option_is_declared_once_with_a_docstring():
    keys = [o.key for o in schema.SCHEMA]
    assert len(keys) == len(set(keys))
    for option in schema.SCHEMA:
        assert option.doc.strip() and option.expected.strip(), option.key
        assert option.surfaces or option.flags, f"{option.key} appears nowhere"


@pytest.mark.parametrize("surface", sorted(CLASSES))
def test_each_config_class_has_exactly_the_fields_and_defaults_of_its_surface(surface):
    fields = {f.name: f.default for f in dataclasses.fields(CLASSES[surface])}
    declared = {o.name: o.default for o in schema.options(surface=surface) if surface in o.surfaces}
    assert fields == {n: (dataclasses.MISSING if d is schema.REQUIRED else d) for n, d in declared.items()}


def test_export_adapter_takes_the_options_of_its_surface_with_their_defaults():
    params = inspect.signature(export_adapter).parameters
    for option in schema.options(surface=schema.CALL):
        assert option.name in params, option.name
        default = None if option.name == "collective_timeout" else option.default  # None: the group's own timeout
        assert params[option.name].default == default, option.name
    assert "export_adapter" in schema.markdown()


def test_load_hf_adapter_takes_the_options_of_its_surface_and_checks_them_before_reading():
    params = inspect.signature(load_hf_adapter).parameters
    declared = schema.options(surface=schema.IMPORT)
    assert {o.name for o in declared} == {"adapter_name", "model_type", "base_model_name_or_path", "allow_nonfinite"}
    for option in declared:
        assert params[option.name].default == option.default, option.name
    assert "load_hf_adapter" in schema.markdown()
    with pytest.raises(OptionError, match="adapter_name"):
        load_hf_adapter(object(), "/nonexistent", adapter_name="../x")
    with pytest.raises(OptionError, match="allow_nonfinite"):
        load_hf_adapter(object(), "/nonexistent", allow_nonfinite="yes")


def test_every_megatron_lm_flag_of_the_schema_is_added_and_reaches_the_config():
    parser = megatron_lm.add_args(argparse.ArgumentParser())
    for own in ("--wandb-project", "--wandb-entity", "--wandb-exp-name", "--wandb-save-dir", "--save"):
        parser.add_argument(own, default="")  # Megatron-LM defines these itself
    added = {a for action in parser._actions for a in action.option_strings}
    flags = {o.flags[schema.MLM].flag for o in schema.options(surface=schema.MLM)}
    assert flags <= added
    argv = ["--export-hf-adapter", "--hf-adapter-dir-name", "peft", "--hf-adapter-every-n-saves", "3"]
    argv += ["--hf-adapter-base-model", "/b", "--hf-adapter-name", "sft", "--hf-adapter-names", "sft, math"]
    argv += ["--hf-adapter-pad-rank-to", "8", "--hf-adapter-dtype", "float16", "--hf-adapter-model-type", "qwen3"]
    argv += ["--hf-adapter-expert-layout", "fused", "--hf-adapter-on-error", "raise", "--hf-adapter-max-pending", "2"]
    argv += ["--hf-adapter-collective-timeout", "12.5", "--hf-adapter-allow-nonfinite", "--hf-adapter-verify"]
    argv += ["--hf-adapter-verify-base-model", "/v", "--hf-adapter-verify-required", "--hf-adapter-verify-dtype"]
    argv += ["bfloat16", "--hf-adapter-wandb-artifact", "--wandb-project", "p", "--wandb-entity", "e"]
    argv += ["--wandb-exp-name", "x", "--wandb-save-dir", "/w", "--hf-adapter-push-repo-id", "me/a"]
    argv += ["--hf-adapter-push-strategy", "end", "--hf-adapter-push-private", "--hf-adapter-push-revision", "r"]
    config = megatron_lm.config_from_args(parser.parse_args(argv))
    assert config == HookConfig(
        subdir="peft",
        every_n_saves=3,
        base_model_name_or_path="/b",
        adapter_name="sft",
        adapter_names=["sft", "math"],
        pad_rank_to=8,
        dtype="float16",
        model_type="qwen3",
        expert_layout="fused",
        on_error="raise",
        max_pending=2,
        collective_timeout=12.5,
        allow_nonfinite=True,
        verify=VerifyConfig(
            base_model="/v",
            required=True,
            dtype="bfloat16",
            wandb_artifact=True,
            wandb_project="p",
            wandb_entity="e",
            wandb_exp_name="x",
            wandb_save_dir="/w",
        ),
        push=PushConfig(repo_id="me/a", strategy="end", private=True, revision="r"),
    )


@pytest.mark.parametrize(
    "flag,value",
    [("--hf-adapter-every-n-saves", "0"), ("--hf-adapter-max-pending", "x"), ("--hf-adapter-pad-rank-to", "-2")]
    + [("--hf-adapter-collective-timeout", "0"), ("--hf-adapter-model-type", "gpt2")]
    + [("--hf-adapter-push-repo-id", "no-owner"), ("--hf-adapter-verify-base-model", "")],
)
def test_megatron_lm_flags_refuse_a_bad_number_or_name_when_parsed(capsys, flag, value):
    parser = megatron_lm.add_args(argparse.ArgumentParser(prog="pretrain_gpt.py"))
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--export-hf-adapter", flag, value])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"argument {flag}:" in err and "Traceback" not in err, err


BAD = [
    # option, value, what the error says it expected
    ("dtype", "bf17", "bfloat16, float16 or float32 (or bf16, fp16, fp32)"),
    ("expert_layout", "bogus", "one of auto, per_expert, fused"),
    ("subdir", "..", RULE),
    ("subdir", "a/b", RULE),
    ("adapter_name", "", RULE),
    ("adapter_names", 3, "'all' or a list of adapter names"),
    ("adapter_names", [], "at least one name and no repeats"),
    ("adapter_names", ["a", "a"], "at least one name and no repeats"),
    ("every_n_saves", 0, "an integer >= 1"),
    ("every_n_saves", 1.5, "an integer >= 1"),
    ("every_n_saves", True, "an integer >= 1"),
    ("max_pending", -3, "an integer >= 1"),
    ("pad_rank_to", 0, "a rank >= 1"),
    ("pad_rank_to", "8", "a rank >= 1"),
    ("publish_timeout", -1, "seconds >= 0"),
    ("publish_timeout", math.inf, "seconds >= 0"),
    ("collective_timeout", 0, "seconds > 0"),
    ("collective_timeout", "300", "seconds > 0"),
    ("sigterm_grace", "20", "seconds >= 0 (or null)"),
    ("on_error", "ignore", "'warn' or 'raise'"),
    ("enabled", 1, "true or false"),
    ("allow_nonfinite", "no", "true or false"),
    ("base_model_name_or_path", 7, "a directory or Hub id"),
    ("base_model_name_or_path", "", "a directory or Hub id"),
    ("model_type", 5, "an HF model_type (e.g. llama)"),
    ("verify", "yes", "a mapping of VerifyConfig fields"),
    ("push", ["me/x"], "a mapping of PushConfig fields"),
]


@pytest.mark.parametrize("option,value,expected", BAD, ids=lambda v: repr(v)[:30])
def test_hook_config_refuses_a_bad_value_with_expected_and_found(option, value, expected):
    for make in (lambda: HookConfig(**{option: value}), lambda: HookConfig.from_mapping({option: value})):
        with pytest.raises(OptionError) as raised:
            make()
        error = raised.value
        assert (error.option, error.expected, error.found) == (option, expected, value)
        assert str(error).startswith(f"{option}: expected {expected}, found {value!r:.80}")


_HUB_URL = "http(s)://host[:port] (the Hub's address; no user:password@, the token goes in HF_TOKEN or the login)"
NESTED_BAD = [
    (VerifyConfig, "verify", "dtype", "float16", "one of float32, bfloat16"),
    (VerifyConfig, "verify", "probe_batch", 0, "an integer >= 1"),
    (VerifyConfig, "verify", "probe_seed", "0", "an integer"),
    (VerifyConfig, "verify", "top_k", 2.0, "an integer >= 1"),
    (VerifyConfig, "verify", "max_abs_diff", "big", "a number"),
    (VerifyConfig, "verify", "min_top1_agreement", math.nan, "a number"),
    (VerifyConfig, "verify", "required", "yes", "true or false"),
    (VerifyConfig, "verify", "device", 0, "a torch device (cpu, cuda:1)"),
    (VerifyConfig, "verify", "wandb_project", 3, "a string"),
    (PushConfig, "push", "strategy", "sometimes", "one of end, every_save, all_checkpoints"),
    (PushConfig, "push", "retries", -1, "an integer >= 0"),
    (PushConfig, "push", "retries", "3", "an integer >= 0"),
    (PushConfig, "push", "retry_wait", -0.5, "seconds >= 0"),
    (PushConfig, "push", "private", "true", "true or false"),
    (PushConfig, "push", "endpoint", "", _HUB_URL),
    (PushConfig, "push", "endpoint", "https://me:hf_x@hub.example", _HUB_URL),
]


@pytest.mark.parametrize("cls,section,option,value,expected", NESTED_BAD, ids=lambda v: repr(v)[:30])
def test_verify_and_push_sections_refuse_a_bad_value_with_expected_and_found(cls, section, option, value, expected):
    required = {"repo_id": "me/x"} if cls is PushConfig else {}
    for make in (
        lambda: cls(**required, **{option: value}),
        lambda: HookConfig.from_mapping({section: {**required, option: value}}),
    ):
        with pytest.raises(OptionError) as raised:
            make()
        assert (raised.value.option, raised.value.expected, raised.value.found) == (
            f"{section}.{option}",
            expected,
            value,
        )


@pytest.mark.parametrize(
    "option,value,expected",
    [
        (
            "url",
            "localhost:8000",
            "http(s)://host:port (the vLLM server's base URL; no user:password@, the key goes in api_key_env's "
            "variable)",
        ),
        ("name", "a/b", "a plain non-empty name (no '/', no surrounding spaces)"),
        ("keep", 0, "an integer >= 1"),
        ("retries", 1.0, "an integer >= 1"),
        ("timeout", -1, "seconds >= 0"),
        ("max_lora_rank", 0, "a rank >= 1"),
        ("api_key_env", "", "an environment variable's name"),
    ],
)
def test_serve_config_refuses_a_bad_value_with_expected_and_found(option, value, expected):
    with pytest.raises(OptionError) as raised:
        ServeConfig(**{"url": "http://h:1", option: value})
    assert (raised.value.option, raised.value.expected, raised.value.found) == (f"serve.{option}", expected, value)


def test_unknown_and_missing_keys_are_refused_naming_the_known_ones(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("export_hf_adapter:\n  every_n_save: 2\n")
    with pytest.raises(OptionError, match="export_hf_adapter: unknown option.*every_n_save; expected some of") as e:
        HookConfig.from_yaml(config)
    assert e.value.found == ["every_n_save"] and "every_n_saves" in e.value.expected
    with pytest.raises(OptionError, match=r"export_hf_adapter.push: missing repo_id"):
        HookConfig.from_mapping({"push": {"strategy": "end"}})
    with pytest.raises(OptionError, match=r"export_hf_adapter.verify: expected a mapping, found list"):
        schema.build(VerifyConfig, ["x"], "export_hf_adapter.verify")


def test_a_nested_mapping_given_in_python_becomes_its_section():
    config = HookConfig(verify={"base_model": "/m", "top_k": 3}, push={"repo_id": "me/x"})
    assert config.verify == VerifyConfig(base_model="/m", top_k=3)
    assert config.push == PushConfig(repo_id="me/x")


@pytest.mark.parametrize("kwargs", [{"overwrite": "yes"}, {"model_type": 3}, {"dtype": "int8"}], ids=str)
def test_export_options_and_export_adapter_refuse_before_touching_the_model(tmp_path, kwargs):
    with pytest.raises(OptionError):
        ExportOptions(**kwargs)
    with pytest.raises(OptionError):
        export_adapter(object(), tmp_path / "out", **kwargs)
    with pytest.raises(OptionError, match="collective_timeout: expected seconds > 0, found -1"):
        export_adapter(object(), tmp_path / "out", collective_timeout=-1)
    assert list(tmp_path.iterdir()) == []


def test_export_options_take_a_torch_dtype():
    import torch

    assert ExportOptions(dtype=torch.bfloat16).dtype is torch.bfloat16
    with pytest.raises(OptionError):
        ExportOptions(dtype=torch.int8)


@pytest.mark.parametrize(
    "argv,line",
    [
        (
            ["export", "ckpt", "--output", "o", "--pad-rank-to", "0"],
            "error: pad_rank_to: expected a rank >= 1, found 0",
        ),
        (["push", "p", "--repo-id", "me/x", "--retries", "-1"], "error: push.retries: expected an integer >= 0"),
        (["verify", "a", "--base-model", "b", "--top-k", "0"], "error: verify.top_k: expected an integer >= 1"),
    ],
)
def test_the_cli_reports_a_bad_option_as_one_error_line(tmp_path, capsys, monkeypatch, argv, line):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def _imports(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            found.add("." * node.level + (node.module or ""))
    return found


def test_the_schema_and_the_config_sit_low():
    package = ROOT / "megatron_peft_export"
    assert _imports(package / "config.py") == {".core.options", ".errors"}
    assert _imports(package / "core" / "options.py") <= {"..errors", ".names", ".archs"}
    assert _imports(package / "core" / "names.py") == {"..errors"}


def test_an_option_error_keeps_its_data_across_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(OptionError(option="dtype", expected="bf16", found="x")))
    assert isinstance(error, ExportError) and (error.option, error.expected, error.found) == ("dtype", "bf16", "x")
    assert str(error) == "dtype: expected bf16, found 'x'"


@pytest.mark.parametrize(
    "field, value",
    [
        ("repo_id", "org/name\n"),  # `$` matched before a final newline
        ("repo_id", "org/name\nX-Injected: 1"),
        ("repo_id", "org/a/b"),
        ("repo_id", "org/.."),
        ("revision", "../main"),
        ("revision", "dev\n"),
        ("revision", "dev\x1b[2J"),
        ("revision", "a..b"),
        ("revision", "/abs"),
        ("revision", "x/"),
    ],
)
def test_hub_names_with_control_characters_or_traversal_are_refused(field, value):
    from megatron_peft_export.errors import OptionError

    with pytest.raises(OptionError):
        PushConfig(**{"repo_id": "me/tiny-lora", field: value})


def test_plain_hub_names_pass():
    assert PushConfig(repo_id="my-org/llama.lora_3", revision="runs/v1.0").revision == "runs/v1.0"
