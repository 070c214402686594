"""DeepSeek-V3 / Kimi-K2 (multi-latent attention) and GLM-4.5 (biased GQA): ModelOpt LoRA on every linear megatron
builds (MLA's down/up projections, dense first layers, shared and routed experts), exported live at TP1 / TP2+SP / EP2,
offline from a torch_dist checkpoint, and imported back; peft on the transformers twin gives Megatron's logits.

Routed-expert LoRA runs without sequence parallelism only (ModelOpt 0.47, see test_export_moe.py), so the TP2 layouts
adapt attention, the dense MLP and the shared experts."""

import json
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(600)

MLA = ("*linear_q_down_proj", "*linear_q_up_proj", "*linear_kv_down_proj", "*linear_kv_up_proj", "*linear_proj")
GQA = ("*linear_qkv", "*linear_proj")
DENSE_AND_SHARED = ("*mlp.linear_fc1", "*mlp.linear_fc2", "*shared_experts.linear_fc1", "*shared_experts.linear_fc2")
ROUTED = ("*.local_experts.*.linear_fc1", "*.local_experts.*.linear_fc2")


def _config(name):
    from tests.support import tiny_deepseek

    return getattr(tiny_deepseek, name)


def _targets(name, tp, routed=None):
    cfg = _config(name)
    attention = GQA if cfg.attention == "gqa" else MLA
    if cfg.attention == "mla" and cfg.q_lora_rank is None:
        attention = ("*linear_q_proj",) + attention[2:]
    return attention + DENSE_AND_SHARED + (ROUTED if (tp == 1 if routed is None else routed) else ())


BRIDGE_MLA = ["linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"]


def _build(name, tp, ep, seed, variant="modelopt", bridge_targets=None, routed=None):
    from tests.support import real_bridge, tiny_deepseek
    from tests.support.tiny_gpt import apply_modelopt_lora, fill_lora_random

    cfg = _config(name)
    tiny_deepseek.init_parallel(tp=tp, ep=ep)
    model = tiny_deepseek.build(cfg, sequence_parallel=tp > 1)
    if variant == "modelopt":
        model = apply_modelopt_lora(model, targets=_targets(name, tp, routed))
    else:  # Bridge's LoRA on MLA's linears and the MLPs' (dense, shared and routed experts) fc1, and fc2 at TP1
        # (Bridge's LoRA on expert fc2 at expert TP 2 is refused, see dialects/bridge.py)
        mlp = ["linear_fc1", "linear_fc2"] if tp == 1 else ["linear_fc1"]
        targets = BRIDGE_MLA + mlp if bridge_targets is None else list(bridge_targets)
        model = real_bridge.apply(model, variant, dim=8, alpha=16, target_modules=targets)
    fill_lora_random(model, seed=seed)
    return cfg, model


def _export(rank, world, tmp, name, tp=1, ep=1, save=False, variant="modelopt", bridge_targets=None):
    from megatron_peft_export import export_adapter
    from tests.support import tiny_deepseek, tiny_moe
    from tests.support.tiny_gpt import compare_peft, sample_tokens

    cfg, model = _build(name, tp, ep, seed=31, variant=variant, bridge_targets=bridge_targets)
    tokens = sample_tokens(cfg)
    logits = tiny_moe.megatron_moe_logits(model, tokens)
    base = Path(tmp) / "base"
    if rank == 0:
        tiny_deepseek.hf_config(cfg).save_pretrained(base)
    _barrier()
    out = export_adapter(model, Path(tmp) / "live", base_model_name_or_path=str(base))
    if save:
        _save(rank, model, cfg, Path(tmp) / "save", tp)
    if rank != 0:
        return None
    diff = compare_peft(out, cfg, tokens, logits, base=tiny_deepseek.hf_twin(cfg))
    return {"diff": diff, "config": json.loads((out / "adapter_config.json").read_text()), "logits": logits}


def _barrier():
    import torch.distributed as dist

    dist.barrier()


