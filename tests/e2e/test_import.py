"""HF adapter -> Megatron: round trips across layouts, and clear errors on every rank."""

import json
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _export_at(rank, world, tmp, tp, pp, variant="modelopt"):
    from megatron_peft_export import export_adapter
    from tests.support.tiny_gpt import TinyGPTConfig, build_gpt, fill_lora_random, init_parallel, megatron_logits, sample_tokens

    cfg = TinyGPTConfig()
    init_parallel(tp, pp)
    model = _with_adapter(build_gpt(cfg), variant)
    fill_lora_random(model, seed=21)
    export_adapter(model, Path(tmp) / "original")
    return megatron_logits(model, sample_tokens(cfg))


def _with_adapter(model, variant):
    from tests.support.bridge_lora import apply_bridge_lora
    from tests.support.tiny_gpt import apply_modelopt_lora

    return apply_modelopt_lora(model) if variant == "modelopt" else apply_bridge_lora(model, variant=variant, dim=8, alpha=16)


def _import_at(rank, world, tmp, tp, pp, variant="modelopt", source="original"):
    from megatron_peft_export import export_adapter, load_hf_adapter
    from tests.support.tiny_gpt import TinyGPTConfig, build_gpt, fill_lora_random, init_parallel, megatron_logits, sample_tokens

    cfg = TinyGPTConfig()
    init_parallel(tp, pp)
    model = _with_adapter(build_gpt(cfg), variant)
    fill_lora_random(model, seed=99)  # different values: the import must overwrite every one
    load_hf_adapter(model, Path(tmp) / source)
    export_adapter(model, Path(tmp) / f"again_tp{tp}_pp{pp}")
    return megatron_logits(model, sample_tokens(cfg))


def _same_files(a: Path, b: Path):
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and (x[k] == y[k]).all() for k in x)
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())


@pytest.mark.parametrize("variant", ["modelopt", "lora", "dora"])
def test_round_trip_tp2_to_tp1_and_pp2(tmp_path, variant):
    import torch

    original = run_ranks(_export_at, 2, str(tmp_path), 2, 1, variant)[0]
    for tp, pp in ((1, 1), (1, 2)):
        logits = run_ranks(_import_at, tp * pp, str(tmp_path), tp, pp, variant)[0]
        _same_files(tmp_path / "original", tmp_path / f"again_tp{tp}_pp{pp}")
        assert torch.allclose(logits, original, atol=1e-5, rtol=0), (logits - original).abs().max()


def _import_error(rank, world, tmp, edit):
    from megatron_peft_export import ExportError, load_hf_adapter
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, init_parallel

    init_parallel(world)
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()), rank=4 if edit == "rank" else 8)
    try:
        load_hf_adapter(model, Path(tmp) / "original")
        return "ok"
    except ExportError as exc:
        return f"{type(exc).__name__}: {exc}"


def _edit_adapter(directory: Path, edit: str):
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "adapter_model.safetensors")
    if edit == "unfused_a":
        key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
        tensors[key] = tensors[key] + 1
    if edit == "missing":
        del tensors["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"]
    save_file(tensors, directory / "adapter_model.safetensors")
    if edit == "alpha":
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 32}))


@pytest.mark.parametrize("edit,message", [
    ("rank", "the model expects shape (4, 64), the file has (8, 64)"),
    ("missing", "needs 1 tensor(s) the file lacks"),
    ("alpha", "the adapter scales by 4, the model's adapter by 2"),
    ("unfused_a", "k_proj.lora_A.weight and base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight differ"),
])
def test_mismatches_fail_on_every_rank(tmp_path, edit, message):
    run_ranks(_export_at, 2, str(tmp_path), 2, 1)
    _edit_adapter(tmp_path / "original", edit)
    results = run_ranks(_import_error, 2, str(tmp_path), edit)
    assert results[0] == results[1]
    assert message in results[0], results[0]
