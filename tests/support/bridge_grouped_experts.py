"""Megatron-Bridge's LoRA on grouped MoE experts, written from its source (test support only; BRIDGE_FACTS.md).

Why this reproduction stays while the rest of Bridge's PEFT runs for real (tests/support/real_bridge.py): Bridge
puts these adapters on megatron's TEGroupedMLP, whose grouped linears are Transformer Engine modules, and the
per-expert and shared-outer forms (and the expert-axis checkpoint layout of the shared one) came after 0.4.2, the
newest Bridge whose PEFT code imports with megatron-core 0.16.1. Here they wrap tiny_moe's CPU grouped linears
(``tiny_moe.GROUPED_EXPERTS``), in Bridge's three forms:

* "shared" (``share_expert_adapters=True``, the default): one 2-D A/B for every local expert of an EP rank, megatron
  Column/RowParallelLinear on the expert-TP group, as Bridge's ParallelLinearAdapter with ``is_expert=True``;
* "per_expert" (``share_expert_adapters=False``): GroupedExpertLinearAdapter, one pair per local expert (3-D);
* "shared_outer" (``experts_shared_outer_loras=True``): SharedOuterGroupedExpertAdapter, shared A on fc1 and shared
  B on fc2, per-expert on the other side (expert TP 1 only, as in Bridge).

Names (``<linear>.to_wrap``, ``<linear>.adapter.linear_in/linear_out``), TP attributes, forward math and
``sharded_state_dict`` follow BRIDGE_FACTS.md; nothing is copied from Bridge. Everything else on the model (attention,
shared experts, SequentialMLP experts, the router) gets Bridge's own LoRA (``real_bridge.apply``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, set_tensor_model_parallel_attributes
from torch import nn
from torch.nn import functional as F

from .tiny_moe import CpuGroupedColumnLinear, CpuGroupedLinear

__all__ = [
    "EXPERT_ADAPTERS",
    "apply_grouped_expert_lora",
    "BridgeAdapterWrapper",
    "BridgeSharedExpertAdapter",
    "BridgeGroupedExpertAdapter",
    "BridgeSharedOuterExpertAdapter",
]

EXPERT_ADAPTERS = ("shared", "per_expert", "shared_outer")
"""Bridge LoRA on grouped experts: ``share_expert_adapters=True`` (default), ``False``,
``experts_shared_outer_loras=True``."""


def _tp_size(group) -> int:
    return 1 if group is None else group.size()


class BridgeSharedExpertAdapter(nn.Module):
    """One 2-D LoRA for all local experts of an EP rank (Bridge's ParallelLinearAdapter with ``is_expert=True``).

    Column base (fc1): A = ColumnParallelLinear(in, dim, gather_output=True) [dim/etp, in], B =
    ColumnParallelLinear(dim, out)
    [out/etp, dim] (local rows [gate_t; up_t] like the base shard); row base (fc2): A = RowParallelLinear(in, dim) [dim,
    in/etp],
    B = ColumnParallelLinear(dim, out, gather_output=True) [out/etp, dim]. All on the expert-TP group with megatron's
    expert
    communication, so at expert TP > 1 A's partial output on fc2 is not reduced (BRIDGE_FACTS.md: not B A x). Applied to
    all
    the rank's tokens at once; no sequence-parallel communication for experts.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dim: int,
        *,
        base_linear_name: str,
        input_is_parallel: bool,
        config,
        tp_group,
        alpha: float | None = None,
    ) -> None:
        super().__init__()
        self.base_linear_name, self.dim, self.alpha = base_linear_name, dim, alpha if alpha is not None else dim
        self.input_is_parallel, self.tp_group, self.is_expert, self.config = input_is_parallel, tp_group, True, config
        seq_par = config.sequence_parallel
        config.sequence_parallel = (
            False  # as Bridge: A/B built without SP (the adapter does its own), perform_initialization forced on
        )
        config.perform_initialization = True
        try:
            if input_is_parallel:
                self.linear_in = RowParallelLinear(
                    in_features,
                    dim,
                    config=config,
                    init_method=nn.init.xavier_normal_,
                    bias=False,
                    input_is_parallel=True,
                    skip_bias_add=True,
                    is_expert=True,
                    tp_group=tp_group,
                )
            else:
                self.linear_in = ColumnParallelLinear(
                    in_features,
                    dim,
                    config=config,
                    init_method=nn.init.xavier_normal_,
                    bias=False,
                    gather_output=True,
                    is_expert=True,
                    tp_group=tp_group,
                )
            self.linear_out = ColumnParallelLinear(
                dim,
                out_features,
                config=config,
                init_method=nn.init.zeros_,
                bias=False,
                gather_output=input_is_parallel,
                is_expert=True,
                tp_group=tp_group,
            )
        finally:
            config.sequence_parallel = seq_par

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x, _ = self.linear_in(x)
        x, _ = self.linear_out(x)
        return x * (self.alpha / self.dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """A global expert axis: each local expert slot gets a copy of the 2-D tensor (P/utils.py:1401-1511), fc1 B
        split gate/up."""
        local = self.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        first = ps.get_expert_model_parallel_rank() * local
        gated = not self.input_is_parallel and self.config.gated_linear_unit
        return {
            f"{prefix}{name}.weight": [
                t
                for e in range(local)
                for t in _expert_sharded(
                    f"{prefix}{name}.weight",
                    linear.weight,
                    sharded_offsets,
                    expert=(first + e, self.config.num_moe_experts),
                    tp_axis=linear.weight.partition_dim,
                    group=self.tp_group,
                    swiglu=gated and name == "linear_out",
                    new_axis=True,
                )
            ]
            for name, linear in (("linear_in", self.linear_in), ("linear_out", self.linear_out))
        }


# --------------------------------------------------------------------------- per-expert adapters


class _ExpertWeights(nn.Module):
    """One 3-D parameter ``weight`` [local experts, out, in], so names read ``adapter.linear_in.weight`` as in Bridge.

    Initialised as Bridge's: xavier-normal per expert for A (``xavier``), zeros for B.
    """

    def __init__(self, shape, tp_axis: int | None, dtype, *, xavier: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype))
        if xavier:
            with torch.no_grad():
                for matrix in self.weight:
                    nn.init.xavier_normal_(matrix)
        if tp_axis is not None:
            set_tensor_model_parallel_attributes(self.weight, True, tp_axis, 1)