def _save(rank, model, cfg, save, tp):
    """A Megatron-LM style torch_dist checkpoint (iteration 3) with the args the offline export reads."""
    import argparse

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    from megatron_peft_export.io.checkpoints import TRACKER, iteration_dir
    from tests.support.training import _in_process_write_results, _may_fork

    directory = iteration_dir(save, 3)
    directory.mkdir(parents=True, exist_ok=True)
    mla = cfg.attention == "mla"
    args = argparse.Namespace(
        tensor_model_parallel_size=tp,
        expert_tensor_parallel_size=tp,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=not mla,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        swiglu=True,
        padded_vocab_size=cfg.vocab_size,
        num_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        moe_layer_freq=[0] * cfg.dense_layers + [1] * (cfg.num_layers - cfg.dense_layers),
        multi_latent_attention=mla,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_head_dim,
        qk_pos_emb_head_dim=cfg.qk_pos_emb_head_dim,
        v_head_dim=cfg.v_head_dim,
    )
    _in_process_write_results()
    with _may_fork():
        dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "iteration": 3}, str(directory))
        save_sharded_modelopt_state([model], str(directory))
    if rank == 0:
        (save / TRACKER).write_text("3")
    dist.barrier()


def _offline(rank, world, tmp):
    from megatron_peft_export.export import ExportOptions
    from megatron_peft_export.offline.export import export_checkpoint

    options = ExportOptions(base_model_name_or_path=str(Path(tmp) / "base"))
    export_checkpoint(str(Path(tmp) / "save"), str(Path(tmp) / "offline"), options=options, quiet=True)


def _import(rank, world, tmp, name, tp=1, ep=1, routed=None):
    from megatron_peft_export import load_hf_adapter
    from tests.support import tiny_moe
    from tests.support.tiny_gpt import sample_tokens

    cfg, model = _build(name, tp, ep, seed=99, routed=routed)  # other values: the import must overwrite every one
    load_hf_adapter(model, Path(tmp) / "live", base_model_name_or_path=str(Path(tmp) / "base"))
    logits = tiny_moe.megatron_moe_logits(model, sample_tokens(cfg))  # collective
    return logits if rank == 0 else None


def _same_files(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and (x[k] == y[k]).all() for k in x)
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())


MLA_MODULES = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]
AS_PARAMETERS = [  # peft would rewrite target_modules of these names into the routed experts (core/archs.py)
    f"mlp.{m}_proj.weight" for m in ("down", "gate", "up")
] + [f"mlp.shared_experts.{m}_proj.weight" for m in ("down", "gate", "up")]
ROUTED_PARAMETERS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


@pytest.mark.family("deepseek_v3", path="export", layout="ModelOpt TP1", check="logits")
@pytest.mark.family("deepseek_v3", path="offline", layout="ModelOpt TP1", check="logits")
@pytest.mark.family("deepseek_v3", path="import", layout="ModelOpt TP1", check="logits")
def test_deepseek_v3_tp1_export_offline_and_import(tmp_path):
    """Every linear adapted (MLA, dense fc, shared and routed experts); the offline export of the checkpoint saved with
    it is the same files; importing the adapter into a model with other LoRA values gives the exporting model's
    logits."""
    result = run_ranks(_export, 1, str(tmp_path), "DEEPSEEK_LIKE", save=True, timeout=300)[0]
    assert result["diff"] <= 1e-5
    assert result["config"]["target_modules"] == MLA_MODULES
    assert result["config"]["target_parameters"] == sorted(ROUTED_PARAMETERS + AS_PARAMETERS)
    run_ranks(_offline, 1, str(tmp_path), timeout=300)
    _same_files(tmp_path / "live", tmp_path / "offline")
    imported = run_ranks(_import, 1, str(tmp_path), "DEEPSEEK_LIKE", timeout=300)[0]
    assert (imported - result["logits"]).abs().max().item() <= 1e-5


@pytest.mark.family("deepseek_v3", path="export", layout="ModelOpt TP2 SP", check="logits")
@pytest.mark.family("deepseek_v3", path="offline", layout="ModelOpt TP2 SP", check="logits")
@pytest.mark.family("deepseek_v3", path="import", layout="ModelOpt TP2 SP -> TP1, TP2 SP", check="logits")
def test_deepseek_v3_tp2_sequence_parallel_export_offline_and_import(tmp_path):
    """MLA's column-parallel down projections (rows split over TP, gathered before the latent norms) and up
    projections (heads split over TP)."""
    result = run_ranks(_export, 2, str(tmp_path), "DEEPSEEK_LIKE", tp=2, save=True, timeout=400)[0]
    assert result["diff"] <= 1e-5
    assert result["config"]["target_parameters"] == sorted(AS_PARAMETERS)
    run_ranks(_offline, 1, str(tmp_path), timeout=300)
    _same_files(tmp_path / "live", tmp_path / "offline")
    for tp in (1, 2):  # at TP1 without routed-expert LoRA, which the TP2 model does not have
        imported = run_ranks(_import, tp, str(tmp_path), "DEEPSEEK_LIKE", tp=tp, routed=False, timeout=400)[0]
        assert (imported - result["logits"]).abs().max().item() <= 1e-5


