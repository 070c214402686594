"""Several named ModelOpt adapters at TP2: peft's multi-adapter layout, each adapter reproducing its own Megatron
logits."""

import logging
from pathlib import Path

import pytest

from tests.support.hook_loop import LogRecords
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _only(model, name):
    """Megatron logits with only adapter `name` acting (ModelOpt sums every enabled adapter)."""
    import modelopt.torch.peft as mtp

    mtp.disable_adapters(model)
    mtp.enable_adapters(model, adapters_to_enable=[name])


def _peft_multi_adapter_diffs(directory, cfg, tokens, reference):
    """Load the root adapter, then every other one with load_adapter; set_adapter each and compare with Megatron."""
    import peft
    import torch
    from safetensors.torch import load_file

    from tests.support.tiny_gpt import hf_llama_twin, hf_logits

    base = hf_llama_twin(cfg)
    base_logits = hf_logits(base, tokens)
    model = peft.PeftModel.from_pretrained(base, str(directory)).eval()
    names = [n for n in reference if n != "default"]
    for name in names:
        model.load_adapter(str(directory / name), adapter_name=name)
    diffs = {}
    for name in ["default", *names, "default"]:
        model.set_adapter(name)
        on_disk = load_file(str((directory if name == "default" else directory / name) / "adapter_model.safetensors"))
        held = peft.get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
        assert held.keys() == on_disk.keys() and all(torch.equal(held[k], on_disk[k]) for k in on_disk), name
        logits = hf_logits(model, tokens)
        assert (logits - base_logits).abs().max() > 1e-3, f"adapter {name} barely changes the logits"
        diffs[name] = (logits - reference[name]).abs().max().item()
    return diffs


def _two_adapters(rank, world, tmp):
    import json

    import modelopt.torch.peft as mtp
    import torch.distributed as dist

    from megatron_peft_export import ExportError, export_adapters
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from tests.support.tiny_gpt import (
        TinyGPTConfig,
        apply_modelopt_lora,
        build_gpt,
        fill_lora_random,
        hf_llama_twin,
        init_parallel,
        megatron_logits,
        sample_tokens,
    )

    records = LogRecords(logging.INFO)
    cfg = TinyGPTConfig()
    init_parallel(world)
    model = apply_modelopt_lora(build_gpt(cfg))  # "default": rank 8, scale 2, every linear
    apply_modelopt_lora(model, adapter_name="math", rank=12, scale=0.5, targets=("*linear_qkv*", "*linear_fc2*"))
    fill_lora_random(model, seed=11)
    tokens = sample_tokens(cfg)
    reference = {}
    for name in ("default", "math"):
        _only(model, name)
        reference[name] = megatron_logits(model, tokens)
    _only(model, "default")
    export_adapters(model, Path(tmp) / "all_but_math")  # "math" is disabled: skipped, with a warning
    mtp.enable_adapters(model)
    base_dir = Path(tmp) / "base"
    if rank == 0:
        hf_llama_twin(cfg).config.save_pretrained(base_dir)
    dist.barrier()
    out = export_adapters(model, Path(tmp) / "adapters", base_model_name_or_path=str(base_dir))
    only_math = export_adapters(model, Path(tmp) / "only_math", adapter_names=["math"], pad_rank_to=16)
    hook = AdapterExportHook(HookConfig(adapter_names=["math", "default"]))  # "default" still goes to the root
    hook.on_checkpoint_saved(5, Path(tmp) / "iter_0000005", model)
    hook.finalize()
    errors = []
    for names in (["nope"], []):
        try:
            export_adapters(model, Path(tmp) / "never", adapter_names=names)
        except ExportError as exc:
            errors.append(str(exc))
    if rank != 0:
        return errors
    return {
        "errors": errors,
        "diffs": _peft_multi_adapter_diffs(out, cfg, tokens, reference),
        "only_math": _peft_multi_adapter_diffs(only_math, cfg, tokens, {"default": reference["math"]}),
        "only_math_config": json.loads((only_math / "adapter_config.json").read_text()),
        "math_config": json.loads((out / "math" / "adapter_config.json").read_text()),
        "logs": records.messages,
        "card": (out / "README.md").read_text(),
    }


def test_two_named_modelopt_adapters_at_tp2_reproduce_their_logits_through_peft(tmp_path):
    from safetensors.torch import load_file

    results = run_ranks(_two_adapters, 2, str(tmp_path))
    first = results[0]
    assert max(first["diffs"].values()) <= 1e-5, first["diffs"]
    assert first["only_math"]["default"] <= 1e-5
    adapters = tmp_path / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "math",
    ]
    assert sorted(p.name for p in (adapters / "math").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert first["math_config"]["target_modules"] == ["down_proj", "k_proj", "q_proj", "v_proj"]
    assert (first["math_config"]["r"], first["math_config"]["lora_alpha"]) == (12, 6)
    assert 'model.load_adapter("<this directory>/math", adapter_name="math")' in first["card"]
    # pad_rank_to=16: one rank-16 adapter at the root with the same scale (6 / 12 = 8 / 16), the same logits
    assert (first["only_math_config"]["r"], first["only_math_config"]["lora_alpha"]) == (16, 8)
    assert sorted(p.name for p in (tmp_path / "only_math").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # the training hook writes the same tree, published at once
    hooked = tmp_path / "iter_0000005" / "hf_adapter"
    for sub in ("", "math"):
        ours, reference = (
            load_file(hooked / sub / "adapter_model.safetensors"),
            load_file(adapters / sub / "adapter_model.safetensors"),
        )
        assert ours.keys() == reference.keys() and all((ours[k] == reference[k]).all() for k in ours)
    # a disabled adapter is skipped with a warning; unknown or no names: the same error on every rank
    assert sorted(p.name for p in (tmp_path / "all_but_math").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert any("not exporting disabled adapter(s) math" in m for m in first["logs"])
    assert any("[rank-size] rank 12" in m for m in first["logs"]), (
        "the export-time serving check names the rank-12 adapter"
    )
    assert results[1] == first["errors"] and len(first["errors"]) == 2
    assert "no adapter named 'nope'; the model has adapters ['default', 'math']" in first["errors"][0]
    assert "expected at least one name" in first["errors"][1]
    assert not [p.name for p in tmp_path.rglob(".*")], "no staging leftovers"


def test_the_hook_takes_adapter_names_and_pad_rank_to_from_yaml_and_megatron_lm_flags(tmp_path):
    import argparse

    from megatron_peft_export import ExportError
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.integrations import megatron_lm

    config = tmp_path / "train.yaml"
    config.write_text("export_hf_adapter:\n  adapter_names: [default, math]\n  pad_rank_to: 16\n")
    assert (HookConfig.from_yaml(config).adapter_names, HookConfig.from_yaml(config).pad_rank_to) == (
        ["default", "math"],
        16,
    )
    for bad, message in (
        ("adapter_names: math", "expected 'all' or a list"),
        ("adapter_names: []", "at least one name"),
        ("pad_rank_to: 0", "expected a rank >= 1"),
    ):
        config.write_text(f"export_hf_adapter:\n  {bad}\n")
        with pytest.raises(ExportError, match=message):
            HookConfig.from_yaml(config)
    parser = megatron_lm.add_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--export-hf-adapter", "--hf-adapter-names", "default, math", "--hf-adapter-pad-rank-to", "16"]
    )
    assert (megatron_lm.config_from_args(args).adapter_names, megatron_lm.config_from_args(args).pad_rank_to) == (
        ["default", "math"],
        16,
    )
    assert megatron_lm.config_from_args(parser.parse_args(["--hf-adapter-names", "all"])).adapter_names == "all"
