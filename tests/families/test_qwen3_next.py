"""Qwen3-Next (gated delta-net and gated attention layers): export live, offline and import back, by weight deltas.

For every HF module, peft's merged weight minus the base weight equals the Megatron adapter's effective delta
(scale * B @ A of each TP rank, put together by megatron's layout in tests/support/tiny_qwen3_next.py), exactly."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.families.test_nemotron_h import _offline_cli
from tests.support.checkpoint_args import recorded_args
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _live_export(rank, world, tmp, hf=None):
    import torch.distributed as dist

    from megatron_peft_export import export_adapter
    from tests.support import tiny_hybrid as th
    from tests.support import tiny_qwen3_next as tn
    from tests.support.tiny_gpt import apply_modelopt_lora

    cfg = tn.TinyNextConfig()
    tn.init_parallel(world)
    model = apply_modelopt_lora(tn.build_next(cfg), rank=4, scale=2.0, targets=tn.LORA_TARGETS)
    th.fill_lora_dyadic(model, seed=7)
    if rank == 0:
        tn.save_hf_base(tn.TinyNextConfig(**(hf or {})), Path(tmp) / "base")
    dist.barrier()
    try:
        export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(Path(tmp) / "base"))
    except Exception as exc:  # the same error on every rank
        return f"{type(exc).__name__}: {exc}"
    gathered = [None] * world
    dist.all_gather_object(gathered, th.modelopt_local_deltas(model))
    return tn.megatron_to_hf_deltas(gathered, cfg) if rank == 0 else None


def _assert_deltas_equal(tmp: Path, expected: dict[str, torch.Tensor]) -> None:
    from tests.support import tiny_qwen3_next as tn

    found = tn.peft_merged_deltas(tmp / "base", tmp / "adapter")
    assert sorted(found) == sorted(expected)
    assert len(expected) == 2 * 3 + 2 * 4  # two delta-net layers (qkvz, ba, out), two attention (q, k, v, o)
    for name, delta in expected.items():
        assert torch.equal(found[name], delta), name


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


def _save_torch_dist(rank, world, tmp):
    """The live export's model saved as Megatron-LM saves it (torch_dist, args without the layer pattern, which the
    base model's config gives; modelopt_state/)."""

    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    from tests.families.test_nemotron_h import _save
    from tests.support import tiny_hybrid as th
    from tests.support import tiny_qwen3_next as tn
    from tests.support.tiny_gpt import apply_modelopt_lora
    from tests.support.training import _may_fork

    cfg = tn.TinyNextConfig()
    tn.init_parallel(world)
    model = apply_modelopt_lora(tn.build_next(cfg), rank=4, scale=2.0, targets=tn.LORA_TARGETS)
    th.fill_lora_dyadic(model, seed=7)  # the same values as _live_export's
    args = recorded_args(
        cfg,
        tensor_model_parallel_size=world,
        num_layers=len(cfg.pattern),
        experimental_attention_variant="gated_delta_net",
        attention_output_gate=True,
        linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim,
    )
    _save(model, Path(tmp) / "save", args)
    with _may_fork():
        save_sharded_modelopt_state([model], str(Path(tmp) / "save" / "iter_0000005"))


@pytest.mark.parametrize(
    "tp",
    [
        pytest.param(1, id="TP1", marks=pytest.mark.family("qwen3_next", path="offline", layout="TP1", check="deltas")),
        pytest.param(2, id="TP2", marks=pytest.mark.family("qwen3_next", path="offline", layout="TP2", check="deltas")),
    ],
)
def test_offline_export_of_a_torch_dist_save_equals_the_live_export(tmp_path, tp):
    expected = run_ranks(_live_export, tp, str(tmp_path))[0]
    run_ranks(_save_torch_dist, tp, str(tmp_path))
    argv = [
        "export",
        str(tmp_path / "save"),
        "--output",
        str(tmp_path / "offline"),
        "--base-model",
        str(tmp_path / "base"),
    ]
    status, err = run_ranks(_offline_cli, 1, argv)[0]
    assert status == 0, err
    live, offline = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("adapter", "offline"))
    assert live.keys() == offline.keys() and all(torch.equal(live[k], offline[k]) for k in live)
    (tmp_path / "adapter").rename(tmp_path / "live")
    (tmp_path / "offline").rename(tmp_path / "adapter")
    _assert_deltas_equal(tmp_path, expected)


def _import(rank, world, tmp):
    import torch.distributed as dist

    from megatron_peft_export import load_hf_adapter
    from tests.support import tiny_hybrid as th
    from tests.support import tiny_qwen3_next as tn
    from tests.support.tiny_gpt import apply_modelopt_lora

    cfg = tn.TinyNextConfig()
    tn.init_parallel(world)
    model = apply_modelopt_lora(tn.build_next(cfg), rank=4, scale=2.0, targets=tn.LORA_TARGETS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora" in name:
                param.zero_()
    load_hf_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(Path(tmp) / "base"))
    gathered = [None] * world
    dist.all_gather_object(gathered, th.modelopt_local_deltas(model))
    return tn.megatron_to_hf_deltas(gathered, cfg) if rank == 0 else None


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
    imported = run_ranks(_import, import_tp, str(tmp_path))[0]
    _assert_deltas_equal(tmp_path, imported)


def _refused(rank, world, tmp, targets, hf=None):
    from megatron_peft_export import export_adapter
    from tests.support import tiny_hybrid as th
    from tests.support import tiny_qwen3_next as tn
    from tests.support.tiny_gpt import apply_modelopt_lora

    tn.init_parallel(world)
    model = apply_modelopt_lora(tn.build_next(tn.TinyNextConfig()), rank=4, scale=2.0, targets=targets)
    th.fill_lora_dyadic(model, seed=7)
    tn.save_hf_base(tn.TinyNextConfig(**(hf or {})), Path(tmp) / f"base{rank}")
    try:
        export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(Path(tmp) / f"base{rank}"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


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

    from tests.support import hybrid_family as hfam
    from tests.support import tiny_qwen3_next as tn

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
    from tests.support import hybrid_family as hfam
    from tests.support import tiny_qwen3_next as tn

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
    from tests.support import hybrid_family as hfam
    from tests.support import tiny_qwen3_next as tn

    run_ranks(hfam.live_export, 2, str(tmp_path), "qwen3_next", tn.MOE_LIKE, MOE_TARGETS, ep=2)
    for world, layout in ((1, {}), (2, {"tp": 2})):
        imported = run_ranks(hfam.import_back, world, str(tmp_path), "qwen3_next", tn.MOE_LIKE, MOE_TARGETS, **layout)
        hfam.assert_deltas_equal("qwen3_next", tmp_path, imported[0], MOE_MODULES)


@pytest.mark.family("qwen3_next", path="export", layout="MoE, mismatched HF config", check="refused")
def test_moe_hf_config_of_other_expert_sizes_is_one_error_before_writing(tmp_path):
    import dataclasses

    from tests.support import hybrid_family as hfam
    from tests.support import tiny_qwen3_next as tn

    hf = dataclasses.replace(tn.MOE_LIKE, num_experts=8, moe_shared_expert_intermediate_size=16)
    error = run_ranks(hfam.live_export, 1, str(tmp_path), "qwen3_next", tn.MOE_LIKE, MOE_TARGETS, hf=hf)[0]
    assert error.startswith("ShapeMismatchError: the HF config does not describe the Megatron model: ")
    for field in ("num_experts: Megatron model has 4", "moe_shared_expert_intermediate_size: Megatron model has 24"):
        assert field in error, error
    assert not (tmp_path / "adapter").exists()
