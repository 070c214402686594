"""Qwen3-Next (gated delta-net and gated attention layers): export live, offline and import back, by weight deltas.

For every HF module, peft's merged weight minus the base weight equals the Megatron adapter's effective delta
(scale * B @ A of each TP rank, put together by megatron's layout in tests/support/tiny_qwen3_next.py), exactly."""

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.support import hybrid_family as hfam
from tests.support import tiny_qwen3_next as tn
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _live_export(rank, world, tmp, hf=None):
    hf = dataclasses.replace(tn.TinyNextConfig(), **hf) if hf else None
    return hfam.live_export(rank, world, tmp, "qwen3_next", tn.TinyNextConfig(), tn.LORA_TARGETS, tp=world, hf=hf)


def _assert_deltas_equal(tmp: Path, expected: dict[str, torch.Tensor]) -> None:
    # two delta-net layers (qkvz, ba, out), two attention (q, k, v, o)
    hfam.assert_deltas_equal("qwen3_next", tmp, expected, 2 * 3 + 2 * 4)


@pytest.mark.parametrize(
    "tp",
    [
        pytest.param(1, id="TP1", marks=pytest.mark.family("qwen3_next", path="export", layout="TP1", check="deltas")),
        pytest.param(2, id="TP2", marks=pytest.mark.family("qwen3_next", path="export", layout="TP2", check="deltas")),
    ],
)
def test_live_export_weight_deltas(tmp_path, tp):
    expected = run_ranks(_live_export, tp, str(tmp_path))[0]
    assert isinstance(expected, dict), expected
    _assert_deltas_equal(tmp_path, expected)


GDN_ARGS = dict(
    experimental_attention_variant="gated_delta_net",
    attention_output_gate=True,
    linear_num_key_heads=tn.TinyNextConfig.linear_num_key_heads,
    linear_num_value_heads=tn.TinyNextConfig.linear_num_value_heads,
    linear_key_head_dim=tn.TinyNextConfig.linear_key_head_dim,
    linear_value_head_dim=tn.TinyNextConfig.linear_value_head_dim,
)
"""What Megatron-LM records of the gated delta-net in a checkpoint's args (not the layer pattern, which the base
model's config gives)."""


@pytest.mark.parametrize(
    "tp",
    [
        pytest.param(1, id="TP1", marks=pytest.mark.family("qwen3_next", path="offline", layout="TP1", check="deltas")),
        pytest.param(2, id="TP2", marks=pytest.mark.family("qwen3_next", path="offline", layout="TP2", check="deltas")),
    ],
)
def test_offline_export_of_a_torch_dist_save_equals_the_live_export(tmp_path, tp):
    expected = run_ranks(_live_export, tp, str(tmp_path))[0]
    cfg = tn.TinyNextConfig()
    run_ranks(hfam.save_torch_dist, tp, str(tmp_path), "qwen3_next", cfg, tn.LORA_TARGETS, tp=tp, **GDN_ARGS)
    hfam.offline_export(tmp_path)
    _assert_deltas_equal(tmp_path, expected)


@pytest.mark.parametrize(
    ("export_tp", "import_tp"),
    [
        pytest.param(
            2,
            1,
            id="TP2-to-TP1",
            marks=pytest.mark.family("qwen3_next", path="import", layout="TP2 -> TP1", check="deltas"),
        ),
        pytest.param(
            1,
            2,
            id="TP1-to-TP2",
            marks=pytest.mark.family("qwen3_next", path="import", layout="TP1 -> TP2", check="deltas"),
        ),
    ],
)
def test_import_back_gives_the_megatron_model_the_adapters_deltas(tmp_path, export_tp, import_tp):
    run_ranks(_live_export, export_tp, str(tmp_path))
    cfg = tn.TinyNextConfig()
    imported = run_ranks(hfam.import_back, import_tp, str(tmp_path), "qwen3_next", cfg, tn.LORA_TARGETS, tp=import_tp)
    _assert_deltas_equal(tmp_path, imported[0])


def _refused(rank, world, tmp, targets, hf=None):
    hf = dataclasses.replace(tn.TinyNextConfig(), **hf) if hf else None
    return hfam.live_export(rank, world, tmp, "qwen3_next", tn.TinyNextConfig(), targets, tp=world, hf=hf)


@pytest.mark.family("qwen3_next", path="export", layout="TP2", check="refused")
def test_dense_mlp_lora_is_refused_by_name(tmp_path):
    """peft (with transformers 5) retargets a qwen3_next model's gate/up/down_proj to the fused experts."""
    errors = run_ranks(_refused, 2, str(tmp_path), ("*linear_qkv*", "*linear_fc1*", "*linear_fc2*"))
    assert errors[0] == errors[1] and errors[0].startswith("DialectError: ")
    assert errors[0].count("qwen3_next: found LoRA on a dense MLP (mlp.linear_fc1/fc2)") == 1
    assert not (tmp_path / "adapter").exists()


