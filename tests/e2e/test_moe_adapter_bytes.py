"""The live MoE paths against an adapter written by safetensors from values computed here: `export_adapter` and the
training hook (its first save with and without `prepare`), per-expert and fused layouts, EP=1 and EP=2, each give the
very bytes `safetensors.torch.save_file` writes for the expected HF tensors. The expected tensors come from the seeded
global LoRA values (tiny_gpt.fill_lora_random's rule) and peft's layouts, not from the package."""

from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
SEED, RANK, FAMILY = 17, 2, "qwen3_moe"
LAYOUTS = ("per_expert", "fused")


def _seeded_lora(layer, e, linear, role, shape):
    """ModelOpt's global LoRA value of one expert linear, as tiny_gpt.fill_lora_random seeds it."""
    from tests.support.tiny_gpt import _seeded

    name = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{linear}.lora_{role}_default.weight"
    return _seeded(f"{SEED}|{name}|{shape}", shape, 0.05)


def _expected(cfg, layout: str, lora=_seeded_lora) -> dict:
    """The HF tensors of LoRA on every routed expert's fc1 (gate and up rows) and fc2; `lora(layer, expert, linear,
    "a" or "b", global shape)` gives each expert's values."""
    import torch

    h, f, r, experts = cfg.hidden_size, cfg.moe_ffn_hidden_size, RANK, cfg.num_experts
    out = {}
    for i in range(cfg.num_layers):
        prefix = f"base_model.model.model.layers.{i}.mlp.experts"
        a1 = [lora(i, e, "linear_fc1", "a", (r, h)) for e in range(experts)]
        b1 = [lora(i, e, "linear_fc1", "b", (2 * f, r)) for e in range(experts)]
        a2 = [lora(i, e, "linear_fc2", "a", (r, f)) for e in range(experts)]
        b2 = [lora(i, e, "linear_fc2", "b", (h, r)) for e in range(experts)]
        if layout == "fused":  # peft: lora_A expert-major rows, lora_B rank-major columns (j * experts + e)
            out[f"{prefix}.base_layer.lora_A.weight"] = torch.cat(a1)
            out[f"{prefix}.base_layer.lora_B.weight"] = torch.stack(b1, 2).reshape(2 * f, r * experts)
            out[f"{prefix}.lora_A.weight"] = torch.cat(a2)
            out[f"{prefix}.lora_B.weight"] = torch.stack(b2, 2).reshape(h, r * experts)
            continue
        for e in range(experts):
            modules = {"gate_proj": (a1[e], b1[e][:f]), "up_proj": (a1[e], b1[e][f:]), "down_proj": (a2[e], b2[e])}
            for module, (a, b) in modules.items():
                out[f"{prefix}.{e}.{module}.lora_A.weight"] = a.clone()
                out[f"{prefix}.{e}.{module}.lora_B.weight"] = b.clone()
    return out


def _exports(rank, world, tmp):
    """export_adapter in both layouts, then one hook per layout (per_expert never prepared, fused prepared), each
    followed by a training step right after its save; all at EP = world."""
    from megatron_peft_export import export_adapter
    from tests.support import tiny_moe
    from tests.support.tiny_gpt import apply_modelopt_lora

    tiny_moe.init_moe_parallel(ep=world)
    model = apply_modelopt_lora(
        tiny_moe.build_moe_gpt(tiny_moe.QWEN3_MOE_LIKE), rank=RANK, targets=tiny_moe.ROUTED_EXPERT_TARGETS
    )
    tiny_moe.fill_moe_lora_random(model, seed=SEED)
    tmp = Path(tmp)
    for layout in LAYOUTS:
        export_adapter(model, tmp / f"export_{layout}", model_type=FAMILY, expert_layout=layout)
    _hook_saves(model, tmp, prepared=("fused",))


def _hook_saves(model, tmp: Path, prepared: tuple[str, ...]) -> None:
    """One hook per layout (prepared or not), each followed by a training step right after its save (every trainable
    parameter changed in place while the export runs), the values put back after each export."""
    import torch

    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from tests.support.hook_loop import checkpoint_dir

    trained = [p for p in model.parameters() if p.requires_grad]
    values = [p.detach().clone() for p in trained]
    for layout in LAYOUTS:
        hook = AdapterExportHook(HookConfig(model_type=FAMILY, expert_layout=layout, subdir=f"hook_{layout}"))
        if layout in prepared:
            hook.prepare(model)
        hook.on_checkpoint_saved(1, checkpoint_dir(tmp / "save", 1), model)
        with torch.no_grad():
            torch._foreach_add_(trained, 1.0)  # the next step, while the export runs
        hook.finalize()
        with torch.no_grad():
            torch._foreach_copy_(trained, values)


@pytest.mark.parametrize("world", [1, 2], ids=["ep1", "ep2"])
def test_live_moe_adapters_are_the_bytes_of_the_expected_tensors(tmp_path, world):
    from safetensors.torch import save_file

    from tests.support.tiny_moe import QWEN3_MOE_LIKE

    run_ranks(_exports, world, str(tmp_path))
    for layout in LAYOUTS:
        reference = tmp_path / f"reference_{layout}.safetensors"
        save_file(_expected(QWEN3_MOE_LIKE, layout), str(reference), metadata={"format": "pt"})
        for written in (tmp_path / f"export_{layout}", tmp_path / "save" / "iter_0000001" / f"hook_{layout}"):
            assert (written / "adapter_model.safetensors").read_bytes() == reference.read_bytes(), written


