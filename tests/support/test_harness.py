"""The harness proves itself: Megatron on CPU equals its HF twin at every layout.

If these fail, parity failures elsewhere say nothing about the exporter. All
torch work runs in forked ranks; the parent only compares Python floats.
"""

import time

import pytest

from tests.support import tiny_gpt as tg
from tests.support.multiprocess import run_ranks

CFG = tg.TinyGPTConfig()
ATOL = 1e-5


def _base_vs_hf(rank, world_size, tp, pp, vpp, sp):
    tg.init_parallel(tp=tp, pp=pp, vpp=vpp)
    model = tg.build_gpt(CFG, sequence_parallel=sp)
    tokens = tg.sample_tokens(CFG)
    logits = tg.megatron_logits(model, tokens)
    if rank != 0:
        return None
    ref = tg.hf_logits(tg.hf_llama_twin(CFG), tokens)
    return (logits - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "world,tp,pp,vpp,sp",
    [
        (1, 1, 1, None, False),
        (2, 2, 1, None, False),
        (2, 2, 1, None, True),
        (2, 1, 2, None, False),
        (4, 2, 2, None, False),
        (2, 1, 2, 2, False),
        (2, 1, 1, None, False),
    ],
    ids=["tp1", "tp2", "tp2-sp", "pp2", "tp2xpp2", "pp2-vpp2", "dp2"],
)
def test_base_model_matches_hf_twin(world, tp, pp, vpp, sp):
    start = time.perf_counter()
    diff, scale = run_ranks(_base_vs_hf, world, tp, pp, vpp, sp)[0]
    print(f"max|diff|={diff:.2e} max|logit|={scale:.2f} in {time.perf_counter() - start:.2f}s")
    assert scale > 0.5, "logits too small for the comparison to mean anything"
    assert diff <= ATOL


def _lora_across_layouts(rank, world_size):
    tokens = tg.sample_tokens(CFG)
    logits = {}
    for name, tp, pp, vpp, sp in [
        ("tp1", 1, 1, None, False),
        ("tp2", 2, 1, None, False),
        ("tp2-sp", 2, 1, None, True),
        ("pp2-vpp2", 1, 2, 2, False),
    ]:
        tg.init_parallel(tp=tp, pp=pp, vpp=vpp)
        model = tg.build_gpt(CFG, sequence_parallel=sp)
        if name == "tp1":
            logits["no-lora"] = tg.megatron_logits(model, tokens)
        tg.apply_modelopt_lora(model, rank=8, scale=2.0)
        tg.fill_lora_random(model, seed=7)
        logits[name] = tg.megatron_logits(model, tokens)
    return {name: (x - logits["tp1"]).abs().max().item() for name, x in logits.items()}


@pytest.mark.timeout(300)
def test_modelopt_lora_is_layout_independent():
    diffs = run_ranks(_lora_across_layouts, 2)[0]
    print(diffs)
    assert diffs["no-lora"] > 1e-2, "random LoRA did not change the logits"
    for layout in ("tp2", "tp2-sp", "pp2-vpp2"):
        assert diffs[layout] <= ATOL, (layout, diffs)


def _peft_roundtrip(rank, world_size, tmp_path):
    """compare_peft on an adapter peft itself wrote, then on a corrupted copy."""
    import peft
    import torch
    from safetensors.torch import load_file, save_file

    tokens = tg.sample_tokens(CFG)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(tg.hf_llama_twin(CFG), config)
    good = tmp_path / "good"
    model.save_pretrained(good)
    diff = tg.compare_peft(good, CFG, tokens, tg.hf_logits(model, tokens), atol=0.0)

    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, bad / "adapter_model.safetensors")
    try:
        tg.compare_peft(bad, CFG, tokens, tg.hf_logits(model, tokens))
    except AssertionError as e:
        return diff, str(e)
    return diff, None


@pytest.mark.timeout(300)
def test_compare_peft_catches_ignored_keys(tmp_path):
    diff, error = run_ranks(_peft_roundtrip, 1, tmp_path)[0]
    assert diff == 0.0
    assert error is not None and "qkv_proj.lora_A.weight" in error


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    time.sleep(60)  # a rank stuck after its peer failed must be killed, not awaited


def _sleep_on_rank_zero(rank, world_size):
    if rank == 0:
        time.sleep(60)
    return rank


@pytest.mark.timeout(60)
def test_run_ranks_reports_results_errors_and_timeouts():
    assert run_ranks(lambda rank, world, x: (rank, world, x), 2, "a") == [(0, 2, "a"), (1, 2, "a")]
    start = time.perf_counter()
    with pytest.raises(AssertionError, match="boom from rank one"):
        run_ranks(_fail_on_rank_one, 2)
    assert time.perf_counter() - start < 10
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        run_ranks(_sleep_on_rank_zero, 2, timeout=3)
    assert time.perf_counter() - start < 10