def _expert_runs(x: torch.Tensor, m_splits) -> tuple:
    """The grouped tokens of each local expert (the dispatcher sorts them by expert)."""
    return torch.split(x, [int(n) for n in m_splits])


def _edp_rank() -> int:
    return ps.get_expert_data_parallel_rank()


def _expert_sharded(
    key: str,
    tensor: torch.Tensor,
    sharded_offsets: tuple,
    *,
    expert: tuple,
    tp_axis,
    group,
    swiglu: bool,
    new_axis: bool,
) -> list:
    """Bridge's grouped-expert checkpoint layout for one local tensor: ShardedTensors on a global expert axis.

    ``expert`` is (index, count) on that axis: a new axis in front of a 2-D tensor shared by the rank's experts
    (``new_axis``, one copy per expert slot, P/utils.py:1401-1511), or a 3-D tensor's own local expert axis sharded
    over EP (1729-1774). ``tp_axis`` (local axis of the tensor as given) is sharded over expert TP; with ``swiglu``
    the gated fc1 B's rows [gate_t; up_t] are stored at blocks t and t + etp of 2 * etp (whole [gate; up]).
    """
    p = len(sharded_offsets)
    shift = p + 1 if new_axis else p  # global axis of the tensor's local axis 0
    rows = 0 if new_axis else 1  # local axis of the output rows
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    pieces = [(tensor, ())]
    if swiglu:
        gate, up = torch.chunk(tensor, 2, dim=rows)
        pieces = [(gate, ((shift + rows, rank, 2 * size),)), (up, ((shift + rows, rank + size, 2 * size),))]
    tp = () if tp_axis is None or size == 1 or (swiglu and tp_axis == rows) else ((shift + tp_axis, rank, size),)
    return [
        ShardedTensor.from_rank_offsets(
            key,
            data,
            *sharded_offsets,
            (p, *expert),
            *tp,
            *split,
            replica_id=(0, 0, _edp_rank()),
            prepend_axis_num=shift,
        )
        for data, split in pieces
    ]


