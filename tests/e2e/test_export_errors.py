"""Bad input raises the same clear error on every rank (none is left waiting in a collective) and writes nothing."""

import json
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _try_export(rank, world, tmp, *, lora=True, base_changes=None, output="adapter", per_rank_model=None, **kwargs):
    from megatron_peft_export import ExportError, export_adapter
    from tests.support.tiny_gpt import (
        TinyGPTConfig,
        apply_modelopt_lora,
        build_gpt,
        fill_lora_random,
        hf_llama_twin,
        init_parallel,
    )

    cfg = TinyGPTConfig()
    init_parallel(tp=world)
    model = build_gpt(cfg)
    if lora:
        apply_modelopt_lora(model, adapter_name="sft")
        fill_lora_random(model, seed=3)
    if base_changes is not None and rank == 0:
        base = Path(tmp) / "base"
        hf_llama_twin(cfg).config.save_pretrained(base)
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, **base_changes}))
        kwargs["base_model_name_or_path"] = str(base)
    if per_rank_model and rank in per_rank_model:
        model = per_rank_model[rank]
    try:
        return ("ok", str(export_adapter(model, Path(tmp) / output, **{"adapter_name": "sft", **kwargs})))
    except ExportError as exc:
        return (type(exc).__name__, str(exc))


def _assert_everywhere(results, error, *fragments):
    assert {r[0] for r in results} == {error}, results
    assert len({r[1] for r in results}) == 1, "ranks disagree on the message"
    for fragment in fragments:
        assert fragment in results[0][1]


def _written(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "base")


def test_no_adapters(tmp_path):
    results = run_ranks(_try_export, 2, str(tmp_path), lora=False)
    _assert_everywhere(results, "NoAdaptersError", "no adapter tensors found", "Apply the adapter")
    assert _written(tmp_path) == []


def test_unknown_adapter_name_lists_the_ones_present(tmp_path):
    results = run_ranks(_try_export, 2, str(tmp_path), adapter_name="default")
    _assert_everywhere(results, "NoAdaptersError", "no adapter named 'default'", "['sft']")


def test_hf_config_that_contradicts_the_model(tmp_path):
    results = run_ranks(
        _try_export, 2, str(tmp_path), base_changes={"num_key_value_heads": 8, "intermediate_size": 100}
    )
    _assert_everywhere(
        results,
        "ShapeMismatchError",
        "num_query_groups: Megatron model has 4, the base model's config.json has 8",
        "ffn_hidden_size: Megatron model has 96",
    )
    assert _written(tmp_path) == []


def test_unsupported_model_type_names_it(tmp_path):
    results = run_ranks(_try_export, 2, str(tmp_path), model_type="gpt2")
    _assert_everywhere(
        results,
        "UnsupportedModelError",
        "'gpt2'",
        "deepseek_v3, glm4_moe, gpt_oss, kimi_k2, llama, mistral, mixtral, nemotron, nemotron_h, olmoe, qwen2, "
        "qwen2_moe, qwen3, qwen3_moe, qwen3_next",
    )


def test_existing_output_is_kept_unless_overwrite_and_a_directory_not_ours_always(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # not an adapter directory this tool published: never replaced
        results = run_ranks(_try_export, 2, str(tmp_path), overwrite=overwrite)
        _assert_everywhere(
            results,
            "OutputError",
            "already exists and is a directory without the model card",
            "--overwrite (overwrite=True) replaces only",
        )
        assert (tmp_path / "adapter" / "keep.txt").read_text() == "mine"
    (tmp_path / "adapter" / "keep.txt").unlink()
    (tmp_path / "adapter").rmdir()
    assert run_ranks(_try_export, 2, str(tmp_path))[0][0] == "ok"
    _assert_everywhere(run_ranks(_try_export, 2, str(tmp_path)), "OutputError", "already exists", "overwrite")
    assert run_ranks(_try_export, 2, str(tmp_path), overwrite=True)[0][0] == "ok"
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert _written(tmp_path) == ["adapter"]


def test_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    results = run_ranks(_try_export, 2, str(tmp_path), output="file/adapter")
    _assert_everywhere(results, "OutputError", "cannot write the adapter", "expected a writable directory")
    assert _written(tmp_path) == ["file"]


def test_one_bad_rank_fails_all_ranks(tmp_path):
    import torch

    results = run_ranks(_try_export, 2, str(tmp_path), per_rank_model={1: torch.nn.Linear(2, 2)})
    _assert_everywhere(results, "ExportError", "rank 1: expected a megatron-core model", "Linear")
