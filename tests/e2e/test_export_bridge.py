"""Megatron-Bridge's own LoRA, CanonicalLoRA and DoRA (tests/support/real_bridge.py) on the tiny megatron-core GPT:
export, load with peft on the HF twin, match the Megatron logits at TP1/TP2 x PP1/PP2; the DoRA layouts whose Bridge
math no peft adapter computes are refused, named, on every rank, with nothing written."""

import json
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("real_bridge")]
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
ROW_PARALLEL = ("linear_proj", "linear_fc2")


def _model(cfg, variant, tp, pp, targets=None, sequence_parallel=False, seed=13, vpp=None):
    from tests.support import real_bridge
    from tests.support.tiny_gpt import build_gpt, fill_lora_random, init_parallel

    init_parallel(tp=tp, pp=pp, vpp=vpp)
    model = real_bridge.apply(
        build_gpt(cfg, sequence_parallel=sequence_parallel), variant, dim=8, alpha=16, target_modules=targets
    )
    fill_lora_random(model, seed=seed)
    return model


def _export(rank, world, tmp, variant, tp, pp, targets=None, sequence_parallel=False, refused=False, vpp=None):
    import torch.distributed as dist

    from megatron_peft_export import ExportError, export_adapter
    from tests.support.tiny_gpt import TinyGPTConfig, compare_peft, hf_llama_twin, megatron_logits, sample_tokens

    cfg = TinyGPTConfig()
    model = _model(cfg, variant, tp, pp, targets, sequence_parallel, vpp=vpp)
    base = Path(tmp) / "base"
    if rank == 0:
        hf_llama_twin(cfg).config.save_pretrained(base)
    dist.barrier()
    if refused:
        try:
            export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(base))
        except ExportError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "exported"
    tokens = sample_tokens(cfg)
    logits = megatron_logits(model, tokens)
    out = export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(base))
    if rank != 0:
        return None
    return {
        "diff": compare_peft(out, cfg, tokens, logits),
        "config": json.loads((out / "adapter_config.json").read_text()),
    }


ALL = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
LAYOUTS = [(1, 1, False), (2, 1, False), (1, 2, False), (2, 2, False), (2, 1, True)]


@pytest.mark.family(
    "llama", path="export", layout="Bridge LoRA, CanonicalLoRA, DoRA at TP1, TP2, PP2, TP2xPP2, TP2 SP", check="logits"
)
@pytest.mark.parametrize("tp,pp,sp", LAYOUTS, ids=["tp1", "tp2", "pp2", "tp2xpp2", "tp2-sp"])
@pytest.mark.parametrize("variant", ["lora", "canonical", "dora"])
def test_bridge_export_matches_megatron_logits(tmp_path, variant, tp, pp, sp):
    """DoRA at TP > 1 on column-parallel linears only (on row-parallel ones it is refused, below)."""
    targets = COLUMN_PARALLEL if variant == "dora" and tp > 1 else None
    result = run_ranks(_export, tp * pp, str(tmp_path), variant, tp, pp, targets, sp)[0]
    print(f"max|diff| {result['diff']:.2e}")
    assert result["diff"] <= 1e-5
    config = result["config"]
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (8, 16, variant == "dora")
    assert config["target_modules"] == (["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"] if targets else ALL)