class BridgeGroupedExpertAdapter(nn.Module):
    """Bridge's GroupedExpertLinearAdapter (``share_expert_adapters=False``): one LoRA pair per local expert.

    Column base (expert fc1): A [E_local, dim/etp, in] (expert-TP axis 1), B [E_local, out/etp, dim] (axis 1);
    row base (fc2): A [E_local, dim, in/etp] (axis 2), B as above. Per expert e: ``h = x_e A_e^T``,
    all-gathered over expert TP on the last dim for a column base; ``y = h B_e^T``, all-gathered for a row
    base; times alpha/dim. At expert TP > 1 a row base's ``h`` is this rank's partial sum, so the gathered ``y``
    mixes the ranks' partial sums (BRIDGE_FACTS.md section 7: not B A x), as in Bridge.
    """

    def __init__(
        self, in_features, out_features, dim, *, num_local_experts, input_is_parallel, config, tp_group, alpha=None
    ):
        super().__init__()
        self.dim, self.alpha, self.input_is_parallel, self.expert_tp_group = (
            dim,
            alpha if alpha is not None else dim,
            input_is_parallel,
            tp_group,
        )
        self.is_expert = True
        etp = _tp_size(tp_group)
        a_shape = (
            (num_local_experts, dim, in_features // etp)
            if input_is_parallel
            else (num_local_experts, dim // etp, in_features)
        )
        self.linear_in = _ExpertWeights(a_shape, 2 if input_is_parallel else 1, config.params_dtype, xavier=True)
        self.linear_out = _ExpertWeights(
            (num_local_experts, out_features // etp, dim), 1, config.params_dtype, xavier=False
        )
        self.gated_out = not input_is_parallel and config.gated_linear_unit

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The local expert axis over EP, the TP axis over expert TP, fc1 B split gate/up (P/utils.py:2360-2404)."""
        ep = (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())
        return {
            f"{prefix}{name}.weight": _expert_sharded(
                f"{prefix}{name}.weight",
                w.weight,
                sharded_offsets,
                expert=ep,
                tp_axis=w.weight.partition_dim,
                group=self.expert_tp_group,
                swiglu=self.gated_out and name == "linear_out",
                new_axis=False,
            )
            for name, w in (("linear_in", self.linear_in), ("linear_out", self.linear_out))
        }

    def _gather_last(self, t: torch.Tensor) -> torch.Tensor:
        if _tp_size(self.expert_tp_group) == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.expert_tp_group.size())]
        dist.all_gather(parts, t.contiguous(), group=self.expert_tp_group)
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor, m_splits, *args: Any, **kwargs: Any) -> torch.Tensor:
        outs = []
        for e, piece in enumerate(_expert_runs(x, m_splits)):  # every expert-TP rank holds the same tokens
            h = F.linear(piece, self.linear_in.weight[e])
            h = h if self.input_is_parallel else self._gather_last(h)
            y = F.linear(h, self.linear_out.weight[e])
            outs.append(self._gather_last(y) if self.input_is_parallel else y)
        return torch.cat(outs) * (self.alpha / self.dim)


class BridgeSharedOuterExpertAdapter(nn.Module):
    """Bridge's SharedOuterGroupedExpertAdapter (``experts_shared_outer_loras=True``).

    fc1: A shared (ColumnParallelLinear, is_expert, output gathered) [dim/etp, in], B per expert
    [E_local, out, dim] (no TP attributes); fc2: A per expert [E_local, dim, in], B shared
    (RowParallelLinear, is_expert) [out, dim/etp]. Bridge's per-expert side is not expert-TP aware,
    so this only runs at expert TP 1 (as in Bridge).
    """

    def __init__(
        self, in_features, out_features, dim, *, num_local_experts, input_is_parallel, config, tp_group, alpha=None
    ):
        super().__init__()
        if _tp_size(tp_group) != 1:
            raise NotImplementedError(
                "Bridge's shared-outer expert LoRA has full-width per-expert weights: expert TP 1 only"
            )
        self.dim, self.alpha, self.fc1, self.is_expert = (
            dim,
            alpha if alpha is not None else dim,
            not input_is_parallel,
            True,
        )
        self.gated_out = config.gated_linear_unit
        config.perform_initialization = True
        if self.fc1:
            self.linear_in = ColumnParallelLinear(
                in_features,
                dim,
                config=config,
                init_method=nn.init.xavier_normal_,
                bias=False,
                gather_output=True,
                is_expert=True,
            )
            self.linear_out = _ExpertWeights(
                (num_local_experts, out_features, dim), None, config.params_dtype, xavier=False
            )
        else:
            self.linear_in = _ExpertWeights(
                (num_local_experts, dim, in_features), None, config.params_dtype, xavier=True
            )
            self.linear_out = RowParallelLinear(
                dim,
                out_features,
                config=config,
                init_method=nn.init.zeros_,
                bias=False,
                input_is_parallel=True,
                skip_bias_add=True,
                is_expert=True,
            )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The shared side as its megatron linear saves itself, the per-expert side on the expert axis
        (P/utils.py:2669-2690)."""
        ep = (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())
        shared, packed = ("linear_in", "linear_out") if self.fc1 else ("linear_out", "linear_in")
        sd = getattr(self, shared).sharded_state_dict(f"{prefix}{shared}.", sharded_offsets, metadata)
        sd = {k: v for k, v in sd.items() if k.endswith(".weight")}
        key = f"{prefix}{packed}.weight"
        sd[key] = _expert_sharded(
            key,
            getattr(self, packed).weight,
            sharded_offsets,
            expert=ep,
            tp_axis=None,
            group=None,
            swiglu=self.fc1 and self.gated_out,
            new_axis=False,
        )
        return sd

    def forward(self, x: torch.Tensor, m_splits, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.fc1:
            h, _ = self.linear_in(x)
            y = torch.cat([F.linear(p, self.linear_out.weight[e]) for e, p in enumerate(_expert_runs(h, m_splits))])
        else:
            h = torch.cat([F.linear(p, self.linear_in.weight[e]) for e, p in enumerate(_expert_runs(x, m_splits))])
            y, _ = self.linear_out(h)
        return y * (self.alpha / self.dim)


# --------------------------------------------------------------------------- wrapper


class BridgeAdapterWrapper(nn.Module):
    """Base wrapper: ``to_wrap`` (the original linear) + ``adapter``.

    ``state_dict`` is overridden so the base keeps its pre-wrap keys
    (``<prefix>weight``) and the adapter lives under ``<prefix>adapter.``;
    ``named_parameters`` keeps the module path (``<prefix>to_wrap.weight``).
    """

    def __init__(self, to_wrap: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.to_wrap = to_wrap
        self.adapter = adapter

    def base_linear_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        """Run ``to_wrap``; return (output, bias, input-seen-by-adapter)."""
        out = self.to_wrap(x, *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out, getattr(self.to_wrap, "bias", None), x
        bias, ln_out = None, x
        if len(out) == 2:
            out, bias = out
            if isinstance(out, tuple) and len(out) == 2:
                out, ln_out = out
        elif len(out) == 3:
            out, bias, ln_out = out
        return out, bias, ln_out

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        if destination is None:
            destination = {}
        self.to_wrap.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        self.adapter.state_dict(destination=destination, prefix=f"{prefix}adapter.", keep_vars=keep_vars)
        return destination

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        sd = {}
        sd.update(self.to_wrap.sharded_state_dict(prefix, sharded_offsets, metadata))
        sd.update(self.adapter.sharded_state_dict(f"{prefix}adapter.", sharded_offsets, metadata))
        return sd


class BridgeLoRALinear(BridgeAdapterWrapper):
    """LoRA: ``base(x, m_splits) + adapter(x, m_splits)`` (Bridge's LoRALinear passes the base's arguments to the
    adapter)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        out, bias, ln_out = self.base_linear_forward(x, *args, **kwargs)
        delta = self.adapter(ln_out.contiguous(), *args, **kwargs)
        return out + delta.reshape(out.shape), bias


def apply_grouped_expert_lora(
    model_or_chunks,
    *,
    expert_adapters: str = "shared",
    dim: int = 8,
    alpha: float = 16,
    targets=("linear_fc1", "linear_fc2"),
):
    """Wrap the grouped expert linears named in `targets` (``mlp.experts.linear_fc1/2``) of a GPTModel or its VPP chunks
    in place.

    Adapters start as Bridge's: A xavier-normal, B zero. Returns what it was given.
    """
    if expert_adapters not in EXPERT_ADAPTERS:
        raise ValueError(f"expert_adapters must be one of {EXPERT_ADAPTERS}, got {expert_adapters!r}")
    for chunk in model_or_chunks if isinstance(model_or_chunks, (list, tuple)) else [model_or_chunks]:
        for name, parent in list(chunk.named_modules()):
            for child_name, base in list(parent.named_children()):
                if (
                    isinstance(base, CpuGroupedLinear)
                    and child_name in targets
                    and not isinstance(parent, BridgeAdapterWrapper)
                ):
                    setattr(
                        parent,
                        child_name,
                        BridgeLoRALinear(
                            base, _grouped_adapter(base, f"{name}.{child_name}", expert_adapters, dim, alpha)
                        ),
                    )
    return model_or_chunks


def _grouped_adapter(base: CpuGroupedLinear, full_name: str, expert_adapters: str, dim: int, alpha: float) -> nn.Module:
    """Bridge's attributes of a TE grouped base (P/utils.py:618-660): local in/out features, the expert-TP group."""
    group, column = base._tp_group, isinstance(base, CpuGroupedColumnLinear)
    in_f, out_f = (
        (base.in_features, base.out_features * group.size())
        if column
        else (base.in_features * group.size(), base.out_features)
    )
    if expert_adapters == "shared":
        return BridgeSharedExpertAdapter(
            in_f,
            out_f,
            dim,
            base_linear_name=full_name,
            input_is_parallel=not column,
            config=base.config,
            tp_group=group,
            alpha=alpha,
        )
    cls = BridgeGroupedExpertAdapter if expert_adapters == "per_expert" else BridgeSharedOuterExpertAdapter
    return cls(
        in_f,
        out_f,
        dim,
        num_local_experts=base.num_gemms,
        input_is_parallel=not column,
        config=base.config,
        tp_group=group,
        alpha=alpha,
    )
