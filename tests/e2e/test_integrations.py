"""Megatron-LM (against a stand-in of megatron.training), YAML configs; the Megatron-Bridge callback: test_bridge_callback.py."""

import sys
from pathlib import Path

import pytest

from megatron_peft_export.config import HookConfig
from megatron_peft_export.errors import ExportError
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
STANDIN = Path(__file__).parents[1] / "support" / "megatron_lm_standin"
ROOT = Path(__file__).parents[2]


def _megatron_lm_run(rank, world, save, extra_argv):
    sys.path.insert(0, str(STANDIN))
    sys.argv = ["pretrain_gpt.py", "--save", save, "--save-interval", "2", "--train-iters", "4",
                "--tensor-model-parallel-size", str(world), "--export-hf-adapter", "--export-te-mcore-model", *extra_argv]
    from tests.support.tiny_gpt import init_parallel

    init_parallel(world)
    import pretrain_gpt

    from megatron_peft_export.integrations import megatron_lm

    args = pretrain_gpt.main()
    published = megatron_lm.finalize()
    return {"published": [str(p) for p in published], "modelopt_flag": args.export_te_mcore_model, "dir_name": args.hf_adapter_dir_name}


def test_two_lines_in_pretrain_gpt_export_at_every_save(tmp_path):
    results = run_ranks(_megatron_lm_run, 2, str(tmp_path), ["--hf-adapter-dir-name", "peft"])
    assert results[0]["published"] == [str(tmp_path / f"iter_000000{i}" / "peft") for i in (2, 4)]
    assert results[1]["published"] == []
    assert all(r["modelopt_flag"] is True and r["dir_name"] == "peft" for r in results)  # both providers' flags parsed
    for i in (2, 4):
        assert (tmp_path / f"iter_000000{i}" / "peft" / "adapter_model.safetensors").is_file()


def test_add_args_chains_with_an_existing_provider():
    import argparse

    from megatron_peft_export.integrations.megatron_lm import add_args, chain, config_from_args

    def other(parser):
        parser.add_argument("--other-flag", type=int, default=0)
        return parser

    parser = chain(other, add_args)(argparse.ArgumentParser())
    args = parser.parse_args(["--other-flag", "3", "--export-hf-adapter", "--hf-adapter-every-n-saves", "2", "--hf-adapter-on-error", "raise"])
    config = config_from_args(args)
    assert args.other_flag == 3
    assert (config.enabled, config.every_n_saves, config.on_error, config.subdir) == (True, 2, "raise", "hf_adapter")
    assert config_from_args(parser.parse_args([])).enabled is False


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = HookConfig.from_yaml(path)
    assert config.enabled


def test_yaml_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "train.yaml"
    bad.write_text("export_hf_adapter:\n  every_n_save: 2\n")
    with pytest.raises(ExportError, match="unknown option.*every_n_save; expected some of .*every_n_saves"):
        HookConfig.from_yaml(bad)
    bad.write_text("export_hf_adapter:\n  on_error: ignore\n")
    with pytest.raises(ExportError, match="on_error: expected 'warn' or 'raise', found 'ignore'"):
        HookConfig.from_yaml(bad)
    bad.write_text("model: {}\n")
    assert HookConfig.from_yaml(bad).enabled is False
    assert HookConfig.from_mapping(True) == HookConfig()
