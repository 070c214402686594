"""Megatron-Bridge LoRA on MoE models: exported under EP, TP x EP with sequence parallelism and expert TP, loaded by
peft
into transformers v5 MoE models (top-2 of 4 experts per token), matching Megatron's logits; the layouts Bridge computes
something else for are refused.

Bridge's own LoRA (tests/support/real_bridge.py) adapts attention, the router, shared experts and SequentialMLP experts;
grouped experts (megatron's TEGroupedMLP, CPU grouped linears) get the reproduction of Bridge's grouped-expert adapters
(tests/support/bridge_grouped_experts.py: they need Transformer Engine and a newer Bridge than the one that imports
here)."""

import json
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
ATTENTION_AND_EXPERTS = ("linear_qkv", "linear_fc1", "linear_fc2")
EXPERT_LINEARS = ("linear_fc1", "linear_fc2")


def _adapt(model, targets, expert_adapters, grouped, dim=8, alpha=16):
    """Bridge's LoRA on `targets`; on a grouped-experts model the expert linears among them get the grouped-expert
    reproduction,
    and every other module of that name (a shared expert's) Bridge's own LoRA."""
    from tests.support import real_bridge
    from tests.support.bridge_grouped_experts import apply_grouped_expert_lora

    real = list(targets)
    if grouped:
        real = [t for t in targets if t not in EXPERT_LINEARS] + [
            f"*.shared_experts.{t}" for t in targets if t in EXPERT_LINEARS
        ]
        apply_grouped_expert_lora(
            model,
            expert_adapters=expert_adapters,
            dim=dim,
            alpha=alpha,
            targets=[t for t in targets if t in EXPERT_LINEARS],
        )
    if real:
        real_bridge.apply(model, "lora", dim=dim, alpha=alpha, target_modules=real)
    return model


def _export(
    rank,
    world,
    tmp,
    expert_adapters,
    family="mixtral",
    tp=1,
    ep=1,
    etp=None,
    sp=False,
    targets=ATTENTION_AND_EXPERTS,
    refused=False,
    grouped=True,
):
    from megatron_peft_export import ExportError, export_adapter
    from tests.support import tiny_moe

    cfg = {"qwen3_moe": tiny_moe.QWEN3_MOE_LIKE, "qwen2_moe": tiny_moe.QWEN2_MOE_LIKE}.get(
        family, tiny_moe.MIXTRAL_LIKE
    )
    tiny_moe.init_moe_parallel(tp=tp, ep=ep, etp=etp)
    model = _adapt(
        tiny_moe.build_moe_gpt(cfg, sequence_parallel=sp, grouped_experts=grouped), targets, expert_adapters, grouped
    )
    tiny_moe.fill_moe_lora_random(model, seed=23)
    if refused:
        try:
            export_adapter(model, Path(tmp) / "adapter", model_type=family)
        except ExportError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "exported"
    tokens = tiny_moe.sample_tokens(cfg)
    logits = tiny_moe.megatron_moe_logits(model, tokens)
    base = Path(tmp) / "base"
    if rank == 0:
        tiny_moe.hf_moe_twin(cfg, family).config.save_pretrained(base)
    out = export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(base))
    if rank != 0:
        return None
    config = json.loads((out / "adapter_config.json").read_text())
    return {"config": config, "diff": tiny_moe.compare_moe_peft(out, cfg, tokens, logits, family=family)}


def _check(result, target_modules, target_parameters):
    print(f"max|diff| {result['diff']:.2e}")
    assert result["diff"] <= 1e-5
    assert result["config"]["target_modules"] == target_modules
    assert result["config"]["target_parameters"] == target_parameters


@pytest.mark.family("mixtral", path="export", layout="Bridge grouped experts EP1, EP2", check="logits")
@pytest.mark.parametrize("expert_adapters", ["shared", "per_expert", "shared_outer"])
@pytest.mark.parametrize("world,layout", [(1, {}), (2, {"ep": 2})], ids=["ep1", "ep2"])
def test_grouped_expert_adapters_match_megatron_logits(real_bridge, tmp_path, expert_adapters, world, layout):
    """Per-expert values differ by GLOBAL expert (a wrong expert numbering under EP changes the logits)."""
    result = run_ranks(_export, world, str(tmp_path), expert_adapters, **layout)[0]
    _check(result, ["k_proj", "q_proj", "v_proj"], ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])


