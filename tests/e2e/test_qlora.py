"""QLoRA-style: ModelOpt LoRA on ModelOpt-quantized (INT8, fake-quant on CPU) parallel linears exports like any
other."""

from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _qlora(rank, world, tmp):
    import modelopt.torch.quantization as mtq
    import peft

    from megatron_peft_export import export_adapter
    from tests.support.tiny_gpt import (
        TinyGPTConfig,
        apply_modelopt_lora,
        build_gpt,
        compare_peft,
        fill_lora_random,
        hf_llama_twin,
        hf_logits,
        init_parallel,
        megatron_logits,
        sample_tokens,
    )

    cfg = TinyGPTConfig()
    init_parallel(world)
    tokens, calibration = sample_tokens(cfg), sample_tokens(cfg, seed=1)
    model = mtq.quantize(build_gpt(cfg), mtq.INT8_DEFAULT_CFG, lambda m: megatron_logits(m, calibration))
    model = apply_modelopt_lora(
        model
    )  # LoRA over the quantized linears (ModelOpt's LoRA + Quant parallel linear classes)
    fill_lora_random(model, seed=3)
    quantized = megatron_logits(model, tokens)
    out = export_adapter(model, Path(tmp) / "adapter")
    mtq.disable_quantizer(model, "*")
    unquantized = megatron_logits(model, tokens)
    if rank != 0:
        return None
    result = {
        "classes": sorted(
            {type(m).__name__ for n, m in model.named_modules() if n.endswith(("linear_qkv", "linear_fc2"))}
        ),
        "card": (out / "README.md").read_text(),
        "quantization_effect": (quantized - unquantized).abs().max().item(),
        # the adapter itself: the unquantized HF base + the adapter against the Megatron model with its quantizers off
        "unquantized_diff": compare_peft(out, cfg, tokens, unquantized),
    }
    # the QLoRA model: the HF base quantized the same way (ModelOpt INT8, same calibration) + the adapter
    base = mtq.quantize(hf_llama_twin(cfg), mtq.INT8_DEFAULT_CFG, lambda m: hf_logits(m, calibration))
    served = peft.PeftModel.from_pretrained(base, str(out)).eval()
    result["quantized_diff"] = (hf_logits(served, tokens) - quantized).abs().max().item()
    return result


@pytest.mark.parametrize("world", [1, 2], ids=["tp1", "tp2"])
def test_lora_over_a_modelopt_quantized_base_exports_and_the_card_records_the_quantization(tmp_path, world):
    result = run_ranks(_qlora, world, str(tmp_path))[0]
    assert all("Quant" in c and "LoRA" in c for c in result["classes"]), result["classes"]
    assert result["quantization_effect"] > 1e-2, "the base must really be quantized"
    assert result["unquantized_diff"] <= 1e-5
    # TP1: bit-for-bit the same computation. TP2: row-parallel partial sums round differently before the next
    # layer's INT8 input quantizer, so a few activations land one quantization step apart.
    assert result["quantized_diff"] <= (1e-5 if world == 1 else 0.1), result["quantized_diff"]
    assert (
        "| base quantization | ModelOpt fake quantization: weights int8 per-channel, activations int8 per-tensor |"
        in result["card"]
    )
