"""Nemotron-H (megatron MambaModel: Mamba, attention and MLP layers): export live, offline and import back.

megatron's Mamba mixer cannot run on CPU (mamba_ssm / causal_conv1d kernels), so parity is by weight deltas: for every
HF module, peft's merged weight minus the base weight equals the Megatron adapter's effective delta (scale * B @ A of
each TP rank, put together by megatron's row layout in tests/support/tiny_hybrid.py), exactly (the values are dyadic
so that float32 sums are exact)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _live_export(rank, world, tmp, pattern="M*M-", targets=None, hf=None):
    import torch.distributed as dist

    from megatron_peft_export import export_adapter
    from tests.support import tiny_hybrid as th
    from tests.support.tiny_gpt import apply_modelopt_lora

    cfg = th.TinyHybridConfig(pattern=pattern)
    th.init_parallel(world)
    model = apply_modelopt_lora(th.build_hybrid(cfg), rank=4, scale=2.0, targets=targets or th.LORA_TARGETS)
    th.fill_lora_dyadic(model, seed=5)
    if rank == 0:
        th.save_hf_base(th.TinyHybridConfig(**(hf or {})), Path(tmp) / "base")
    dist.barrier()
    try:
        export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(Path(tmp) / "base"))
    except Exception as exc:  # the same error on every rank
        return f"{type(exc).__name__}: {exc}"
    local = th.modelopt_local_deltas(model)
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    return th.megatron_to_hf_deltas(gathered, cfg) if rank == 0 else None


def _assert_deltas_equal(tmp: Path, expected: dict[str, torch.Tensor]) -> None:
    from tests.support import tiny_hybrid as th

    found = th.peft_merged_deltas(tmp / "base", tmp / "adapter")
    assert sorted(found) == sorted(expected)
    assert len(expected) == 2 + 4 + 2  # two Mamba layers (in_proj), attention (q, k, v, o), MLP (up, down)
    for name, delta in expected.items():
        assert torch.equal(found[name], delta), name


@pytest.mark.family("nemotron_h", path="export", layout="TP1", check="deltas")
def test_live_export_tp1_weight_deltas(tmp_path):
    expected = run_ranks(_live_export, 1, str(tmp_path))[0]
    _assert_deltas_equal(tmp_path, expected)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [
        "down_proj",
        "in_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.backbone.layers.") for k in keys), sorted(keys)[:3]


@pytest.mark.family("nemotron_h", path="export", layout="TP2", check="deltas")
def test_live_export_tp2_weight_deltas(tmp_path):
    expected = run_ranks(_live_export, 2, str(tmp_path))[0]
    _assert_deltas_equal(tmp_path, expected)


@pytest.mark.family("nemotron_h", path="export", layout="TP2", check="refused")
def test_lora_on_mamba_out_proj_is_refused_by_name(tmp_path):
    """peft refuses LoRA on a Mamba model's out_proj (its fused kernels bypass it): one error, nothing written."""
    errors = run_ranks(_live_export, 2, str(tmp_path), targets=("*in_proj*", "*out_proj*"))
    assert errors[0] == errors[1]
    assert (
        errors[0].startswith("DialectError: ")
        and errors[0].count("nemotron_h: found LoRA on the Mamba mixers' out_proj") == 1
    )
    assert not (tmp_path / "adapter").exists()


@pytest.mark.family("nemotron_h", path="export", layout="TP1", check="refused")
def test_hf_config_of_another_geometry_is_one_error_before_writing(tmp_path):
    hf = {"pattern": "M-M*", "mamba_num_groups": 4, "mamba_state_dim": 8}
    error = run_ranks(_live_export, 1, str(tmp_path), hf=hf)[0]
    assert error.startswith("ShapeMismatchError: the HF config does not describe the Megatron model: ")
    for field in (
        "mamba_num_groups: Megatron model has 2",
        "mamba_state_dim",
        "layer_pattern: Megatron model has M*M-",
    ):
        assert field in error
    assert not (tmp_path / "adapter").exists()
