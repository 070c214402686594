"""MoE: ModelOpt LoRA on attention and SequentialMLP experts, exported under EP / TP+EP+SP, loaded by peft into a
transformers v5 MoE model (fused expert parameters via target_parameters), matching Megatron's logits."""

import json
from pathlib import Path

import pytest

from tests.support.checkpoint_args import recorded_args
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


ATTENTION = ("*linear_qkv*", "*linear_proj*")
SHARED_EXPERT = ("*.shared_experts.linear_fc1", "*.shared_experts.linear_fc2")


def _moe_export(rank, world, tmp, tp, ep, family, sp=False, etp=None, expert_layout="auto", routed=True, shared=False):
    from megatron_peft_export import export_adapter
    from tests.support import tiny_moe
    from tests.support.tiny_gpt import apply_modelopt_lora, sample_tokens

    cfg = {
        "mixtral": tiny_moe.MIXTRAL_LIKE,
        "qwen3_moe": tiny_moe.QWEN3_MOE_LIKE,
        "qwen2_moe": tiny_moe.QWEN2_MOE_LIKE,
    }[family]
    tiny_moe.init_moe_parallel(tp=tp, ep=ep, etp=etp)
    targets = ATTENTION + (tiny_moe.ROUTED_EXPERT_TARGETS if routed else ()) + (SHARED_EXPERT if shared else ())
    model = apply_modelopt_lora(tiny_moe.build_moe_gpt(cfg, sequence_parallel=sp), targets=targets)
    tiny_moe.fill_moe_lora_random(model, seed=31)
    tokens = sample_tokens(cfg)
    logits = tiny_moe.megatron_moe_logits(model, tokens)
    base = Path(tmp) / "base"
    if rank == 0:
        tiny_moe.hf_moe_twin(cfg, family).config.save_pretrained(base)
    out = export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(base), expert_layout=expert_layout)
    if rank != 0:
        return None
    result = {"config": json.loads((out / "adapter_config.json").read_text())}
    if expert_layout != "per_expert":
        result["diff"] = tiny_moe.compare_moe_peft(out, cfg, tokens, logits, family=family)
    return result