@pytest.mark.parametrize("expert_adapters", ["shared", "per_expert"])
def test_tp2_ep2_sequence_parallel_with_expert_lora(real_bridge, tmp_path, expert_adapters):
    """4 ranks: TP2 x EP2 (expert TP 1, so experts are replicated over expert DP 2: one replica is exported)."""
    result = run_ranks(_export, 4, str(tmp_path), expert_adapters, family="qwen3_moe", tp=2, ep=2, etp=1, sp=True)[0]
    _check(result, ["k_proj", "q_proj", "v_proj"], ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])


@pytest.mark.parametrize(
    "world,layout,targets",
    [
        (2, {"ep": 2}, ATTENTION_AND_EXPERTS),
        (4, {"tp": 2, "ep": 2, "etp": 1, "sp": True}, ATTENTION_AND_EXPERTS),
        (2, {"tp": 2, "etp": 2, "sp": True}, ("linear_qkv", "linear_fc1")),
    ],
    ids=["ep2", "tp2xep2-sp", "tp2-etp2-sp-fc1"],
)
def test_bridge_lora_on_sequential_mlp_experts(real_bridge, tmp_path, world, layout, targets):
    """SequentialMLP experts: Bridge's ordinary adapter on each expert linear, on the expert-TP group (fc1's B [gate_t;
    up_t] per expert-TP rank)."""
    result = run_ranks(
        _export, world, str(tmp_path), "shared", family="qwen3_moe", grouped=False, targets=targets, **layout
    )[0]
    _check(
        result,
        ["k_proj", "q_proj", "v_proj"],
        ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        if "linear_fc2" in targets
        else ["mlp.experts.gate_up_proj"],
    )


@pytest.mark.parametrize(
    "expert_adapters,world,layout",
    [
        ("per_expert", 2, {"tp": 2, "etp": 2, "sp": True}),
        ("shared", 4, {"ep": 2, "etp": 2}),
    ],
    ids=["per-expert-tp2-etp2-sp", "shared-ep2-etp2"],
)
def test_expert_tp2_gated_fc1(real_bridge, tmp_path, expert_adapters, world, layout):
    """Each expert-TP rank's fc1 LoRA B is [gate_t; up_t]: concatenating the ranks' B ([g0; u0; g1; u1]) fails this."""
    result = run_ranks(
        _export,
        world,
        str(tmp_path),
        expert_adapters,
        family="qwen3_moe",
        targets=("linear_qkv", "linear_fc1"),
        **layout,
    )[0]
    _check(result, ["k_proj", "q_proj", "v_proj"], ["mlp.experts.gate_up_proj"])


@pytest.mark.family("mixtral", path="export", layout="Bridge router EP1", check="logits")
@pytest.mark.family("qwen3_moe", path="export", layout="Bridge router TP2", check="logits")
@pytest.mark.parametrize(
    "family,world,layout", [("mixtral", 1, {}), ("qwen3_moe", 2, {"tp": 2})], ids=["mixtral-ep1", "qwen3-tp2"]
)
def test_router_lora_matches_megatron_logits(real_bridge, tmp_path, family, world, layout):
    """Router LoRA alone (only routing changes), as peft target_parameters on transformers v5's router weight."""
    result = run_ranks(_export, world, str(tmp_path), "shared", family=family, targets=("router",), **layout)[0]
    _check(result, [], ["mlp.gate.weight"])


