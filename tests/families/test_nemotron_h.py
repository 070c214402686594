"""Nemotron-H (megatron MambaModel: Mamba, attention and MLP layers): export live, offline and import back.

These paths are checked by weight deltas (the logits of the live export and import are checked in
tests/families/test_hybrid_logits.py, with CPU stand-ins for the mamba_ssm kernels): for every HF module, peft's
merged weight minus the base weight equals the Megatron adapter's effective delta (scale * B @ A of each TP rank, put
together by megatron's row layout in tests/support/tiny_hybrid.py), exactly (the values are dyadic so that float32
sums are exact)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import hybrid_family as hfam
from tests.support import tiny_hybrid as th
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


DENSE = th.TinyHybridConfig()
"""Mamba, attention and MLP layers (`M*M-`)."""


def _live_export(rank, world, tmp, targets=th.LORA_TARGETS, hf=None):
    hf = dataclasses.replace(DENSE, **hf) if hf else None
    return hfam.live_export(rank, world, tmp, "nemotron_h", DENSE, targets, tp=world, hf=hf)


def _assert_deltas_equal(tmp: Path, expected: dict[str, torch.Tensor]) -> None:
    # two Mamba layers (in_proj), attention (q, k, v, o), MLP (up, down)
    hfam.assert_deltas_equal("nemotron_h", tmp, expected, 2 + 4 + 2)


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


MAMBA_ARGS = dict(
    swiglu=False,
    is_hybrid_model=True,
    hybrid_override_pattern=DENSE.pattern,
    mamba_num_heads=DENSE.mamba_num_heads,
    mamba_head_dim=DENSE.mamba_head_dim,
    mamba_num_groups=DENSE.mamba_num_groups,
    mamba_state_dim=DENSE.mamba_state_dim,
)
"""What Megatron-LM records of the hybrid model in a checkpoint's args."""


@pytest.mark.parametrize(
    "tp",
    [
        pytest.param(1, id="TP1", marks=pytest.mark.family("nemotron_h", path="offline", layout="TP1", check="deltas")),
        pytest.param(2, id="TP2", marks=pytest.mark.family("nemotron_h", path="offline", layout="TP2", check="deltas")),
    ],
)
def test_offline_export_of_a_torch_dist_save_equals_the_live_export(tmp_path, tp):
    expected = run_ranks(_live_export, tp, str(tmp_path))[0]
    run_ranks(hfam.save_torch_dist, tp, str(tmp_path), "nemotron_h", DENSE, th.LORA_TARGETS, tp=tp, **MAMBA_ARGS)
    hfam.offline_export(tmp_path)
    _assert_deltas_equal(tmp_path, expected)


@pytest.mark.parametrize(
    ("export_tp", "import_tp"),
    [
        pytest.param(
            2,
            1,
            id="TP2-to-TP1",
            marks=pytest.mark.family("nemotron_h", path="import", layout="TP2 -> TP1", check="deltas"),
        ),
        pytest.param(
            1,
            2,
            id="TP1-to-TP2",
            marks=pytest.mark.family("nemotron_h", path="import", layout="TP1 -> TP2", check="deltas"),
        ),
    ],
)
def test_import_back_gives_the_megatron_model_the_adapters_deltas(tmp_path, export_tp, import_tp):
    """Exported at one TP size, imported at another: the Megatron model's effective deltas are peft's merged ones."""
    run_ranks(_live_export, export_tp, str(tmp_path))
    imported = run_ranks(hfam.import_back, import_tp, str(tmp_path), "nemotron_h", DENSE, th.LORA_TARGETS, tp=import_tp)
    _assert_deltas_equal(tmp_path, imported[0])


def _bridge_export(rank, world, tmp, save=False):
    import torch.distributed as dist

    from megatron_peft_export import export_adapter
    from tests.support import real_bridge
    from tests.support import tiny_hybrid as th

    cfg = th.TinyHybridConfig()
    th.init_parallel(world)
    targets = ["in_proj", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    model = real_bridge.apply(th.build_hybrid(cfg), "lora", dim=4, alpha=8, target_modules=targets)
    th.fill_lora_dyadic(model, seed=9)
    if rank == 0:
        th.save_hf_base(cfg, Path(tmp) / "base")
    dist.barrier()
    export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(Path(tmp) / "base"))
    if save:  # Bridge's in_proj save reads `tp_size`, which TE's linears have and megatron's local ones lack
        for name, module in model.named_modules():
            if name.endswith("mixer.in_proj"):
                module.to_wrap.tp_size = world
        _save(model, Path(tmp) / "save", None)
    gathered = [None] * world
    dist.all_gather_object(gathered, th.bridge_local_tensors(model))
    return th.megatron_to_hf_deltas(th.bridge_deltas(gathered), cfg) if rank == 0 else None


@pytest.mark.family("nemotron_h", path="export", layout="TP2", check="deltas")
def test_megatron_bridge_lora_export_tp2_weight_deltas(real_bridge, tmp_path):
    """Megatron-Bridge's own LoRA (its ParallelLinearAdapter on in_proj, attention and MLP linears)."""
    expected = run_ranks(_bridge_export, 2, str(tmp_path))[0]
    _assert_deltas_equal(tmp_path, expected)


def _save(model, save: Path, args) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_peft_export.io.checkpoints import TRACKER, iteration_dir
    from tests.support.training import _in_process_write_results, _may_fork

    directory = iteration_dir(save, 5)
    directory.mkdir(parents=True, exist_ok=True)
    _in_process_write_results()
    with _may_fork():
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 5, "args": args}, str(directory))
    if dist.get_rank() == 0:
        (save / TRACKER).write_text("5")
    dist.barrier()


