"""ModelOpt LoRA on real megatron-core models in real gloo processes: export, load with peft, match logits."""

import dataclasses
import json
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _export_and_compare(
    rank, world, tmp, *, tp=1, pp=1, vpp=None, sp=False, lora=None, cfg_changes=None, export_kwargs=None
):
    """Build, add and randomize ModelOpt LoRA, export; rank 0 checks the adapter with peft against Megatron."""
    from megatron_peft_export import export_adapter
    from tests.support.tiny_gpt import (
        TinyGPTConfig,
        apply_modelopt_lora,
        build_gpt,
        compare_peft,
        fill_lora_random,
        hf_llama_twin,
        init_parallel,
        megatron_logits,
        sample_tokens,
    )

    cfg = dataclasses.replace(TinyGPTConfig(), **(cfg_changes or {}))
    init_parallel(tp, pp, vpp)
    model = apply_modelopt_lora(build_gpt(cfg, sequence_parallel=sp), **(lora or {}))
    fill_lora_random(model, seed=7)
    tokens = sample_tokens(cfg)
    logits = megatron_logits(model, tokens)
    base_dir = Path(tmp) / "base"
    if rank == 0:
        hf_llama_twin(cfg).config.save_pretrained(base_dir)
    out = export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(base_dir), **(export_kwargs or {}))
    if rank != 0:
        return out
    diff = compare_peft(out, cfg, tokens, logits)
    return {
        "path": str(out),
        "diff": diff,
        "config": json.loads((out / "adapter_config.json").read_text()),
        "files": sorted(p.name for p in Path(tmp).iterdir()),
    }


@pytest.mark.family("llama", path="export", layout="ModelOpt TP1, TP2, PP2, TP2xPP2, VPP2, DP2, TP2 SP", check="logits")
@pytest.mark.parametrize(
    "world,layout",
    [
        (1, {}),
        (2, {"tp": 2}),
        (2, {"pp": 2}),
        (4, {"tp": 2, "pp": 2}),
        (2, {"pp": 2, "vpp": 2}),
        (2, {}),  # DP2: the replica on rank 1 sends nothing and writes nothing
        (2, {"tp": 2, "sp": True}),
    ],
    ids=["tp1", "tp2", "pp2", "tp2xpp2", "vpp2", "dp2", "tp2-sp"],
)
def test_modelopt_export_matches_megatron_logits(tmp_path, world, layout):
    results = run_ranks(_export_and_compare, world, str(tmp_path), **layout)
    first = results[0]
    assert first["diff"] <= 1e-5
    assert results[1:] == [None] * (world - 1)
    assert first["files"] == ["adapter", "base"]  # no staging leftovers
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = first["config"]
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (8, 16, False)
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_partial_targets_rank_pattern_and_lm_head(tmp_path):
    lora = {
        "targets": ("*linear_qkv*",),
        "extra_patterns": {"*layers.1.*linear_fc1*": {"rank": 4, "scale": 0.5}, "*output_layer*": {"rank": 2}},
    }
    results = run_ranks(_export_and_compare, 2, str(tmp_path), tp=2, lora=lora)
    config = results[0]["config"]
    assert config["target_modules"] == [
        "k_proj",
        "lm_head",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "q_proj",
        "v_proj",
    ]
    assert config["rank_pattern"] == {"lm_head": 2, "model.layers.1.mlp.gate_proj": 4, "model.layers.1.mlp.up_proj": 4}
    assert config["alpha_pattern"] == {"lm_head": 4, "model.layers.1.mlp.gate_proj": 2, "model.layers.1.mlp.up_proj": 2}


def test_bfloat16_output_dtype(tmp_path):
    from safetensors import safe_open

    def run(rank, world, tmp):
        from megatron_peft_export import export_adapter
        from tests.support.tiny_gpt import (
            TinyGPTConfig,
            apply_modelopt_lora,
            build_gpt,
            fill_lora_random,
            init_parallel,
        )

        init_parallel(2)
        model = apply_modelopt_lora(build_gpt(TinyGPTConfig()))
        fill_lora_random(model, seed=1)
        return str(export_adapter(model, Path(tmp) / "a", dtype="bfloat16"))

    path = run_ranks(run, 2, str(tmp_path))[0]
    with safe_open(Path(path) / "adapter_model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
