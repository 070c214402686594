"""Megatron-LM flags (its real training code runs in test_megatron_lm.py), YAML configs; the Megatron-Bridge callback:
test_bridge_callback.py."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_peft_export.config import HookConfig
from megatron_peft_export.errors import ExportError

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).parents[2]


def test_each_save_is_handed_to_the_hook_once(monkeypatch, tmp_path):
    """The same iteration saved again to the same directory right after (or seen by a wrapper of ours inside another
    wrapper) is not exported again; non-persistent saves reach the hook (which skips them); release saves go to
    <save>/release."""
    import functools

    from megatron_peft_export.integrations import megatron_lm

    calls = []
    hook = SimpleNamespace(
        on_checkpoint_saved=lambda iteration, directory, model, **kw: calls.append(
            (iteration, directory.name, model, kw)
        )
    )
    monkeypatch.setattr(megatron_lm, "_HOOK", hook)
    monkeypatch.setattr(megatron_lm, "_LAST_EXPORTED", [])
    monkeypatch.setattr(
        megatron_lm,
        "_megatron_args",
        lambda: SimpleNamespace(export_hf_adapter=True, save=str(tmp_path), async_save=True),
    )
    saved = []

    def save_checkpoint(
        iteration,
        model,
        optimizer,
        opt_param_scheduler,
        num_floating_point_operations_so_far,
        checkpointing_context=None,
        non_persistent_ckpt=False,
        release=False,
    ):
        saved.append(iteration)

    inner = megatron_lm._wrap_save_checkpoint(save_checkpoint)
    outer = megatron_lm._wrap_save_checkpoint(functools.wraps(save_checkpoint)(lambda *a, **k: inner(*a, **k)))
    outer(2, "model", None, None, 0)
    outer(2, "model", None, None, 0, {})  # e.g. a checkpoint request and the interval save on one iteration
    inner(3, "model", None, None, 0, non_persistent_ckpt=True)
    inner(
        4, model="model", optimizer=None, opt_param_scheduler=None, num_floating_point_operations_so_far=0, release=True
    )
    assert saved == [2, 2, 3, 4]
    async_save = {"finalized": False}
    assert calls == [
        (2, "iter_0000002", "model", {**async_save, "non_persistent": False}),
        (3, "iter_0000003", "model", {**async_save, "non_persistent": True}),
        (4, "release", "model", {**async_save, "non_persistent": False}),
    ]


def test_the_hook_walks_the_model_once_megatron_lm_has_set_it_up(monkeypatch, tmp_path):
    """Wrapped `setup_model_and_optimizer`: its result unchanged, and the hook (made then) prepared with its model;
    nothing without --export-hf-adapter."""
    from megatron_peft_export.integrations import megatron_lm

    prepared = []
    monkeypatch.setattr(megatron_lm, "_HOOK", SimpleNamespace(prepare=prepared.append))
    margs = SimpleNamespace(export_hf_adapter=True, save=str(tmp_path))
    monkeypatch.setattr(megatron_lm, "_megatron_args", lambda: margs)

    def setup_model_and_optimizer(model_provider_func, model_type, checkpointing_context=None):
        return ["chunk"], "optimizer", "scheduler"

    wrapped = megatron_lm._wrap_setup(setup_model_and_optimizer)
    assert wrapped(None, "encoder_or_decoder") == (["chunk"], "optimizer", "scheduler")
    assert prepared == [["chunk"]]
    margs.export_hf_adapter = False
    assert wrapped(None, "encoder_or_decoder", checkpointing_context={}) == (["chunk"], "optimizer", "scheduler")
    assert prepared == [["chunk"]]


def test_add_args_chains_with_an_existing_provider():
    import argparse

    from megatron_peft_export.integrations.megatron_lm import add_args, chain, config_from_args

    def other(parser):
        parser.add_argument("--other-flag", type=int, default=0)
        return parser

    parser = chain(other, add_args)(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--other-flag",
            "3",
            "--export-hf-adapter",
            "--hf-adapter-every-n-saves",
            "2",
            "--hf-adapter-on-error",
            "raise",
        ]
    )
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
