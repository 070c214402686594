"""bridge_grouped_experts.py reproduces Megatron-Bridge's LoRA on grouped MoE experts: names, shapes and TP axes, and
what
its expert fc2 at expert TP > 1 computes (BRIDGE_FACTS.md). The rest goes through export in
tests/e2e/test_export_bridge_moe.py.

All torch work runs in forked gloo ranks (multiprocess.run_ranks); the parent only compares what the ranks return.
"""

import pytest
import torch

from tests.support.multiprocess import run_ranks

DIM, ALPHA = 8, 16


def _expert_names_rank(rank, world_size, expert_adapters, layout):
    from tests.support import tiny_moe
    from tests.support.bridge_grouped_experts import apply_grouped_expert_lora

    tiny_moe.init_moe_parallel(**layout)
    model = tiny_moe.build_moe_gpt(tiny_moe.MIXTRAL_LIKE, grouped_experts=True)
    apply_grouped_expert_lora(model, dim=DIM, alpha=ALPHA, expert_adapters=expert_adapters)
    return {
        name.removeprefix("decoder.layers.0.mlp."): (
            tuple(p.shape),
            getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None,
        )
        for name, p in model.named_parameters()
        if name.startswith("decoder.layers.0.mlp.") and ".adapter." in name
    }


# hidden 64, moe ffn 32 (fc1 out 64), 4 experts; EP2 x ETP2: 2 local experts, expert TP 2
_EXPERT_SHAPES = {
    "shared": {
        "experts.linear_fc1.adapter.linear_in.weight": ((DIM // 2, 64), 0),
        "experts.linear_fc1.adapter.linear_out.weight": ((64 // 2, DIM), 0),
        "experts.linear_fc2.adapter.linear_in.weight": ((DIM, 32 // 2), 1),
        "experts.linear_fc2.adapter.linear_out.weight": ((64 // 2, DIM), 0),
    },
    "per_expert": {
        "experts.linear_fc1.adapter.linear_in.weight": ((2, DIM // 2, 64), 1),
        "experts.linear_fc1.adapter.linear_out.weight": ((2, 64 // 2, DIM), 1),
        "experts.linear_fc2.adapter.linear_in.weight": ((2, DIM, 32 // 2), 2),
        "experts.linear_fc2.adapter.linear_out.weight": ((2, 64 // 2, DIM), 1),
    },
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("expert_adapters", ["shared", "per_expert"])
def test_grouped_expert_adapter_names_shapes_and_tp_axes_at_ep2_etp2(expert_adapters):
    for names in run_ranks(_expert_names_rank, 4, expert_adapters, {"ep": 2, "etp": 2}):
        assert names == _EXPERT_SHAPES[expert_adapters]


@pytest.mark.timeout(300)
def test_shared_outer_names_and_shapes_at_ep2():
    names = run_ranks(_expert_names_rank, 2, "shared_outer", {"ep": 2})[0]
    assert names == {
        "experts.linear_fc1.adapter.linear_in.weight": (
            (DIM, 64),
            0,
        ),  # shared A: a ColumnParallelLinear over expert TP (1)
        "experts.linear_fc1.adapter.linear_out.weight": ((2, 64, DIM), None),  # per-expert B: no TP attributes
        "experts.linear_fc2.adapter.linear_in.weight": ((2, DIM, 32), None),
        "experts.linear_fc2.adapter.linear_out.weight": ((64, DIM), 1),  # shared B: a RowParallelLinear
    }


def _fc2_etp2_rank(rank, world_size, expert_adapters):
    import torch.distributed as dist

    from tests.support import tiny_moe
    from tests.support.bridge_grouped_experts import apply_grouped_expert_lora

    tiny_moe.init_moe_parallel(tp=2, etp=2)
    model = tiny_moe.build_moe_gpt(tiny_moe.MIXTRAL_LIKE, sequence_parallel=True, grouped_experts=True)
    apply_grouped_expert_lora(model, dim=DIM, alpha=ALPHA, targets=("linear_fc2",), expert_adapters=expert_adapters)
    tiny_moe.fill_moe_lora_random(model, seed=3)
    adapter = model.decoder.layers[0].mlp.experts.linear_fc2.adapter
    x = torch.randn(
        5, 32, generator=torch.Generator().manual_seed(0)
    )  # one expert's tokens, full ffn; rank t holds columns t
    a, b = adapter.linear_in.weight.detach(), adapter.linear_out.weight.detach()
    a, b = (a, b) if a.dim() == 2 else (a[0], b[0])
    y = adapter(x.chunk(2, dim=1)[rank].contiguous(), [5, 0, 0, 0]).detach()
    dist.all_reduce(y)  # the token dispatcher sums the expert-TP ranks' outputs
    parts = [torch.empty_like(t) for t in (a, a, b, b)]
    dist.all_gather(parts[:2], a.contiguous())
    dist.all_gather(parts[2:], b.contiguous())
    scale = ALPHA / DIM
    lora = scale * x @ torch.cat(parts[:2], 1).T @ torch.cat(parts[2:], 0).T
    block_diagonal = 2 * scale * torch.cat([x.chunk(2, 1)[t] @ parts[t].T @ parts[2 + t].T for t in range(2)], dim=1)
    return (y - block_diagonal).abs().max().item(), (y - lora).abs().max().item()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("expert_adapters", ["shared", "per_expert"])
def test_expert_fc2_at_etp2_computes_etp_times_a_block_diagonal_update(expert_adapters):
    """Why the exporter refuses it: summed over expert TP, the adapter gives 2 x blockdiag(B_t A_t) x, not B A x."""
    for to_block_diagonal, to_lora in run_ranks(_fc2_etp2_rank, 2, expert_adapters):
        assert to_block_diagonal < 1e-5 and to_lora > 1e-2, (to_block_diagonal, to_lora)