@pytest.mark.family("mixtral", path="export", layout="ModelOpt EP1, EP2, EP4", check="logits")
@pytest.mark.family("qwen3_moe", path="export", layout="ModelOpt EP1, EP2, EP4", check="logits")
@pytest.mark.parametrize(
    "world,layout",
    [
        (1, {"tp": 1, "ep": 1}),
        (2, {"tp": 1, "ep": 2}),
        (4, {"tp": 1, "ep": 4}),
    ],
    ids=["ep1", "ep2", "ep4"],
)
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_export_matches_megatron_logits(tmp_path, world, layout, family):
    result = run_ranks(_moe_export, world, str(tmp_path), family=family, **layout)[0]
    assert result["diff"] <= 1e-5
    assert result["config"]["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert result["config"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


@pytest.mark.family("mixtral", path="export", layout="ModelOpt TP2xEP2 SP (attention)", check="logits")
@pytest.mark.family("qwen3_moe", path="export", layout="ModelOpt TP2xEP2 SP (attention)", check="logits")
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_tp2_ep2_sequence_parallel_attention_lora_on_a_moe_model(tmp_path, family):
    """ModelOpt 0.47's LoRA on expert linears does not run under sequence parallelism (its LoRA B gathers the
    tokens a second time), which megatron requires for TP with MoE; attention LoRA is exported here."""
    result = run_ranks(_moe_export, 4, str(tmp_path), tp=2, ep=2, sp=True, family=family, routed=False)[0]
    assert result["diff"] <= 1e-5
    assert "target_parameters" not in result["config"]


@pytest.mark.family("qwen2_moe", path="export", layout="ModelOpt EP1, EP2", check="logits")
@pytest.mark.parametrize("world,layout", [(1, {"tp": 1, "ep": 1}), (2, {"tp": 1, "ep": 2})], ids=["ep1", "ep2"])
def test_qwen2_moe_shared_expert_lora_with_routed_experts(tmp_path, world, layout):
    """The shared expert's fused fc1 becomes shared_expert.{gate,up}_proj next to the fused routed experts, written
    as 2-D target parameters: peft 0.22 maps gate_proj / up_proj / down_proj target modules of a qwen2_moe model onto
    the fused routed experts as well (doubling gate_up_proj's rank), so listed as modules the adapter would not
    load."""
    result = run_ranks(_moe_export, world, str(tmp_path), family="qwen2_moe", shared=True, **layout)[0]
    assert result["diff"] <= 1e-5
    assert result["config"]["target_parameters"] == [
        "mlp.experts.down_proj",
        "mlp.experts.gate_up_proj",
        "mlp.shared_expert.down_proj.weight",
        "mlp.shared_expert.gate_proj.weight",
        "mlp.shared_expert.up_proj.weight",
    ]
    assert result["config"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


@pytest.mark.family("qwen2_moe", path="export", layout="ModelOpt TP2 SP, TP2xEP2 SP (shared expert)", check="logits")
@pytest.mark.parametrize("world,layout", [(2, {"tp": 2, "ep": 1}), (4, {"tp": 2, "ep": 2})], ids=["tp2", "tp2xep2"])
def test_qwen2_moe_shared_expert_lora_under_tensor_and_sequence_parallelism(tmp_path, world, layout):
    """The shared expert is split over TP like a dense MLP ([gate_t; up_t] per rank) and, unlike ModelOpt's
    routed-expert
    LoRA, runs under sequence parallelism; the routed experts carry no LoRA here (see the attention-only test above)."""
    result = run_ranks(
        _moe_export, world, str(tmp_path), family="qwen2_moe", sp=True, routed=False, shared=True, **layout
    )[0]
    assert result["diff"] <= 1e-5
    # 2-D target parameters, not gate_proj / up_proj / down_proj modules, which peft 0.22 also maps onto the routed
    # experts (see test_qwen2_moe_shared_expert_lora_with_routed_experts)
    assert result["config"]["target_parameters"] == [
        "mlp.shared_expert.down_proj.weight",
        "mlp.shared_expert.gate_proj.weight",
        "mlp.shared_expert.up_proj.weight",
    ]
    assert result["config"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_per_expert_layout_holds_the_same_values_as_the_fused_one(tmp_path):
    """transformers v5 has no per-expert modules to load into, so the v4/vLLM layout is checked against the fused
    one."""
    import torch
    from safetensors.torch import load_file

    from tests.support.tiny_moe import peft_expert_lora

    run_ranks(_moe_export, 2, str(tmp_path / "fused"), tp=1, ep=2, family="qwen3_moe")
    result = run_ranks(
        _moe_export, 2, str(tmp_path / "per_expert"), tp=1, ep=2, family="qwen3_moe", expert_layout="per_expert"
    )[0]
    assert "target_parameters" not in result["config"] and "gate_proj" in result["config"]["target_modules"]
    fused = load_file(tmp_path / "fused" / "adapter" / "adapter_model.safetensors")
    per = load_file(tmp_path / "per_expert" / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.{i}.mlp.experts.{e}.{m}.lora_{x}.weight"
    for i in range(4):
        experts = range(4)
        gate_up = [
            torch.cat([per[key.format(i=i, e=e, m="gate_proj", x="B")], per[key.format(i=i, e=e, m="up_proj", x="B")]])
            for e in experts
        ]
        a, b = peft_expert_lora([per[key.format(i=i, e=e, m="gate_proj", x="A")] for e in experts], gate_up)
        assert torch.equal(fused[f"base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_A.weight"], a)
        assert torch.equal(fused[f"base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_B.weight"], b)
        a, b = peft_expert_lora(
            [per[key.format(i=i, e=e, m="down_proj", x="A")] for e in experts],
            [per[key.format(i=i, e=e, m="down_proj", x="B")] for e in experts],
        )
        assert torch.equal(fused[f"base_model.model.model.layers.{i}.mlp.experts.lora_A.weight"], a)


def _save_moe_and_export_live(rank, world, tmp, family, tp=1, ep=1, etp=None, sp=False, routed=True, shared=False):

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    from megatron_peft_export import export_adapter
    from megatron_peft_export.io.checkpoints import TRACKER, iteration_dir
    from tests.support import tiny_moe
    from tests.support.tiny_gpt import apply_modelopt_lora
    from tests.support.training import _in_process_write_results, _may_fork

    cfg = {"qwen3_moe": tiny_moe.QWEN3_MOE_LIKE, "qwen2_moe": tiny_moe.QWEN2_MOE_LIKE}[family]
    tiny_moe.init_moe_parallel(tp=tp, ep=ep, etp=etp)
    targets = ATTENTION + (tiny_moe.ROUTED_EXPERT_TARGETS if routed else ()) + (SHARED_EXPERT if shared else ())
    model = apply_modelopt_lora(tiny_moe.build_moe_gpt(cfg, sequence_parallel=sp), targets=targets)
    tiny_moe.fill_moe_lora_random(model, seed=41)
    export_adapter(model, Path(tmp) / "live", model_type=family)
    directory = iteration_dir(Path(tmp) / "save", 3)
    directory.mkdir(parents=True, exist_ok=True)
    args = recorded_args(
        cfg,
        tensor_model_parallel_size=tp,
        expert_tensor_parallel_size=etp or tp,
        num_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size or None,
    )
    _in_process_write_results()
    with _may_fork():
        dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "iteration": 3}, str(directory))
        save_sharded_modelopt_state([model], str(directory))
    if rank == 0:
        (Path(tmp) / "save" / TRACKER).write_text("3")
    dist.barrier()


def _offline(rank, world, checkpoint, out, family):
    from megatron_peft_export.export import ExportOptions
    from megatron_peft_export.offline.export import export_checkpoint

    export_checkpoint(checkpoint, out, options=ExportOptions(model_type=family), quiet=True)


def _offline_equals_live(tmp_path, world, family, **layout) -> set[str]:
    """Save a checkpoint and export live at one layout, export the checkpoint offline: the same files. Returns the
    keys."""
    from safetensors.torch import load_file

    run_ranks(_save_moe_and_export_live, world, str(tmp_path), family, **layout)
    run_ranks(_offline, 1, str(tmp_path / "save"), str(tmp_path / "offline"), family)
    live, offline = (
        load_file(tmp_path / "live" / "adapter_model.safetensors"),
        load_file(tmp_path / "offline" / "adapter_model.safetensors"),
    )
    assert live.keys() == offline.keys() and all((live[k] == offline[k]).all() for k in live)
    assert json.loads((tmp_path / "live" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "offline" / "adapter_config.json").read_text()
    )
    return set(live)


@pytest.mark.family("qwen3_moe", path="offline", layout="ModelOpt EP2", check="logits")
def test_offline_export_of_an_ep2_checkpoint_equals_the_live_export(tmp_path):
    _offline_equals_live(tmp_path, 2, "qwen3_moe", ep=2)


@pytest.mark.family("qwen2_moe", path="offline", layout="ModelOpt EP2; TP2xEP2 ETP1 SP", check="logits")
@pytest.mark.parametrize(
    "world,layout",
    [
        (2, {"ep": 2}),
        (2, {"tp": 2, "ep": 2, "etp": 1, "sp": True, "routed": False}),
    ],
    ids=["ep2-routed-and-shared", "tp2xep2-etp1-sp-shared"],
)
def test_offline_export_of_shared_expert_lora_equals_the_live_export(tmp_path, world, layout):
    """Shared-expert fc1 LoRA B is saved TP-interleaved like a dense fc1's, undone with the TP size (2), not the expert
    TP size (1)."""
    keys = _offline_equals_live(tmp_path, world, "qwen2_moe", shared=True, **layout)
    assert "base_model.model.model.layers.0.mlp.shared_expert.up_proj.lora_B.weight" in keys


def _offline_in_layout(rank, world, checkpoint, out, family, expert_layout):
    from megatron_peft_export.export import ExportOptions
    from megatron_peft_export.offline.export import export_checkpoint

    options = ExportOptions(model_type=family, expert_layout=expert_layout)
    export_checkpoint(checkpoint, out, options=options, quiet=True)


def _save_file_bytes(path: Path, scratch: Path) -> bytes:
    """What safetensors' own save_file writes for the tensors of `path` (the independent reference of the bytes)."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), str(scratch), metadata={"format": "pt"})
    return scratch.read_bytes()


@pytest.mark.parametrize("expert_layout", ["per_expert", "fused"])
def test_ep2_adapters_are_the_bytes_safetensors_writes_live_and_offline(tmp_path, expert_layout):
    """The writer's file (header from the plan, payload by offset; fused tensors stacked) is byte for byte what
    save_file writes for the same tensors, live and offline; offline equals live in the fused layout (live's default
    under transformers 5)."""
    run_ranks(_save_moe_and_export_live, 2, str(tmp_path), "qwen3_moe", ep=2)
    run_ranks(_offline_in_layout, 1, str(tmp_path / "save"), str(tmp_path / "offline"), "qwen3_moe", expert_layout)
    offline = (tmp_path / "offline" / "adapter_model.safetensors").read_bytes()
    live = (tmp_path / "live" / "adapter_model.safetensors").read_bytes()
    assert offline == _save_file_bytes(tmp_path / "offline" / "adapter_model.safetensors", tmp_path / "ref.st")
    assert live == _save_file_bytes(tmp_path / "live" / "adapter_model.safetensors", tmp_path / "ref.st")
    if expert_layout == "fused":
        assert offline == live
