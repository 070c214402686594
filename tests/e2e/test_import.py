"""HF adapter -> Megatron: round trips across layouts, and clear errors on every rank."""

import json
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _export_at(rank, world, tmp, tp, pp, variant="modelopt", targets=None):
    from megatron_peft_export import export_adapter
    from tests.support.tiny_gpt import (
        TinyGPTConfig,
        build_gpt,
        fill_lora_random,
        init_parallel,
        megatron_logits,
        sample_tokens,
    )

    cfg = TinyGPTConfig()
    init_parallel(tp, pp)
    model = _with_adapter(build_gpt(cfg), variant, targets)
    fill_lora_random(model, seed=21)
    export_adapter(model, Path(tmp) / "original")
    return megatron_logits(model, sample_tokens(cfg))


def _with_adapter(model, variant, targets=None):
    """ModelOpt LoRA, or Megatron-Bridge's own LoRA / DoRA (DoRA on column-parallel linears: it is refused on
    row-parallel ones at TP > 1)."""
    from tests.support import real_bridge
    from tests.support.tiny_gpt import apply_modelopt_lora

    if variant == "modelopt":
        return apply_modelopt_lora(model)
    if variant == "dora" and targets is None:
        targets = ("linear_qkv", "linear_fc1")
    return real_bridge.apply(model, variant, dim=8, alpha=16, target_modules=targets)


def _import_at(rank, world, tmp, tp, pp, variant="modelopt", source="original"):
    from megatron_peft_export import export_adapter, load_hf_adapter
    from tests.support.tiny_gpt import (
        TinyGPTConfig,
        build_gpt,
        fill_lora_random,
        init_parallel,
        megatron_logits,
        sample_tokens,
    )

    cfg = TinyGPTConfig()
    init_parallel(tp, pp)
    model = _with_adapter(build_gpt(cfg), variant)
    fill_lora_random(model, seed=99)  # different values: the import must overwrite every one
    load_hf_adapter(model, Path(tmp) / source)
    export_adapter(model, Path(tmp) / f"again_tp{tp}_pp{pp}")
    return megatron_logits(model, sample_tokens(cfg))


def _same_files(a: Path, b: Path):
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and (x[k] == y[k]).all() for k in x)
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())


@pytest.mark.family("llama", path="import", layout="ModelOpt, Bridge LoRA, DoRA: TP2 to TP1, PP2", check="logits")
@pytest.mark.parametrize("variant", ["modelopt", "lora", "dora"])
def test_round_trip_tp2_to_tp1_and_pp2(request, tmp_path, variant):
    import torch

    if variant != "modelopt":
        request.getfixturevalue("real_bridge")

    original = run_ranks(_export_at, 2, str(tmp_path), 2, 1, variant)[0]
    for tp, pp in ((1, 1), (1, 2)):
        logits = run_ranks(_import_at, tp * pp, str(tmp_path), tp, pp, variant)[0]
        _same_files(tmp_path / "original", tmp_path / f"again_tp{tp}_pp{pp}")
        assert torch.allclose(logits, original, atol=1e-5, rtol=0), (logits - original).abs().max()


def _import_dora_at_tp2(rank, world, tmp):
    from tests.support.tiny_gpt import TinyGPTConfig, build_gpt, init_parallel

    init_parallel(world)
    return _load_error(
        _with_adapter(build_gpt(TinyGPTConfig()), "dora", ("linear_qkv", "linear_proj")), Path(tmp) / "original"
    )


def test_dora_is_not_imported_into_row_parallel_bridge_dora_at_tp2(real_bridge, tmp_path):
    """The model would compute another function than the file's adapter (each TP rank normalizes by its own columns)."""
    run_ranks(
        _export_at, 1, str(tmp_path), 1, 1, "dora", ("linear_qkv", "linear_proj")
    )  # exported at TP1: fits the model
    results = run_ranks(_import_dora_at_tp2, 2, str(tmp_path))
    assert results[0] == results[1]
    assert results[0].startswith(
        "DialectError: found Megatron-Bridge DoRA on row-parallel linears at tensor-parallel size 2: "
        "decoder.layers.{0..3}.self_attention.linear_proj."
    ), results[0]