@pytest.mark.family("nemotron_h", path="offline", layout="TP2", check="refused")
def test_offline_export_of_bridge_lora_on_mamba_in_proj_is_refused_by_name(real_bridge, tmp_path):
    """Bridge saves in_proj's LoRA B as five tensors (z, x, B, C, dt): refused with exit 2 and one line, not
    misread."""
    run_ranks(_bridge_export, 2, str(tmp_path), save=True)
    argv = [
        "export",
        str(tmp_path / "save"),
        "--output",
        str(tmp_path / "offline"),
        "--base-model",
        str(tmp_path / "base"),
    ]
    status, err = run_ranks(hfam.offline_cli, 1, argv)[0]
    assert status == 2, err
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1
        and "nemotron_h: Megatron-Bridge saved the LoRA B of Mamba in_proj split into z, x, B, C" in lines[0]
    )
    assert "decoder.layers.{0,2}.mixer.in_proj" in lines[0], lines[0]
    assert not (tmp_path / "offline").exists()


# ------------------------------------------------------------------ MoE layers (Nemotron-3 Nano's E layers)

MOE_TARGETS = ("*in_proj*", "*linear_qkv*", "*linear_proj*", "*linear_fc1*", "*linear_fc2*")
MOE_MODULES = 2 + 4 + 2 + 2
"""Two Mamba in_proj, attention q/k/v/o, the fused routed experts' up/down, the shared experts' up/down."""


@pytest.mark.parametrize(
    ("world", "layout"),
    [
        pytest.param(
            1, {}, id="EP1", marks=pytest.mark.family("nemotron_h", path="export", layout="MoE EP1", check="deltas")
        ),
        pytest.param(
            2,
            {"ep": 2},
            id="EP2",
            marks=pytest.mark.family("nemotron_h", path="export", layout="MoE EP2", check="deltas"),
        ),
        pytest.param(
            2,
            {"tp": 2},
            id="TP2",
            marks=pytest.mark.family("nemotron_h", path="export", layout="MoE TP2", check="deltas"),
        ),
    ],
)
def test_moe_live_export_weight_deltas(tmp_path, world, layout):
    """Routed experts (non-gated, fused in transformers 5 as mixer.experts.up_proj / down_proj) and shared experts."""
    expected = run_ranks(hfam.live_export, world, str(tmp_path), "nemotron_h", th.MOE_LIKE, MOE_TARGETS, **layout)[0]
    assert isinstance(expected, dict), expected
    hfam.assert_deltas_equal("nemotron_h", tmp_path, expected, MOE_MODULES)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mixer.experts.down_proj", "mixer.experts.up_proj"]


@pytest.mark.family("nemotron_h", path="offline", layout="MoE EP2", check="deltas")
def test_moe_offline_export_of_an_ep2_torch_dist_save_equals_the_live_export(tmp_path):
    cfg = th.MOE_LIKE
    expected = run_ranks(hfam.live_export, 2, str(tmp_path), "nemotron_h", cfg, MOE_TARGETS, ep=2)[0]
    mamba = dict(
        swiglu=False,
        is_hybrid_model=True,
        hybrid_override_pattern=cfg.pattern,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        mamba_num_groups=cfg.mamba_num_groups,
        mamba_state_dim=cfg.mamba_state_dim,
    )
    run_ranks(
        hfam.save_torch_dist, 2, str(tmp_path), "nemotron_h", cfg, MOE_TARGETS, ep=2, **mamba, **hfam.moe_args(cfg)
    )
    hfam.offline_export(tmp_path)
    hfam.assert_deltas_equal("nemotron_h", tmp_path, expected, MOE_MODULES)
    # against a base model of other expert counts: exit 2, one error line, nothing written
    other = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**other, "n_routed_experts": 8}))
    argv = [
        "export",
        str(tmp_path / "save"),
        "--output",
        str(tmp_path / "out"),
        "--base-model",
        str(tmp_path / "other"),
    ]
    status, err = run_ranks(hfam.offline_cli, 1, argv)[0]
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "num_experts: Megatron model has 4" in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*out*"))


@pytest.mark.family("nemotron_h", path="import", layout="MoE EP2 -> EP1, TP2", check="deltas")
def test_moe_import_back_at_another_layout_gives_the_adapters_deltas(tmp_path):
    run_ranks(hfam.live_export, 2, str(tmp_path), "nemotron_h", th.MOE_LIKE, MOE_TARGETS, ep=2)
    for world, layout in ((1, {}), (2, {"tp": 2})):
        imported = run_ranks(hfam.import_back, world, str(tmp_path), "nemotron_h", th.MOE_LIKE, MOE_TARGETS, **layout)
        hfam.assert_deltas_equal("nemotron_h", tmp_path, imported[0], MOE_MODULES)


@pytest.mark.family("nemotron_h", path="export", layout="MoE, mismatched HF config", check="refused")
def test_moe_hf_config_of_other_expert_sizes_is_one_error_before_writing(tmp_path):
    hf = dataclasses.replace(th.MOE_LIKE, num_experts=8, moe_ffn_hidden_size=32, pattern="M*EE")
    error = run_ranks(hfam.live_export, 1, str(tmp_path), "nemotron_h", th.MOE_LIKE, MOE_TARGETS, hf=hf)[0]
    assert error.startswith("ShapeMismatchError: the HF config does not describe the Megatron model: ")
    for field in ("num_experts: Megatron model has 4", "moe_ffn_hidden_size: Megatron model has 16", "moe_layers"):
        assert field in error, error
    assert not (tmp_path / "adapter").exists()