@pytest.mark.family("deepseek_v3", path="export", layout="ModelOpt EP2", check="logits")
@pytest.mark.family("deepseek_v3", path="import", layout="ModelOpt EP2", check="logits")
def test_deepseek_v3_ep2_export_and_import(tmp_path):
    result = run_ranks(_export, 2, str(tmp_path), "DEEPSEEK_LIKE", ep=2, timeout=400)[0]
    assert result["diff"] <= 1e-5
    imported = run_ranks(_import, 2, str(tmp_path), "DEEPSEEK_LIKE", ep=2, timeout=400)[0]
    assert (imported - result["logits"]).abs().max().item() <= 1e-5


@pytest.mark.family("deepseek_v3", path="export", layout="ModelOpt TP1, no q latent", check="logits")
def test_deepseek_v3_without_query_latent(tmp_path):
    """q_lora_rank None (DeepSeek-V2-Lite style): linear_q_proj becomes q_proj."""
    result = run_ranks(_export, 1, str(tmp_path), "DEEPSEEK_NO_Q_LORA", timeout=300)[0]
    assert result["diff"] <= 1e-5
    assert "q_proj" in result["config"]["target_modules"] and "q_a_proj" not in result["config"]["target_modules"]


@pytest.mark.family("glm4_moe", path="export", layout="ModelOpt TP1", check="logits")
@pytest.mark.family("glm4_moe", path="offline", layout="ModelOpt TP1", check="logits")
@pytest.mark.family("glm4_moe", path="import", layout="ModelOpt TP1", check="logits")
def test_glm4_moe_tp1_export_offline_and_import(tmp_path):
    """GQA with q/k/v biases in the base model (LoRA has none), dense first layer, shared and routed experts."""
    result = run_ranks(_export, 1, str(tmp_path), "GLM_LIKE", save=True, timeout=300)[0]
    assert result["diff"] <= 1e-5
    assert result["config"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert result["config"]["target_parameters"] == sorted(ROUTED_PARAMETERS + AS_PARAMETERS)
    run_ranks(_offline, 1, str(tmp_path), timeout=300)
    _same_files(tmp_path / "live", tmp_path / "offline")
    imported = run_ranks(_import, 1, str(tmp_path), "GLM_LIKE", timeout=300)[0]
    assert (imported - result["logits"]).abs().max().item() <= 1e-5


@pytest.mark.family("glm4_moe", path="export", layout="ModelOpt TP2 SP", check="logits")
@pytest.mark.family("glm4_moe", path="offline", layout="ModelOpt TP2 SP", check="logits")
@pytest.mark.family("glm4_moe", path="import", layout="ModelOpt TP2 SP -> TP1, TP2 SP", check="logits")
def test_glm4_moe_tp2_sequence_parallel_export_offline_and_import(tmp_path):
    result = run_ranks(_export, 2, str(tmp_path), "GLM_LIKE", tp=2, save=True, timeout=400)[0]
    assert result["diff"] <= 1e-5
    run_ranks(_offline, 1, str(tmp_path), timeout=300)
    _same_files(tmp_path / "live", tmp_path / "offline")
    for tp in (1, 2):  # at TP1 without routed-expert LoRA, which the TP2 model does not have
        imported = run_ranks(_import, tp, str(tmp_path), "GLM_LIKE", tp=tp, routed=False, timeout=400)[0]
        assert (imported - result["logits"]).abs().max().item() <= 1e-5


@pytest.mark.family("glm4_moe", path="export", layout="ModelOpt EP2", check="logits")
@pytest.mark.family("glm4_moe", path="import", layout="ModelOpt EP2", check="logits")
def test_glm4_moe_ep2_export_and_import(tmp_path):
    result = run_ranks(_export, 2, str(tmp_path), "GLM_LIKE", ep=2, timeout=400)[0]
    assert result["diff"] <= 1e-5
    imported = run_ranks(_import, 2, str(tmp_path), "GLM_LIKE", ep=2, timeout=400)[0]
    assert (imported - result["logits"]).abs().max().item() <= 1e-5


def _export_against(rank, world, tmp, name, base_name):
    """Export a `name` model against the HF config of `base_name`, live and offline: the error, and what was
    written."""
    from megatron_peft_export import export_adapter
    from megatron_peft_export.errors import ShapeMismatchError
    from megatron_peft_export.export import ExportOptions
    from megatron_peft_export.offline.export import export_checkpoint
    from tests.support import tiny_deepseek

    cfg, model = _build(name, 1, 1, seed=31)
    base = Path(tmp) / "base"
    tiny_deepseek.hf_config(_config(base_name)).save_pretrained(base)
    _save(rank, model, cfg, Path(tmp) / "save", 1)
    messages = []
    with pytest.raises(ShapeMismatchError) as live:
        export_adapter(model, Path(tmp) / "live", base_model_name_or_path=str(base))
    messages.append(str(live.value))
    with pytest.raises(ShapeMismatchError) as offline:
        options = ExportOptions(base_model_name_or_path=str(base))
        export_checkpoint(str(Path(tmp) / "save"), str(Path(tmp) / "offline"), options=options, quiet=True)
    messages.append(str(offline.value))
    return messages, sorted(p.name for p in Path(tmp).iterdir())


@pytest.mark.family("deepseek_v3", path="export", layout="HF config of glm4_moe", check="refused")
@pytest.mark.family("deepseek_v3", path="offline", layout="HF config of glm4_moe", check="refused")
@pytest.mark.family("glm4_moe", path="export", layout="HF config of deepseek_v3", check="refused")
@pytest.mark.family("glm4_moe", path="offline", layout="HF config of deepseek_v3", check="refused")
@pytest.mark.parametrize("name,base_name", [("DEEPSEEK_LIKE", "GLM_LIKE"), ("GLM_LIKE", "DEEPSEEK_LIKE")])
def test_an_hf_config_of_the_other_family_is_one_error_before_anything_is_written(tmp_path, name, base_name):
    messages, files = run_ranks(_export_against, 1, str(tmp_path), name, base_name, timeout=300)[0]
    assert files == ["base", "save"]  # no adapter directory, no staging left behind
    assert "num_query_groups: Megatron model has" in messages[0]  # offline: the checkpoint's args do not say
    for message in messages:
        assert message.startswith("the HF config does not describe the Megatron model")
        assert "kv_lora_rank: Megatron model has" in message
        assert message.endswith("Pass the base model the adapter was trained on (base_model_name_or_path).")


@pytest.mark.family("deepseek_v3", path="export", layout="Bridge LoRA TP1, EP2, TP2 SP", check="logits")
@pytest.mark.parametrize("world,layout", [(1, {}), (2, {"ep": 2}), (2, {"tp": 2})], ids=["tp1", "ep2", "tp2-sp"])
def test_deepseek_v3_bridge_lora(real_bridge, tmp_path, world, layout):
    """Megatron-Bridge's LoRA wrapping MLA's linears by name, with the dense, shared and routed experts' fc1/fc2."""
    result = run_ranks(_export, world, str(tmp_path), "DEEPSEEK_LIKE", variant="lora", timeout=400, **layout)[0]
    assert result["diff"] <= 1e-5
    assert result["config"]["target_modules"] == MLA_MODULES


DENSE_AND_SHARED_PARAMETERS = sorted(
    f"mlp.{shared}{proj}.weight" for shared in ("", "shared_experts.") for proj in ("down_proj", "gate_proj", "up_proj")
)
CANONICAL_MLP = [
    f"*{mlp}.{linear}"
    for mlp in ("mlp", "shared_experts")
    for linear in ("linear_fc1_up", "linear_fc1_gate", "linear_fc2")
]
"""CanonicalLoRA's split adapters on the dense MLP's and the shared experts' linear_fc1 (up, gate) and their fc2."""


@pytest.mark.family("deepseek_v3", path="export", layout="Bridge CanonicalLoRA TP1, TP2 SP", check="logits")
@pytest.mark.parametrize("world", [1, 2], ids=["tp1", "tp2-sp"])
def test_deepseek_v3_bridge_canonical_lora(real_bridge, tmp_path, world):
    """Megatron-Bridge's CanonicalLoRA on MLA: MLA has no fused linear_qkv, so its linears get CanonicalLoRA's plain
    adapters (one per linear, like LoRA's); the dense MLP's and the shared experts' linear_fc1 get the split up / gate
    adapters."""
    targets = BRIDGE_MLA + CANONICAL_MLP
    result = run_ranks(
        _export, world, str(tmp_path), "DEEPSEEK_LIKE", tp=world, variant="canonical", bridge_targets=targets
    )[0]
    assert result["diff"] <= 1e-5
    assert result["config"]["target_modules"] == MLA_MODULES
    assert result["config"]["target_parameters"] == DENSE_AND_SHARED_PARAMETERS


@pytest.mark.family("deepseek_v3", path="export", layout="Bridge DoRA TP1; TP2 SP (no linear_proj)", check="logits")
@pytest.mark.parametrize("world", [1, 2], ids=["tp1", "tp2-sp"])
def test_deepseek_v3_bridge_dora_on_mla(real_bridge, tmp_path, world):
    """Megatron-Bridge's DoRA on MLA's linears: peft's DoRA (use_dora) on q_a/q_b/kv_a/kv_b(/o)_proj gives Megatron's
    logits. At TP2 the row-parallel linear_proj is left out (Bridge's DoRA norm there is per TP shard: refused, see
    dialects/bridge.py)."""
    targets = BRIDGE_MLA if world == 1 else [m for m in BRIDGE_MLA if m != "linear_proj"]
    result = run_ranks(
        _export, world, str(tmp_path), "DEEPSEEK_LIKE", tp=world, variant="dora", bridge_targets=targets
    )[0]
    assert result["diff"] <= 1e-5
    assert result["config"]["use_dora"] is True
    assert result["config"]["target_modules"] == sorted(m for m in MLA_MODULES if world == 1 or m != "o_proj")


def _refused(rank, world, tmp, variant, targets):
    """The export's error (the same on every rank) and what the output's parent holds after it."""
    from megatron_peft_export import export_adapter
    from tests.support import tiny_deepseek

    cfg, model = _build("DEEPSEEK_LIKE", 1, 1, seed=31, variant=variant, bridge_targets=targets)
    base = Path(tmp) / "base"
    tiny_deepseek.hf_config(cfg).save_pretrained(base)
    try:
        export_adapter(model, Path(tmp) / "live", base_model_name_or_path=str(base))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", sorted(p.name for p in Path(tmp).iterdir())
    return None, sorted(p.name for p in Path(tmp).iterdir())


@pytest.mark.family("deepseek_v3", path="export", layout="Bridge DoRA on dense MLP, shared experts", check="refused")
def test_bridge_dora_on_the_dense_mlp_and_shared_experts_is_refused(real_bridge, tmp_path):
    """transformers 5 models of this family take the dense MLP and the shared experts as peft target_parameters, on
    which peft has no DoRA: refused by name, nothing written."""
    targets = [f"*{mlp}.{linear}" for mlp in ("mlp", "shared_experts") for linear in ("linear_fc1", "linear_fc2")]
    error, files = run_ranks(_refused, 1, str(tmp_path), "dora", BRIDGE_MLA + targets)[0]
    assert files == ["base"]
    assert error.startswith("DialectError: deepseek_v3: found DoRA on linears that a peft adapter of this model holds")
    assert "mlp.gate_proj.weight" in error and "peft has no DoRA on target_parameters" in error


@pytest.mark.family("deepseek_v3", path="export", layout="Bridge CanonicalLoRA on routed experts", check="refused")
def test_bridge_canonical_lora_on_routed_experts_is_refused_in_the_fused_layout(real_bridge, tmp_path):
    """CanonicalLoRA's separate gate and up adapters on a routed expert cannot be one peft adapter of transformers 5's
    fused gate_up_proj (one lora_A for both): refused, naming the modules, nothing written."""
    error, files = run_ranks(_refused, 1, str(tmp_path), "canonical", ["linear_fc1_up", "linear_fc1_gate"])[0]
    assert files == ["base"]
    assert error.startswith("ShapeMismatchError: ")
    assert "mlp.experts.0.gate_proj" in error and "one fused parameter needs one lora_A" in error