@pytest.mark.parametrize(
    "world,layout", [(2, {"ep": 2}), (4, {"tp": 2, "ep": 2, "etp": 1, "sp": True})], ids=["ep2", "tp2xep2-sp"]
)
def test_shared_expert_lora_with_grouped_expert_lora(real_bridge, tmp_path, world, layout):
    """Qwen2-MoE: Bridge LoRA on the shared expert (a dense MLP over TP) next to per-expert LoRA on the grouped
    experts; the shared expert's linears as 2-D target parameters in the fused layout (peft 0.22 maps gate_proj /
    up_proj / down_proj target modules of qwen2_moe onto the fused routed experts)."""
    result = run_ranks(
        _export, world, str(tmp_path), "per_expert", family="qwen2_moe", targets=("linear_fc1", "linear_fc2"), **layout
    )[0]
    _check(
        result,
        [],
        [
            "mlp.experts.down_proj",
            "mlp.experts.gate_up_proj",
            "mlp.shared_expert.down_proj.weight",
            "mlp.shared_expert.gate_proj.weight",
            "mlp.shared_expert.up_proj.weight",
        ],
    )


def test_router_and_per_expert_lora_together(real_bridge, tmp_path):
    result = run_ranks(
        _export,
        2,
        str(tmp_path),
        "per_expert",
        family="qwen3_moe",
        ep=2,
        targets=("router", "linear_fc1", "linear_fc2"),
    )[0]
    _check(result, [], ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"])


PARTIAL_SUMS = "found Megatron-Bridge LoRA on row-parallel linears that return partial sums for their caller to reduce"


@pytest.mark.parametrize(
    "world,layout,targets,expected",
    [
        (
            2,
            {"tp": 2, "etp": 2, "sp": True},
            ("linear_fc2",),
            f"{PARTIAL_SUMS} (expert linear_fc2 with explicit expert communication) at "
            "tensor-parallel size 2: decoder.layers.{0..3}.mlp.experts.local_experts.*.linear_fc2. ",
        ),
        (
            2,
            {"tp": 2, "etp": 2, "sp": True, "grouped": False},
            ("linear_fc2",),
            f"{PARTIAL_SUMS} (expert linear_fc2 with explicit expert "
            "communication) at tensor-parallel size 2: "
            "decoder.layers.{0..3}.mlp.experts.local_experts.{0..3}.linear_fc2. ",
        ),
        (
            2,
            {"tp": 2, "etp": 1, "sp": True},
            ("router",),
            "found Megatron-Bridge LoRA on the MoE router at tensor-parallel size 2 with sequence "
            "parallelism: decoder.layers.{0..3}.mlp.router. ",
        ),
    ],
    ids=["expert-fc2-etp2", "sequential-expert-fc2-etp2", "router-tp2-sp"],
)
def test_layouts_where_bridge_computes_no_lora_are_refused(real_bridge, tmp_path, world, layout, targets, expected):
    results = run_ranks(_export, world, str(tmp_path), "shared", targets=targets, refused=True, **layout)
    assert results[0] == results[1]
    assert results[0].startswith(f"DialectError: {expected}"), results[0]
    assert not (tmp_path / "adapter").exists()


def _fc2_etp2(rank, world):
    """Bridge's own LoRA on a SequentialMLP expert's linear_fc2 at expert TP 2: what the token dispatcher's sum over
    expert TP makes of it."""
    import torch
    import torch.distributed as dist

    from tests.support import tiny_moe

    tiny_moe.init_moe_parallel(tp=2, etp=2)
    model = _adapt(
        tiny_moe.build_moe_gpt(tiny_moe.MIXTRAL_LIKE, sequence_parallel=True), ("linear_fc2",), "shared", False
    )
    tiny_moe.fill_moe_lora_random(model, seed=3)
    adapter = model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc2.adapter
    x = torch.randn(
        5, 32, generator=torch.Generator().manual_seed(0)
    )  # one expert's tokens, full ffn; rank t holds columns t
    a, b = adapter.linear_in.weight.detach(), adapter.linear_out.weight.detach()
    with torch.no_grad():
        y = adapter(x.chunk(2, dim=1)[rank].contiguous())
    dist.all_reduce(y)  # the token dispatcher sums the expert-TP ranks' outputs
    parts = [torch.empty_like(t) for t in (a, a, b, b)]
    dist.all_gather(parts[:2], a.contiguous())
    dist.all_gather(parts[2:], b.contiguous())
    scale = adapter.alpha / adapter.dim
    lora = scale * x @ torch.cat(parts[:2], 1).T @ torch.cat(parts[2:], 0).T
    block_diagonal = 2 * scale * torch.cat([x.chunk(2, 1)[t] @ parts[t].T @ parts[2 + t].T for t in range(2)], dim=1)
    return (y - block_diagonal).abs().max().item(), (y - lora).abs().max().item()


def test_why_bridge_lora_on_expert_fc2_at_expert_tp2_is_refused(real_bridge):
    """Summed over expert TP, Bridge's adapter gives 2 x blockdiag(B_t A_t) x, not B A x (its A's partial output is
    never reduced)."""
    for to_block_diagonal, to_lora in run_ranks(_fc2_etp2, 2):
        assert to_block_diagonal < 1e-5 and to_lora > 1e-2, (to_block_diagonal, to_lora)


def _round_trip(rank, world, tmp, load_into, expert_layout="per_expert", targets=("linear_fc1",)):
    """Export per-expert adapters (experts differ) in `expert_layout` and load them into a model with `load_into` expert
    adapters."""
    from megatron_peft_export import ExportError, export_adapter, load_hf_adapter
    from tests.support import tiny_moe

    cfg = tiny_moe.MIXTRAL_LIKE
    tiny_moe.init_moe_parallel(ep=world)
    source, target = (
        _adapt(tiny_moe.build_moe_gpt(cfg, grouped_experts=True), targets, kind, True)
        for kind in ("per_expert", load_into)
    )
    tiny_moe.fill_moe_lora_random(source, seed=5)
    export_adapter(source, Path(tmp) / "adapter", model_type="mixtral", expert_layout=expert_layout)
    try:
        load_hf_adapter(target, Path(tmp) / "adapter", model_type="mixtral")
    except ExportError as exc:
        return f"{type(exc).__name__}: {exc}"
    loaded = dict(target.named_parameters())
    return all(p.equal(loaded[k]) for k, p in source.named_parameters() if ".adapter." in k)


def test_import_fills_per_expert_adapters_and_refuses_differing_experts_for_a_shared_one(tmp_path):
    assert run_ranks(_round_trip, 2, str(tmp_path / "per_expert"), "per_expert") == [True, True]
    results = run_ranks(_round_trip, 2, str(tmp_path / "shared"), "shared")
    assert (
        results[0] == results[1]
        and "have different lora_A in the adapter, but the model holds one for both" in results[0]
    ), results[0]


def test_import_of_the_fused_layout_with_router_lora_gives_every_tensor_back(real_bridge, tmp_path):
    """peft's v5 layout: experts fused into 3-D target parameters, the router's weight a 2-D one."""
    assert run_ranks(_round_trip, 2, str(tmp_path), "per_expert", "fused", ("router", "linear_fc1", "linear_fc2")) == [
        True,
        True,
    ]


def _save_and_export_live(
    rank, world, tmp, expert_adapters, ep=1, etp=None, targets=("linear_fc1", "linear_fc2"), live=True
):
    """Export live (unless not `live`), and save the adapters (as Bridge does: adapter keys only) in a torch_dist
    checkpoint with Bridge's run_config."""
    import torch.distributed as dist
    import yaml
    from megatron.core import dist_checkpointing

    from megatron_peft_export import export_adapter
    from megatron_peft_export.io.checkpoints import TRACKER, iteration_dir
    from tests.support import tiny_moe
    from tests.support.bridge_grouped_experts import apply_grouped_expert_lora
    from tests.support.training import _in_process_write_results, _may_fork

    cfg = tiny_moe.MIXTRAL_LIKE
    tiny_moe.init_moe_parallel(ep=ep, etp=etp)
    model = apply_grouped_expert_lora(
        tiny_moe.build_moe_gpt(cfg, grouped_experts=True),
        dim=8,
        alpha=16,
        targets=targets,
        expert_adapters=expert_adapters,
    )
    tiny_moe.fill_moe_lora_random(model, seed=29)
    if live:
        export_adapter(model, Path(tmp) / "live", model_type="mixtral")
    directory = iteration_dir(Path(tmp) / "save", 3)
    directory.mkdir(parents=True, exist_ok=True)
    adapters = {k: v for k, v in model.sharded_state_dict().items() if ".adapter." in k}
    _in_process_write_results()
    with _may_fork():
        dist_checkpointing.save({"model": adapters, "iteration": 3}, str(directory))
    if rank == 0:
        run_config = {
            "model": {
                "num_layers": cfg.num_layers,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_query_groups": cfg.num_query_groups,
                "kv_channels": cfg.kv_channels,
                "ffn_hidden_size": cfg.ffn_hidden_size,
                "gated_linear_unit": True,
                "tensor_model_parallel_size": 1,
                "num_moe_experts": cfg.num_experts,
                "moe_ffn_hidden_size": cfg.moe_ffn_hidden_size,
                "expert_tensor_parallel_size": etp or 1,
            },
            "peft": {"_target_": "megatron.bridge.peft.lora.LoRA", "dim": 8, "alpha": 16},
        }
        (directory / "run_config.yaml").write_text(yaml.safe_dump(run_config))
        (Path(tmp) / "save" / TRACKER).write_text("3")
    dist.barrier()


def _offline(rank, world, checkpoint, out):
    from megatron_peft_export import ExportError
    from megatron_peft_export.export import ExportOptions
    from megatron_peft_export.offline.export import export_checkpoint

    try:
        export_checkpoint(checkpoint, out, options=ExportOptions(model_type="mixtral"), quiet=True)
    except ExportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "exported"


@pytest.mark.parametrize(
    "expert_adapters,world,layout",
    [
        ("shared", 2, {"ep": 2}),
        ("per_expert", 2, {"ep": 2}),
        ("shared_outer", 2, {"ep": 2}),
        ("shared", 4, {"ep": 2, "etp": 2, "targets": ("linear_fc1",)}),
        ("per_expert", 4, {"ep": 2, "etp": 2, "targets": ("linear_fc1",)}),
    ],
    ids=["shared-ep2", "per-expert-ep2", "shared-outer-ep2", "shared-ep2-etp2", "per-expert-ep2-etp2"],
)
def test_offline_export_of_bridge_expert_adapters_equals_the_live_export(tmp_path, expert_adapters, world, layout):
    import torch
    from safetensors.torch import load_file

    run_ranks(_save_and_export_live, world, str(tmp_path), expert_adapters, **layout)
    assert run_ranks(_offline, 1, str(tmp_path / "save"), str(tmp_path / "offline")) == ["exported"]
    live, offline = (
        load_file(tmp_path / "live" / "adapter_model.safetensors"),
        load_file(tmp_path / "offline" / "adapter_model.safetensors"),
    )
    assert live.keys() == offline.keys() and all(torch.equal(live[k], offline[k]) for k in live)
    assert any("mlp.experts" in k for k in live)
    assert json.loads((tmp_path / "live" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "offline" / "adapter_config.json").read_text()
    )


def test_offline_export_refuses_bridge_expert_fc2_saved_at_expert_tp2(tmp_path):
    """What the live export refuses (expert fc2 at expert TP 2: the model computed 2 x a block-diagonal update) is not
    exported from the checkpoint either."""
    run_ranks(_save_and_export_live, 4, str(tmp_path), "per_expert", ep=2, etp=2, live=False)
    message = run_ranks(_offline, 1, str(tmp_path / "save"), str(tmp_path / "offline"))[0]
    assert message.startswith(
        f"DialectError: {tmp_path / 'save' / 'iter_0000003'}: {PARTIAL_SUMS} (expert linear_fc2 with explicit expert "
        "communication) at tensor-parallel size 2: decoder.layers.{0..3}.mlp.experts.local_experts.{0..3}.linear_fc2. "
    ), message
    assert not (tmp_path / "offline").exists()