@pytest.mark.family("qwen3_next", path="export", layout="TP1", check="refused")
def test_hf_config_of_other_delta_net_sizes_is_one_error_before_writing(tmp_path):
    hf = {"pattern": "GG**", "linear_num_value_heads": 2, "linear_value_head_dim": 8}
    error = run_ranks(_refused, 1, str(tmp_path), ("*in_proj*",), hf)[0]
    assert error.startswith("ShapeMismatchError: the HF config does not describe the Megatron model: ")
    for field in ("linear_num_value_heads: Megatron model has 4", "linear_value_head_dim", "layer_pattern: Megatron"):
        assert field in error
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------ MoE in every layer (the real Qwen3-Next)

MOE_TARGETS = ("*in_proj*", "*out_proj*", "*linear_qkv*", "*linear_proj*", "*experts*")
MOE_MODULES = 2 * 3 + 2 * 4 + 4 * (2 + 3)
"""Delta-net qkvz/ba/out and attention q/k/v/o, and in each of the four MoE layers the fused routed experts'
gate_up/down and the shared expert's gate/up/down."""


@pytest.mark.parametrize(
    ("world", "layout"),
    [
        pytest.param(
            1, {}, id="EP1", marks=pytest.mark.family("qwen3_next", path="export", layout="MoE EP1", check="deltas")
        ),
        pytest.param(
            2,
            {"ep": 2},
            id="EP2",
            marks=pytest.mark.family("qwen3_next", path="export", layout="MoE EP2", check="deltas"),
        ),
        pytest.param(
            2,
            {"tp": 2},
            id="TP2",
            marks=pytest.mark.family("qwen3_next", path="export", layout="MoE TP2", check="deltas"),
        ),
    ],
)
def test_moe_live_export_weight_deltas(tmp_path, world, layout):
    """Routed experts (fused gate_up_proj / down_proj) and the shared expert (2-D target parameters)."""
    import json

    expected = run_ranks(hfam.live_export, world, str(tmp_path), "qwen3_next", tn.MOE_LIKE, MOE_TARGETS, **layout)[0]
    assert isinstance(expected, dict), expected
    hfam.assert_deltas_equal("qwen3_next", tmp_path, expected, MOE_MODULES)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (
        "gate_proj" not in config["target_modules"]
        and "mlp.shared_expert.gate_proj.weight" in config["target_parameters"]
    )


@pytest.mark.family("qwen3_next", path="offline", layout="MoE EP2", check="deltas")
def test_moe_offline_export_of_an_ep2_torch_dist_save_equals_the_live_export(tmp_path):
    cfg = tn.MOE_LIKE
    expected = run_ranks(hfam.live_export, 2, str(tmp_path), "qwen3_next", cfg, MOE_TARGETS, ep=2)[0]
    gdn = dict(
        experimental_attention_variant="gated_delta_net",
        attention_output_gate=True,
        linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim,
    )
    run_ranks(hfam.save_torch_dist, 2, str(tmp_path), "qwen3_next", cfg, MOE_TARGETS, ep=2, **gdn, **hfam.moe_args(cfg))
    hfam.offline_export(tmp_path)
    hfam.assert_deltas_equal("qwen3_next", tmp_path, expected, MOE_MODULES)


@pytest.mark.family("qwen3_next", path="import", layout="MoE EP2 -> EP1, TP2", check="deltas")
def test_moe_import_back_at_another_layout_gives_the_adapters_deltas(tmp_path):
    run_ranks(hfam.live_export, 2, str(tmp_path), "qwen3_next", tn.MOE_LIKE, MOE_TARGETS, ep=2)
    for world, layout in ((1, {}), (2, {"tp": 2})):
        imported = run_ranks(hfam.import_back, world, str(tmp_path), "qwen3_next", tn.MOE_LIKE, MOE_TARGETS, **layout)
        hfam.assert_deltas_equal("qwen3_next", tmp_path, imported[0], MOE_MODULES)


@pytest.mark.family("qwen3_next", path="export", layout="MoE, mismatched HF config", check="refused")
def test_moe_hf_config_of_other_expert_sizes_is_one_error_before_writing(tmp_path):
    hf = dataclasses.replace(tn.MOE_LIKE, num_experts=8, moe_shared_expert_intermediate_size=16)
    error = run_ranks(hfam.live_export, 1, str(tmp_path), "qwen3_next", tn.MOE_LIKE, MOE_TARGETS, hf=hf)[0]
    assert error.startswith("ShapeMismatchError: the HF config does not describe the Megatron model: ")
    for field in ("num_experts: Megatron model has 4", "moe_shared_expert_intermediate_size: Megatron model has 24"):
        assert field in error, error
    assert not (tmp_path / "adapter").exists()