def _load_error(model, directory: Path, **kwargs) -> str:
    """ "ok", or the error load_hf_adapter raised on this rank (the tests compare it across ranks)."""
    from megatron_peft_export import ExportError, load_hf_adapter

    try:
        load_hf_adapter(model, directory, **kwargs)
        return "ok"
    except ExportError as exc:
        return f"{type(exc).__name__}: {exc}"


def _import_error(rank, world, tmp, edit):
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, init_parallel

    init_parallel(world)
    return _load_error(
        apply_modelopt_lora(build_gpt(TinyGPTConfig()), rank=4 if edit == "rank" else 8), Path(tmp) / "original"
    )


def _edit_adapter(directory: Path, edit: str):
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "adapter_model.safetensors")
    if edit == "unfused_a":
        key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
        tensors[key] = tensors[key] + 1
    if edit == "missing":
        del tensors["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"]
    save_file(tensors, directory / "adapter_model.safetensors")
    if edit == "alpha":
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 32}))


@pytest.mark.parametrize(
    "edit,message",
    [
        ("rank", "the model expects shape (4, 64), the file has (8, 64)"),
        ("missing", "needs 1 tensor(s) the file lacks"),
        ("alpha", "the adapter scales by 4, the model's adapter by 2"),
        ("unfused_a", "k_proj.lora_A.weight and base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight differ"),
    ],
)
def test_mismatches_fail_on_every_rank(tmp_path, edit, message):
    run_ranks(_export_at, 2, str(tmp_path), 2, 1)
    _edit_adapter(tmp_path / "original", edit)
    results = run_ranks(_import_error, 2, str(tmp_path), edit)
    assert results[0] == results[1]
    assert message in results[0], results[0]


# ------------------------------------------------------------------ mixture of experts

SHARED_TARGETS = ("*linear_qkv*", "*linear_proj*", "*.shared_experts.linear_fc1", "*.shared_experts.linear_fc2")
MOE_TARGETS = SHARED_TARGETS + ("*.local_experts.*.linear_fc1", "*.local_experts.*.linear_fc2")


def _moe_model(ep, seed, tp=1, routed=True):
    """A Qwen2-MoE-like megatron model with ModelOpt LoRA on attention, the shared expert and (`routed`) the routed
    experts.

    TP > 1 runs with sequence parallelism, where ModelOpt's LoRA on routed experts does not run (test_export_moe)."""
    from tests.support import tiny_moe

    tiny_moe.init_moe_parallel(tp=tp, ep=ep)
    model = tiny_moe.build_moe_gpt(tiny_moe.QWEN2_MOE_LIKE, sequence_parallel=tp > 1)
    model = tiny_moe.apply_modelopt_lora(model, targets=MOE_TARGETS if routed else SHARED_TARGETS)
    tiny_moe.fill_moe_lora_random(model, seed=seed)
    return model


def _lora_by_global_name(model):
    from tests.support.tiny_gpt import _global_name

    return {_global_name(model, name): p.detach().clone() for name, p in model.named_parameters() if "lora" in name}


ORIGINAL_SEED = 21


