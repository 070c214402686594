"""Adapters of successive checkpoints hot-swap into one loaded model (peft.utils.hotswap) and give each iteration's
logits."""

import json
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _train_then_hotswap(rank, world, save):
    import peft
    import torch
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
    from safetensors.torch import load_file

    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from tests.support.tiny_gpt import hf_llama_twin, hf_logits, megatron_logits, sample_tokens
    from tests.support.training import TrainConfig, run_training

    tc = TrainConfig(tp=world, lora_rank=8)
    tokens = sample_tokens(tc.model)
    hook = AdapterExportHook(HookConfig(pad_rank_to=16, max_pending=3))
    reference = {}

    def on_save(iteration, path, model):
        hook.on_checkpoint_saved(iteration, path, model)
        reference[iteration] = megatron_logits(model.module, tokens)

    run_training(tc, steps=3, save_interval=1, save_dir=save, on_save=on_save, log=None)
    hook.finalize()
    if rank != 0:
        return None
    adapters = {i: Path(save) / f"iter_{i:07d}" / "hf_adapter" for i in (1, 2, 3)}
    model = peft.PeftModel.from_pretrained(hf_llama_twin(tc.model), str(adapters[1])).eval()
    prepare_model_for_compiled_hotswap(model)  # scalings become tensors, as before torch.compile
    held = {name: p for name, p in model.named_parameters() if "lora_" in name}
    diffs, moved = {1: (hf_logits(model, tokens) - reference[1]).abs().max().item()}, {}
    for i in (2, 3):
        hotswap_adapter(model, str(adapters[i]), adapter_name="default", torch_device="cpu")
        diffs[i] = (hf_logits(model, tokens) - reference[i]).abs().max().item()
        moved[i] = (reference[i] - reference[i - 1]).abs().max().item()
    now = {name: p for name, p in model.named_parameters() if "lora_" in name}
    files = [load_file(adapters[i] / "adapter_model.safetensors") for i in (1, 2, 3)]
    return {
        "diffs": diffs,
        "moved": moved,
        "same_parameters": now.keys() == held.keys() and all(now[k] is held[k] for k in held),
        "swapped_in": all(
            torch.equal(now[k.removesuffix(".weight") + ".default.weight"], v) for k, v in files[2].items()
        ),
        "keys": [sorted(f) for f in files],
        "configs": [json.loads((adapters[i] / "adapter_config.json").read_text()) for i in (1, 2, 3)],
        "ranks": sorted({tuple(t.shape)[0] for k, t in files[0].items() if "lora_A" in k}),
    }


def test_iteration_2_and_3_hot_swap_into_a_model_loaded_with_iteration_1(tmp_path):
    result = run_ranks(_train_then_hotswap, 2, str(tmp_path))[0]
    assert max(result["diffs"].values()) <= 1e-5, result["diffs"]
    assert min(result["moved"].values()) > 1e-3, (
        "training must change the logits between checkpoints, or the test proves nothing"
    )
    assert result["same_parameters"] and result["swapped_in"], "the swap copies into the loaded parameters (no reload)"
    assert result["keys"][0] == result["keys"][1] == result["keys"][2]
    assert result["configs"][0] == result["configs"][1] == result["configs"][2]
    config = result["configs"][0]
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (16, 32, {}) and result["ranks"] == [
        16
    ]  # rank 8, scale 2, padded
