"""Megatron-Bridge LoRA, CanonicalLoRA and DoRA (test-support modules with Bridge's names, sharding and math):
export, load with peft, match the Megatron logits."""

import json
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _bridge_export(rank, world, tmp, variant, mix_modelopt=False):
    from megatron_peft_export import ExportError, export_adapter
    from tests.support.bridge_lora import apply_bridge_lora
    from tests.support.tiny_gpt import (TinyGPTConfig, apply_modelopt_lora, build_gpt, compare_peft, fill_lora_random,
                                        hf_llama_twin, init_parallel, megatron_logits, sample_tokens)

    cfg = TinyGPTConfig()
    init_parallel(tp=world)
    model = apply_bridge_lora(build_gpt(cfg), variant=variant, dim=8, alpha=16)
    if mix_modelopt:
        apply_modelopt_lora(model, targets=("*output_layer*",))
        try:
            export_adapter(model, Path(tmp) / "adapter")
        except ExportError as exc:
            return f"{type(exc).__name__}: {exc}"
    fill_lora_random(model, seed=13)
    tokens = sample_tokens(cfg)
    logits = megatron_logits(model, tokens)
    base = Path(tmp) / "base"
    if rank == 0:
        hf_llama_twin(cfg).config.save_pretrained(base)
    out = export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(base))
    if rank != 0:
        return None
    return {"diff": compare_peft(out, cfg, tokens, logits), "config": json.loads((out / "adapter_config.json").read_text())}


@pytest.mark.parametrize("world", [1, 2], ids=["tp1", "tp2"])
@pytest.mark.parametrize("variant", ["lora", "canonical", "dora"])
def test_bridge_export_matches_megatron_logits(tmp_path, variant, world):
    result = run_ranks(_bridge_export, world, str(tmp_path), variant)[0]
    assert result["diff"] <= 1e-5
    config = result["config"]
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (8, 16, variant == "dora")
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_mixed_dialects_are_an_error_on_every_rank(tmp_path):
    results = run_ranks(_bridge_export, 2, str(tmp_path), "lora", True)
    assert results[0] == results[1]
    assert results[0].startswith("DialectError: found adapters of several dialects (megatron-bridge, modelopt)")
    assert not (tmp_path / "adapter").exists()