def _moe_export_at(rank, world, tmp, expert_layout, tp=1, routed=True):
    from megatron_peft_export import export_adapter
    from tests.support import tiny_moe

    model = _moe_model(world // tp, seed=ORIGINAL_SEED, tp=tp, routed=routed)
    export_adapter(model, Path(tmp) / expert_layout, model_type="qwen2_moe", expert_layout=expert_layout)
    return tiny_moe.megatron_moe_logits(model, tiny_moe.sample_tokens(tiny_moe.QWEN2_MOE_LIKE))


def _moe_import_at(rank, world, tmp, source, tp=1, routed=True):
    """Logits after the import, and the LoRA tensors of this rank that differ from the original's slice of them.

    The harness's LoRA values are a function of the seed and the global tensor (any layout), so refilling with the
    original's seed gives what this rank must hold."""
    import torch

    from megatron_peft_export import load_hf_adapter
    from tests.support import tiny_moe

    model = _moe_model(
        world // tp, seed=99, tp=tp, routed=routed
    )  # different values: the import must overwrite every one
    load_hf_adapter(model, Path(tmp) / source, model_type="qwen2_moe")
    logits = tiny_moe.megatron_moe_logits(model, tiny_moe.sample_tokens(tiny_moe.QWEN2_MOE_LIKE))
    loaded = _lora_by_global_name(model)
    tiny_moe.fill_moe_lora_random(model, seed=ORIGINAL_SEED)
    original = _lora_by_global_name(model)
    return logits, sorted(original), [k for k in original if not torch.equal(loaded[k], original[k])]


@pytest.mark.family("qwen2_moe", path="import", layout="ModelOpt EP2 to EP1, EP2", check="logits")
@pytest.mark.parametrize("expert_layout", ["fused", "per_expert"])
def test_moe_round_trip_ep2_to_ep1_and_ep2(tmp_path, expert_layout):
    """Routed experts (global numbering, either HF layout), shared expert and attention come back bit for bit."""
    logits = run_ranks(_moe_export_at, 2, str(tmp_path), expert_layout)[0]
    for ep in (1, 2):
        imported = run_ranks(_moe_import_at, ep, str(tmp_path), expert_layout)
        names = {k for _, rank_names, _ in imported for k in rank_names}
        assert sum(".local_experts." in k for k in names) == 4 * 4 * 2 * 2 and any(
            ".shared_experts." in k for k in names
        )
        assert [differ for _, _, differ in imported] == [[]] * ep
        assert (imported[0][0] - logits).abs().max().item() <= 1e-5


@pytest.mark.family("qwen2_moe", path="import", layout="ModelOpt TP1 to TP2 SP", check="logits")
def test_shared_expert_round_trip_tp1_to_tp2_with_sequence_parallelism(tmp_path):
    """The shared expert's fc1 comes back [gate_t; up_t] per TP rank; attention and shared expert only (see
    _moe_model)."""
    logits = run_ranks(_moe_export_at, 1, str(tmp_path), "fused", routed=False)[0]
    imported = run_ranks(_moe_import_at, 2, str(tmp_path), "fused", tp=2, routed=False)
    assert any(".shared_experts.linear_fc1" in k for k in imported[0][1])
    assert [differ for _, _, differ in imported] == [[], []]
    assert (imported[0][0] - logits).abs().max().item() <= 1e-5


def _moe_import_error(rank, world, tmp, source):
    return _load_error(_moe_model(world, seed=99), Path(tmp) / source, model_type="qwen2_moe")


def _edit_moe_adapter(directory: Path, edit: str):
    """`extra_expert`: expert 4's tensors added to a per-expert adapter; `three_experts`: a fused adapter cut to experts
    0..2."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "adapter_model.safetensors")
    if edit == "extra_expert":
        tensors.update(
            {k.replace(".experts.0.", ".experts.4."): v.clone() for k, v in tensors.items() if ".experts.0." in k}
        )
    if edit == "three_experts":
        r = json.loads((directory / "adapter_config.json").read_text())["r"]
        for k in [k for k in tensors if ".mlp.experts." in k]:
            t = tensors[k]
            tensors[k] = (
                t[: 3 * r].clone() if ".lora_A." in k else t.unflatten(1, (r, 4))[..., :3].flatten(1).contiguous()
            )
    save_file(tensors, directory / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "layout,edit,message",
    [
        (
            "per_expert",
            "extra_expert",
            "the file adapts experts [4], the Megatron model has 4 experts (0..3); load it into a model with the "
            "expert count",
        ),
        (
            "fused",
            "three_experts",
            "model.layers.0.mlp.experts.gate_up_proj: the adapter holds 3 experts (lora_A [24, 64], lora_B [64, "
            "24], r 8), "
            "the Megatron model has 4 experts; load it into a model with the expert count",
        ),
    ],
)
def test_moe_adapter_mismatches_fail_on_every_rank(tmp_path, layout, edit, message):
    run_ranks(_moe_export_at, 2, str(tmp_path), layout)
    _edit_moe_adapter(tmp_path / layout, edit)
    results = run_ranks(_moe_import_error, 2, str(tmp_path), layout)
    assert results[0] == results[1]
    assert message in results[0], results[0]