def _grouped_exports(rank, world, tmp):
    """Megatron-Bridge per-expert LoRA on grouped experts (TEGroupedMLP: one 3-D A and B per linear, local experts on
    the first axis), exported in both layouts at EP = world; returns every rank's expert values by global index."""
    import torch.distributed as dist

    from megatron_peft_export import export_adapter
    from tests.support import tiny_moe
    from tests.support.bridge_grouped_experts import apply_grouped_expert_lora

    tiny_moe.init_moe_parallel(ep=world)
    model = apply_grouped_expert_lora(
        tiny_moe.build_moe_gpt(tiny_moe.QWEN3_MOE_LIKE, grouped_experts=True),
        dim=RANK,
        alpha=4,
        expert_adapters="per_expert",
    )
    tiny_moe.fill_moe_lora_random(model, seed=SEED)
    for layout in LAYOUTS:
        export_adapter(model, Path(tmp) / f"export_{layout}", model_type=FAMILY, expert_layout=layout)
    _hook_saves(model, Path(tmp), prepared=())  # first saves without a walk: the 3-D adapters copied whole, then
    # each expert's slice taken from the copy in the background
    local = tiny_moe.QWEN3_MOE_LIKE.num_experts // world
    values = {}
    for name, p in model.named_parameters():
        parts = name.split(".")  # decoder.layers.<i>.mlp.experts.linear_fc<k>.adapter.linear_<in|out>.weight
        if ".adapter.linear_" in name:
            for e, value in enumerate(p.detach()):
                key = (int(parts[2]), dist.get_rank() * local + e, parts[5], "a" if parts[7] == "linear_in" else "b")
                values[key] = value.clone()
    gathered = [None] * world
    dist.all_gather_object(gathered, values)
    return {k: v for part in gathered for k, v in part.items()}


@pytest.mark.parametrize("world", [1, 2], ids=["ep1", "ep2"])
def test_grouped_expert_adapters_are_the_bytes_of_the_expected_tensors(tmp_path, world):
    """The other expert form: the planner places each local expert's slice of a 3-D grouped adapter, per expert and
    stacked into the fused tensors (export_adapter, and the hook's first save without `prepare`); the expected tensors
    are stacked here from the model's own parameters."""
    from safetensors.torch import save_file

    from tests.support.tiny_moe import QWEN3_MOE_LIKE

    values = run_ranks(_grouped_exports, world, str(tmp_path))[0]
    assert len(values) == QWEN3_MOE_LIKE.num_layers * QWEN3_MOE_LIKE.num_experts * 4

    def lora(layer, e, linear, role, shape):
        value = values[layer, e, linear, role]
        assert tuple(value.shape) == shape, (layer, e, linear, role, value.shape, shape)
        return value

    for layout in LAYOUTS:
        reference = tmp_path / f"reference_{layout}.safetensors"
        save_file(_expected(QWEN3_MOE_LIKE, layout, lora), str(reference), metadata={"format": "pt"})
        for written in (tmp_path / f"export_{layout}", tmp_path / "save" / "iter_0000001" / f"hook_{layout}"):
            assert (written / "adapter_model.safetensors").read_bytes() == reference.read_bytes(), written


def _warm_exports(rank, world, tmp):
    """At EP = world, per_expert: a first export, a warm one (the other rank's report held by the writer, its
    transfer placed by byte copies listed then), one after a step changed every value in place (same walk, new bytes),
    one converted to bfloat16 (placed as views: a conversion is no byte copy), and one after the sender alone walked
    anew (its new report sent again: the writer lacks it)."""
    import torch

    from megatron_peft_export import export_adapter
    from tests.support import tiny_moe
    from tests.support.tiny_gpt import apply_modelopt_lora

    tiny_moe.init_moe_parallel(ep=world)
    model = apply_modelopt_lora(
        tiny_moe.build_moe_gpt(tiny_moe.QWEN3_MOE_LIKE), rank=RANK, targets=tiny_moe.ROUTED_EXPERT_TARGETS
    )
    tiny_moe.fill_moe_lora_random(model, seed=SEED)
    tmp = Path(tmp)

    def export(name, **options):
        export_adapter(model, tmp / name, model_type=FAMILY, expert_layout="per_expert", **options)

    export("first")
    export("warm")
    trained = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        torch._foreach_add_(trained, 1.0)
    export("stepped")
    export("bf16", dtype="bfloat16")
    if rank == world - 1:  # new storage: this rank's cached walk is stale, the others' still current
        trained[0].data = trained[0].data.clone()
    export("rewalked")


@pytest.mark.parametrize("world", [1, 2], ids=["ep1", "ep2"])
def test_warm_live_moe_exports_are_the_bytes_of_the_expected_tensors(tmp_path, world):
    import torch
    from safetensors.torch import save_file

    from tests.support.tiny_moe import QWEN3_MOE_LIKE

    run_ranks(_warm_exports, world, str(tmp_path))

    def stepped(*args):
        return _seeded_lora(*args) + 1.0

    expected = {
        "first": _expected(QWEN3_MOE_LIKE, "per_expert"),
        "stepped": _expected(QWEN3_MOE_LIKE, "per_expert", stepped),
    }
    expected["warm"] = expected["first"]
    expected["rewalked"] = expected["stepped"]
    expected["bf16"] = {k: v.to(torch.bfloat16) for k, v in expected["stepped"].items()}
    for name, tensors in expected.items():
        reference = tmp_path / f"reference_{name}.safetensors"
        save_file(tensors, str(reference), metadata={"format": "pt"})
        assert (tmp_path / name / "adapter_model.safetensors").read_bytes() == reference.read_bytes(), name