def test_virtual_pipeline_chunks(tmp_path):
    """PP2 with 2 virtual chunks per stage: Bridge walks each chunk on its own (chunk-local layer names)."""
    result = run_ranks(_export, 2, str(tmp_path), "lora", 1, 2, vpp=2)[0]
    assert result["diff"] <= 1e-5 and result["config"]["target_modules"] == ALL


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2", "tp2xpp2"])
def test_dora_on_row_parallel_linears_at_tp2_is_refused_naming_every_layer(tmp_path, tp, pp):
    """Under PP each rank holds two of the four layers; the error names all of them, the same on every rank."""
    results = run_ranks(_export, tp * pp, str(tmp_path), "dora", tp, pp, refused=True)
    assert len(set(results)) == 1, results
    message = results[0]
    assert message.startswith(
        "DialectError: found Megatron-Bridge DoRA on row-parallel linears at tensor-parallel size 2: "
        "decoder.layers.{0..3}.mlp.linear_fc2, decoder.layers.{0..3}.self_attention.linear_proj. "
    ), message
    assert (
        "norm of this TP rank's own input columns" in message
        and "expected DoRA only on column-parallel linears" in message
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no adapter, no staging directory


def _logits(rank, world, variant, tp, targets):
    from tests.support.tiny_gpt import TinyGPTConfig, megatron_logits, sample_tokens

    cfg = TinyGPTConfig()
    return megatron_logits(_model(cfg, variant, tp, 1, targets), sample_tokens(cfg))


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_why_bridge_dora_on_row_parallel_linears_is_refused(variant):
    """Same global weights and adapters (row-parallel targets: every adapter tensor, the magnitude too, fills the same
    at TP1 and
    TP2): Bridge's LoRA at TP2 is the TP1 function; its DoRA is not, because each rank normalizes by its own columns'
    norm."""
    one, two = run_ranks(_logits, 1, variant, 1, ROW_PARALLEL)[0], run_ranks(_logits, 2, variant, 2, ROW_PARALLEL)[0]
    diff = (one - two).abs().max().item()
    print(f"{variant} TP1 vs TP2 max|diff| {diff:.2e}")
    assert diff > 1e-2 if variant == "dora" else diff <= 1e-5


def _outcome(model, tmp):
    """What export_adapter does with `model` on this rank: 'exported', or the error's type and message."""
    from megatron_peft_export import ExportError, export_adapter

    try:
        export_adapter(model, Path(tmp) / "adapter")
    except ExportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "exported"


def _qkv_bias_model(rank, world, tmp):
    """Qwen2-style attention: linear_qkv adds its bias inside its output (skip_bias_add=False); DoRA on it is
    refused."""
    from tests.support import real_bridge
    from tests.support.tiny_gpt import (
        TinyGPTConfig,
        _build_loaded,
        _seeded,
        global_base_weights,
        init_parallel,
        transformer_config,
    )

    cfg = TinyGPTConfig()
    init_parallel(tp=world)
    weights = global_base_weights(cfg)
    rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels
    weights |= {
        f"decoder.layers.{i}.self_attention.linear_qkv.bias": _seeded(f"bias{i}", (rows,), 0.1)
        for i in range(cfg.num_layers)
    }
    model = real_bridge.apply(
        _build_loaded(cfg, transformer_config(cfg, add_qkv_bias=True), weights), "dora", target_modules=("linear_qkv",)
    )
    return _outcome(model, tmp)


def test_dora_on_a_linear_with_its_bias_inside_the_output_is_refused(tmp_path):
    results = run_ranks(_qkv_bias_model, 1, str(tmp_path))
    assert results[0].startswith(
        "DialectError: found Megatron-Bridge DoRA on linears that add their bias inside their output: "
        "decoder.layers.{0..3}.self_attention.linear_qkv. "
    ), results[0]
    assert not (tmp_path / "adapter").exists()


def _dora_vs_peft(rank, world):
    """Bridge's DoRALinear on a megatron linear against peft's DoRA on the equal nn.Linear, same A, B, magnitude."""
    import peft
    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from torch import nn

    from tests.support import real_bridge
    from tests.support.tiny_gpt import TinyGPTConfig, init_parallel, transformer_config

    init_parallel(tp=1)
    config = transformer_config(TinyGPTConfig())
    holder = nn.Module()  # qkv-like: bias added inside the output; proj-like: no bias
    holder.linear_qkv = ColumnParallelLinear(
        64, 40, config=config, init_method=nn.init.normal_, bias=True, gather_output=False
    )
    holder.linear_proj = RowParallelLinear(
        64, 48, config=config, init_method=nn.init.normal_, bias=False, input_is_parallel=True, skip_bias_add=True
    )
    with torch.no_grad():
        holder.linear_qkv.bias.normal_()
    real_bridge.apply(holder, "dora", target_modules=("linear_qkv", "linear_proj"))
    twin = nn.Module()
    twin.q, twin.p = nn.Linear(64, 40, bias=True), nn.Linear(64, 48, bias=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("linear_qkv", "linear_proj"):
            adapter = getattr(holder, name).adapter
            for p in (adapter.linear_in.weight, adapter.linear_out.weight):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            adapter.weight_magnitude.mul_(1 + 0.2 * torch.randn(adapter.weight_magnitude.shape, generator=gen))
        twin.q.weight.copy_(holder.linear_qkv.to_wrap.weight)
        twin.q.bias.copy_(holder.linear_qkv.to_wrap.bias)
        twin.p.weight.copy_(holder.linear_proj.to_wrap.weight)
    twin = peft.get_peft_model(
        twin, peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q", "p"])
    ).base_model.model
    with torch.no_grad():
        for ours, theirs in (("linear_qkv", twin.q), ("linear_proj", twin.p)):
            adapter = getattr(holder, ours).adapter
            theirs.lora_A["default"].weight.copy_(adapter.linear_in.weight)
            theirs.lora_B["default"].weight.copy_(adapter.linear_out.weight)
            theirs.lora_magnitude_vector["default"].weight.copy_(adapter.weight_magnitude)
    holder.eval()
    twin.eval()
    x = torch.randn(5, 2, 64, generator=gen)
    with torch.no_grad():
        proj, _ = holder.linear_proj(x)
        qkv, _ = holder.linear_qkv(x)
        wrapper = holder.linear_qkv
        scale = wrapper.adapter.weight_magnitude / wrapper._get_weight_norm()
        return {
            "proj": (proj - twin.p(x)).abs().max().item(),
            "qkv": (qkv - twin.q(x)).abs().max().item(),
            "qkv_but_the_bias_term": (qkv - twin.q(x) - (scale - 1) * wrapper.to_wrap.bias).abs().max().item(),
        }


def test_why_bridge_dora_with_a_bias_inside_the_output_is_refused():
    result = run_ranks(_dora_vs_peft, 1)[0]
    print(result)
    assert result["proj"] <= 1e-5  # without a bias, Bridge's DoRA is peft's
    assert (
        result["qkv"] > 1e-3 and result["qkv_but_the_bias_term"] <= 1e-5
    )  # with one, they differ by exactly (m/||W+sBA|| - 1) * bias


def _mixed(rank, world, tmp):
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora

    model = apply_modelopt_lora(_model(TinyGPTConfig(), "lora", world, 1), targets=("*output_layer*",))
    return _outcome(model, tmp)


def test_mixed_dialects_are_an_error_on_every_rank(tmp_path):
    results = run_ranks(_mixed, 2, str(tmp_path))
    assert results[0] == results[1]
    assert results[0].startswith("DialectError: found adapters of several dialects (megatron-bridge, modelopt)"), (
        results[0]
    )
    assert not (tmp_path / "adapter").exists()
