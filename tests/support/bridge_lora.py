"""Stand-ins for Megatron-Bridge's LoRA, CanonicalLoRA and DoRA adapters (test support only).

Megatron-Bridge cannot be installed here (it needs Transformer Engine), so this
module rebuilds the parts of it that decide what an adapter checkpoint looks
like, on megatron-core 0.16.1 local-spec GPT layers (``ColumnParallelLinear`` /
``RowParallelLinear``):

* module tree and names: the base linear moves to ``<name>.to_wrap`` and the
  adapter sits at ``<name>.adapter`` (CanonicalLoRA: ``<name>.adapter.adapter_q``
  etc.), so ``named_parameters()`` says ``...linear_qkv.to_wrap.weight`` while
  ``state_dict()`` and ``sharded_state_dict()`` say ``...linear_qkv.weight``
  (the wrapper's ``state_dict`` override), and adapters are under ``.adapter.``;
* tensor-parallel layout: LoRA A/B are megatron-core's own
  ``ColumnParallelLinear`` / ``RowParallelLinear`` built with the same arguments
  Bridge passes, so shapes, ``tensor_model_parallel`` / ``partition_dim``
  attributes and the collectives are the real ones;
* forward math, including CanonicalLoRA's per-query-group QKV interleave and
  [gate; up] FC1 concatenation, and DoRA's magnitude / weight-norm formula;
* ``sharded_state_dict`` (torch_dist layout) including the SwiGLU factory that
  Bridge applies to every adapter ``linear_out`` under ``linear_fc1``.

Mixture of experts (``BRIDGE_FACTS.md`` section 7): LoRA on megatron's
TEGroupedMLP experts (``tiny_moe.GROUPED_EXPERTS``) as Bridge's three expert
adapters (one shared 2-D adapter per EP rank, per-expert 3-D, shared-outer) and
LoRA on the router (LoRATopKRouter); SequentialMLP experts get the ordinary
adapter on the expert-TP group.

The code is written from the facts in ``BRIDGE_FACTS.md``; nothing here is
copied from Bridge. Two Bridge behaviours depend on TP: DoRA's weight norm of a
row-parallel base (linear_proj, linear_fc2) covers only the rank's input
columns, so at TP > 1 DoRA is not the TP = 1 function once the magnitude is not
the rank's own initial norm; and CanonicalLoRA's QKV interleave reshapes with
global head counts (same result, but a reshape error when s*b % tp != 0). By
default this module computes the TP-consistent math (equal to Bridge at
TP = 1); ``bridge_tp_quirks=True`` reproduces Bridge's TP > 1 behaviour.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.utils import (
    make_sharded_tensor_for_checkpoint,
    make_tp_sharded_tensor_for_checkpoint,
)
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import TopKRouter
from torch import nn
from torch.nn import functional as F

from .tiny_moe import CpuGroupedColumnLinear, CpuGroupedLinear

__all__ = [
    "VARIANTS",
    "DEFAULT_TARGETS",
    "CANONICAL_TARGETS",
    "apply_bridge_lora",
    "iter_bridge_wrappers",
    "set_adapters_enabled",
    "BridgeParallelAdapter",
    "BridgeDoRAAdapter",
    "CanonicalAdapterDict",
    "BridgeAdapterWrapper",
    "BridgeLoRALinear",
    "BridgeLoRASplitQKV",
    "BridgeLoRASplitFC1",
    "BridgeDoRALinear",
    "EXPERT_ADAPTERS",
    "BridgeGroupedExpertAdapter",
    "BridgeSharedOuterExpertAdapter",
    "BridgeLoRATopKRouter",
]

VARIANTS = ("lora", "canonical", "dora")
EXPERT_ADAPTERS = ("shared", "per_expert", "shared_outer")
"""Bridge LoRA on grouped experts: ``share_expert_adapters=True`` (default), ``False``, ``experts_shared_outer_loras=True``."""
DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# CanonicalLoRA's own target names; the fused names in DEFAULT_TARGETS are
# accepted too and expanded (Bridge itself rejects them for CanonicalLoRA).
CANONICAL_TARGETS = (
    "linear_q",
    "linear_k",
    "linear_v",
    "linear_proj",
    "linear_fc1_up",
    "linear_fc1_gate",
    "linear_fc2",
)
_CANONICAL_COMPONENT_OF = {
    "linear_q": "linear_qkv",
    "linear_k": "linear_qkv",
    "linear_v": "linear_qkv",
    "linear_fc1_up": "linear_fc1",
    "linear_fc1_gate": "linear_fc1",
}


# --------------------------------------------------------------------------- helpers


def _tp_size(group) -> int:
    return 1 if group is None else group.size()


def _pattern_matches(pattern: str, name: str, full_name: str) -> bool:
    """Bridge's ModuleMatcher rule: exact child name, or '*'-wildcard on the dotted path."""
    if name == pattern:
        return True
    regex = "^" + pattern.replace("*", "(.*)") + "$"
    return re.match(regex, full_name) is not None


# --------------------------------------------------------------------------- adapters


class BridgeParallelAdapter(nn.Module):
    """Low-rank branch ``scale * B(A(x))`` laid out like Bridge's ParallelLinearAdapter.

    ``in_features`` / ``out_features`` are the *global* sizes of the base linear.
    Column-parallel base (``input_is_parallel=False``):
      A = ColumnParallelLinear(in, dim, gather_output=True)  weight [dim/tp, in], partition_dim 0
      B = ColumnParallelLinear(dim, out, gather_output=False) weight [out/tp, dim], partition_dim 0
    Row-parallel base (``input_is_parallel=True``):
      A = RowParallelLinear(in, dim, input_is_parallel=True) weight [dim, in/tp], partition_dim 1
      B = ColumnParallelLinear(dim, out, gather_output=True)  weight [out/tp, dim], partition_dim 0
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
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        dropout_position: str = "pre",
        disable_sequence_parallel_comm: bool = True,
        is_expert: bool = False,
        base_linear_is_parallel: bool = True,
    ) -> None:
        super().__init__()
        if dropout_position not in ("pre", "post"):
            raise ValueError(f"dropout_position must be 'pre' or 'post', got {dropout_position!r}")
        self.base_linear_name = base_linear_name
        self.dim = dim
        self.alpha = alpha if alpha is not None else dim
        self.input_is_parallel = input_is_parallel
        self.dropout_position = dropout_position
        self.tp_group = tp_group
        self.is_expert = is_expert
        self.activation = nn.Identity()  # Bridge's LoRA/DoRA always pass activation="identity"

        # Bridge builds A/B from the base layer's own config object: sequence
        # parallelism is switched off while they are built (the adapter does its
        # own SP communication) and perform_initialization is forced on (and,
        # as in Bridge, left on afterwards).
        seq_par = config.sequence_parallel
        config.sequence_parallel = False
        config.perform_initialization = True
        self.config = config
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
                    is_expert=is_expert,
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
                    disable_grad_reduce=seq_par,
                    is_expert=is_expert,
                    tp_group=tp_group,
                )
            self.linear_out = ColumnParallelLinear(
                dim,
                out_features,
                config=config,
                init_method=nn.init.zeros_,
                bias=False,
                gather_output=input_is_parallel or not base_linear_is_parallel,
                is_expert=is_expert,
                tp_group=tp_group,
            )
            self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
            if config.bf16:
                self.bfloat16()
            elif config.fp16:
                self.half()
        finally:
            config.sequence_parallel = seq_par
        # expert inputs are the dispatcher's tokens, never sequence-sharded (Bridge skips SP comm for is_expert)
        self.disable_sequence_parallel_comm = disable_sequence_parallel_comm or not seq_par or is_expert

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        del args, kwargs
        if self.dropout_position == "pre":
            x = self.dropout(x)
        if not self.input_is_parallel and not self.disable_sequence_parallel_comm:
            # the base's input is sequence-sharded; A needs the full sequence
            x = gather_from_sequence_parallel_region(x, group=self.tp_group)
        x, _ = self.linear_in(x)
        x = self.activation(x)
        x, _ = self.linear_out(x)
        if self.input_is_parallel and not self.disable_sequence_parallel_comm:
            # the row-parallel base reduce-scatters to sequence shards; match it
            x = scatter_to_sequence_parallel_region(x, group=self.tp_group)
        if self.dropout_position == "post":
            x = self.dropout(x)
        return x * (self.alpha / self.dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        if self.is_expert and ".local_experts." not in self.base_linear_name:  # shared by grouped experts: a global expert axis
            local = self.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
            first = ps.get_expert_model_parallel_rank() * local
            gated = "linear_fc1" in self.base_linear_name and self.config.gated_linear_unit
            return {
                f"{prefix}{name}.weight": [
                    t for e in range(local)
                    for t in _expert_sharded(f"{prefix}{name}.weight", linear.weight, sharded_offsets, expert=(first + e, self.config.num_moe_experts),
                                             tp_axis=linear.weight.partition_dim, group=self.tp_group, swiglu=gated and name == "linear_out", new_axis=True)
                ]
                for name, linear in (("linear_in", self.linear_in), ("linear_out", self.linear_out))
            }
        sd = {}
        sd.update(self.linear_in.sharded_state_dict(f"{prefix}linear_in.", sharded_offsets, metadata))
        out_sd = self.linear_out.sharded_state_dict(f"{prefix}linear_out.", sharded_offsets, metadata)
        # Bridge keys the SwiGLU split on the *base* name, so CanonicalLoRA's
        # adapter_gate / adapter_up B matrices get it too (see BRIDGE_FACTS.md).
        if "linear_fc1" in self.base_linear_name and getattr(self.config, "gated_linear_unit", False):
            for key in (f"{prefix}linear_out.weight", f"{prefix}linear_out.bias"):
                if key in out_sd:
                    out_sd[key] = apply_swiglu_sharded_factory(out_sd[key], sharded_offsets)
        sd.update(out_sd)
        return sd


class BridgeDoRAAdapter(BridgeParallelAdapter):
    """BridgeParallelAdapter plus DoRA's ``weight_magnitude`` (set by the wrapper)."""

    def init_weight_magnitude(self, value: torch.Tensor) -> None:
        self.weight_magnitude = nn.Parameter(value, requires_grad=True)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}weight_magnitude"
        if self.input_is_parallel:
            # row-parallel base: stored as replicated (only TP rank 0's copy is written)
            sd[key] = make_sharded_tensor_for_checkpoint(self.weight_magnitude, key, prepend_offsets=sharded_offsets)
        else:
            # column-parallel base: TP-sharded on axis 0, *no* SwiGLU split for fc1
            sd[key] = make_tp_sharded_tensor_for_checkpoint(
                self.weight_magnitude, key, 0, prepend_offsets=sharded_offsets
            )
        return sd


class CanonicalAdapterDict(nn.ModuleDict):
    """Holds CanonicalLoRA's per-projection adapters (entries may be None)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        sd = {}
        for key, adapter in self.items():
            if adapter is not None:
                sd.update(adapter.sharded_state_dict(f"{prefix}{key}.", sharded_offsets, metadata))
        return sd


class _ExpertWeights(nn.Module):
    """One 3-D parameter ``weight`` [local experts, out, in], so names read ``adapter.linear_in.weight`` as in Bridge.

    Initialised as Bridge's: xavier-normal per expert for A (``xavier``), zeros for B.
    """

    def __init__(self, shape, tp_axis: Optional[int], dtype, *, xavier: bool) -> None:
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


def _expert_sharded(key: str, tensor: torch.Tensor, sharded_offsets: tuple, *, expert: tuple, tp_axis, group, swiglu: bool,
                    new_axis: bool) -> list:
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
        ShardedTensor.from_rank_offsets(key, data, *sharded_offsets, (p, *expert), *tp, *split, replica_id=(0, 0, _edp_rank()), prepend_axis_num=shift)
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

    def __init__(self, in_features, out_features, dim, *, num_local_experts, input_is_parallel, config, tp_group, alpha=None):
        super().__init__()
        self.dim, self.alpha, self.input_is_parallel, self.expert_tp_group = dim, alpha if alpha is not None else dim, input_is_parallel, tp_group
        self.is_expert = True
        etp = _tp_size(tp_group)
        a_shape = (num_local_experts, dim, in_features // etp) if input_is_parallel else (num_local_experts, dim // etp, in_features)
        self.linear_in = _ExpertWeights(a_shape, 2 if input_is_parallel else 1, config.params_dtype, xavier=True)
        self.linear_out = _ExpertWeights((num_local_experts, out_features // etp, dim), 1, config.params_dtype, xavier=False)
        self.gated_out = not input_is_parallel and config.gated_linear_unit

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The local expert axis over EP, the TP axis over expert TP, fc1 B split gate/up (P/utils.py:2360-2404)."""
        ep = (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())
        return {
            f"{prefix}{name}.weight": _expert_sharded(f"{prefix}{name}.weight", w.weight, sharded_offsets, expert=ep, tp_axis=w.weight.partition_dim,
                                                      group=self.expert_tp_group, swiglu=self.gated_out and name == "linear_out", new_axis=False)
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

    def __init__(self, in_features, out_features, dim, *, num_local_experts, input_is_parallel, config, tp_group, alpha=None):
        super().__init__()
        if _tp_size(tp_group) != 1:
            raise NotImplementedError("Bridge's shared-outer expert LoRA has full-width per-expert weights: expert TP 1 only")
        self.dim, self.alpha, self.fc1, self.is_expert = dim, alpha if alpha is not None else dim, not input_is_parallel, True
        self.gated_out = config.gated_linear_unit
        config.perform_initialization = True
        if self.fc1:
            self.linear_in = ColumnParallelLinear(in_features, dim, config=config, init_method=nn.init.xavier_normal_, bias=False,
                                                  gather_output=True, is_expert=True)
            self.linear_out = _ExpertWeights((num_local_experts, out_features, dim), None, config.params_dtype, xavier=False)
        else:
            self.linear_in = _ExpertWeights((num_local_experts, dim, in_features), None, config.params_dtype, xavier=True)
            self.linear_out = RowParallelLinear(dim, out_features, config=config, init_method=nn.init.zeros_, bias=False,
                                                input_is_parallel=True, skip_bias_add=True, is_expert=True)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The shared side as its megatron linear saves itself, the per-expert side on the expert axis (P/utils.py:2669-2690)."""
        ep = (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())
        shared, packed = ("linear_in", "linear_out") if self.fc1 else ("linear_out", "linear_in")
        sd = getattr(self, shared).sharded_state_dict(f"{prefix}{shared}.", sharded_offsets, metadata)
        sd = {k: v for k, v in sd.items() if k.endswith(".weight")}
        key = f"{prefix}{packed}.weight"
        sd[key] = _expert_sharded(key, getattr(self, packed).weight, sharded_offsets, expert=ep, tp_axis=None, group=None,
                                  swiglu=self.fc1 and self.gated_out, new_axis=False)
        return sd

    def forward(self, x: torch.Tensor, m_splits, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.fc1:
            h, _ = self.linear_in(x)
            y = torch.cat([F.linear(p, self.linear_out.weight[e]) for e, p in enumerate(_expert_runs(h, m_splits))])
        else:
            h = torch.cat([F.linear(p, self.linear_in.weight[e]) for e, p in enumerate(_expert_runs(x, m_splits))])
            y, _ = self.linear_out(h)
        return y * (self.alpha / self.dim)


# --------------------------------------------------------------------------- wrappers


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
        self._adapter_enabled = True

    # Bridge API names
    def enable_adapter_layers(self) -> None:
        self._adapter_enabled = True

    def disable_adapter_layers(self) -> None:
        self._adapter_enabled = False

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

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        sd = {}
        sd.update(self.to_wrap.sharded_state_dict(prefix, sharded_offsets, metadata))
        sd.update(self.adapter.sharded_state_dict(f"{prefix}adapter.", sharded_offsets, metadata))
        return sd


class BridgeLoRALinear(BridgeAdapterWrapper):
    """LoRA: ``base(x) + scale * B(A(x))`` (bias passed through untouched)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        out, bias, ln_out = self.base_linear_forward(x, *args, **kwargs)
        if not self._adapter_enabled:
            return out, bias
        delta = self.adapter(ln_out.contiguous(), *args, **kwargs)
        return out + delta.reshape(out.shape), bias

    @property
    def weight(self) -> torch.Tensor:
        """Effective (merged) local weight shard, as Bridge's LoRALinear.weight.

        Collective at TP > 1 (all-gathers A or B): every TP rank must call it.
        """
        base = self.to_wrap.weight
        if not self._adapter_enabled:
            return base
        a = self.adapter.linear_in.weight
        b = self.adapter.linear_out.weight
        group = self.adapter.tp_group
        tp = _tp_size(group)
        if tp > 1:
            if a.shape[0] * tp == self.adapter.dim:  # column-parallel base: gather A rows
                parts = [torch.empty_like(a) for _ in range(tp)]
                dist.all_gather(parts, a.contiguous(), group=group)
                a = torch.cat(parts, dim=0)
            elif b.shape[0] * tp == base.shape[0]:  # row-parallel base: gather B rows
                parts = [torch.empty_like(b) for _ in range(tp)]
                dist.all_gather(parts, b.contiguous(), group=group)
                b = torch.cat(parts, dim=0)
        merged = base + self.adapter.scale * (b @ a)
        return merged.to(device=base.device, dtype=base.dtype)

    @property
    def bias(self):
        return getattr(self.to_wrap, "bias", None)


class BridgeLoRATopKRouter(BridgeAdapterWrapper):
    """Bridge's LoRATopKRouter: the LoRA output is added to the router logits before top-k routing."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        router = self.to_wrap
        router._maintain_float32_expert_bias()
        x = router.apply_input_jitter(x)
        logits = router.gating(x)
        if self._adapter_enabled:
            logits = logits + self.adapter(x.contiguous()).to(dtype=logits.dtype)
        return router.routing(logits, *args, **kwargs)


class BridgeLoRASplitQKV(BridgeAdapterWrapper):
    """CanonicalLoRA on ``linear_qkv``: separate q / k / v adapters.

    Their (TP-local) outputs are interleaved per query group into Megatron's
    packed layout ``[q_g (heads_per_group*d), k_g (d), v_g (d)]`` for each group.
    """

    def __init__(self, to_wrap: nn.Module, adapter: CanonicalAdapterDict, *, bridge_tp_quirks: bool = False):
        super().__init__(to_wrap, adapter)
        cfg = to_wrap.config
        if getattr(cfg, "attention_output_gate", False):
            raise NotImplementedError("CanonicalLoRA with attention_output_gate is not modelled")
        tp = _tp_size(to_wrap.tp_group)
        heads = cfg.num_attention_heads
        groups = cfg.num_query_groups or heads
        if heads % tp or groups % tp:
            raise NotImplementedError("heads and query groups must be divisible by the TP size")
        self._head_dim = cfg.kv_channels
        self._local_counts = (heads // tp, groups // tp)
        # Bridge reshapes with the *global* counts although q/k/v are TP-local.
        # reshape(-1, heads, d) then folds tp tokens into one row; the per-group
        # interleave is unaffected (same result) but the reshape raises when the
        # local token count (s*b) is not divisible by tp. bridge_tp_quirks=True
        # keeps the global counts.
        self._reshape_counts = (heads, groups) if bridge_tp_quirks else self._local_counts

    def _interleave(self, q, k, v, like: torch.Tensor) -> torch.Tensor:
        d = self._head_dim
        heads, groups = self._reshape_counts
        local = {"q": self._local_counts[0], "k": self._local_counts[1], "v": self._local_counts[1]}
        lead = like.shape[:-1]
        parts = {}
        for key, t, n in (("q", q, heads), ("k", k, groups), ("v", v, groups)):
            if t is None:  # untargeted projection (Bridge would raise here): contributes zeros
                t = like.new_zeros(*lead, local[key] * d)
            parts[key] = t.reshape(-1, n, d)
        per_group = heads // groups
        chunks = []
        for g in range(groups):
            chunks += [
                parts["q"][:, g * per_group : (g + 1) * per_group],
                parts["k"][:, g : g + 1],
                parts["v"][:, g : g + 1],
            ]
        return torch.cat(chunks, dim=1).reshape(*lead, -1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        out, bias, ln_out = self.base_linear_forward(x, *args, **kwargs)
        if not self._adapter_enabled:
            return out, bias
        outs = []
        for key in ("adapter_q", "adapter_k", "adapter_v"):
            adapter = self.adapter[key] if key in self.adapter else None
            outs.append(None if adapter is None else adapter(ln_out, *args, **kwargs))
        return out + self._interleave(*outs, like=out), bias


class BridgeLoRASplitFC1(BridgeAdapterWrapper):
    """CanonicalLoRA on ``linear_fc1``: ``cat([gate(x), up(x)], -1)`` of the TP-local outputs."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        out, bias, ln_out = self.base_linear_forward(x, *args, **kwargs)
        if not self._adapter_enabled:
            return out, bias
        half = out.shape[-1] // 2
        outs = []
        for key in ("adapter_gate", "adapter_up"):
            adapter = self.adapter[key] if key in self.adapter else None
            if adapter is None:  # untargeted half (Bridge would raise here)
                outs.append(out.new_zeros(*out.shape[:-1], half))
            else:
                outs.append(adapter(ln_out, *args, **kwargs))
        return out + torch.cat(outs, dim=-1), bias


class BridgeDoRALinear(BridgeAdapterWrapper):
    """DoRA: ``(m / ||W0 + s*B@A||_row) * (base(x) + s*B(A(x)))`` (+ dropout correction).

    ``base(x)`` is whatever the base returns as its output, so a non-skipped bias
    (``linear_qkv``) is scaled too, while a returned bias (proj/fc1/fc2) is not.
    """

    def __init__(self, to_wrap: nn.Module, adapter: BridgeDoRAAdapter, *, bridge_tp_quirks: bool = False):
        super().__init__(to_wrap, adapter)
        self._quirks = bridge_tp_quirks
        self.scaling = adapter.alpha / adapter.dim
        self.adapter.init_weight_magnitude(self._get_weight_norm())

    def _get_weight_norm(self) -> torch.Tensor:
        group = self.adapter.tp_group
        if self.adapter.input_is_parallel:
            b = gather_from_tensor_model_parallel_region(self.adapter.linear_out.weight.T, group=group).T
            a = self.adapter.linear_in.weight
        else:
            b = self.adapter.linear_out.weight
            a = gather_from_tensor_model_parallel_region(self.adapter.linear_in.weight.T, group=group).T
        weight = self.to_wrap.weight + self.scaling * b @ a
        if self.adapter.input_is_parallel and not self._quirks and _tp_size(group) > 1:
            # row-parallel base: each rank holds only in/tp columns; sum the squares over TP
            sq = weight.detach().float().pow(2).sum(dim=1)
            dist.all_reduce(sq, group=group)
            return sq.sqrt().to(weight.dtype)
        # Bridge: norm over the *local* weight (partial rows for a row-parallel base at TP > 1)
        return torch.linalg.norm(weight, dim=1).to(weight.dtype).detach()

    def forward(self, x: torch.Tensor):
        out, bias, ln_out = self.base_linear_forward(x)
        if not self._adapter_enabled:
            return out, bias
        delta = self.adapter(ln_out.contiguous())
        mag_norm_scale = (self.adapter.weight_magnitude / self._get_weight_norm()).view(1, 1, -1)
        if not self.training or isinstance(self.adapter.dropout, nn.Identity):
            correction = 0
        else:
            # a second, independent dropout mask (as in Bridge)
            correction = (mag_norm_scale - 1) * self.base_linear_forward(self.adapter.dropout(ln_out) - ln_out)[0]
        return mag_norm_scale * (out + delta) + correction, bias


# --------------------------------------------------------------------------- apply


_EXPERT_LINEAR = re.compile(r".*mlp\..*experts.*\.linear_fc[12]$")


def _is_expert_linear(full_name: str) -> bool:
    """Bridge's is_expert_linear: routed-expert fc1/fc2 (SequentialMLP or grouped), not the shared expert."""
    return _EXPERT_LINEAR.match(full_name) is not None and ".shared_experts." not in full_name


def _base_attrs(module: nn.Module):
    """(input_is_parallel, global in, global out, disable_sp_comm, TP group, base is parallel) like Bridge."""
    if isinstance(module, TopKRouter):  # replicated router: a plain linear, no SP communication
        return False, module.weight.shape[1], module.weight.shape[0], True, ps.get_tensor_model_parallel_group(), False
    if isinstance(module, CpuGroupedLinear):  # TE grouped linear: local in/out features, expert TP
        tp = module._tp_group.size()
        column = isinstance(module, CpuGroupedColumnLinear)
        in_f, out_f = (module.in_features, module.out_features * tp) if column else (module.in_features * tp, module.out_features)
        return not column, in_f, out_f, True, module._tp_group, True
    if isinstance(module, ColumnParallelLinear):
        parallel_input = False
    elif isinstance(module, RowParallelLinear):
        parallel_input = True
    else:
        raise NotImplementedError(f"Layer type is unrecognized for LoRA: {type(module)}")
    disable_tp_comm = getattr(module, "explicit_expert_comm", False)
    disable_sp_comm = (not module.config.sequence_parallel) or disable_tp_comm
    return parallel_input, module.input_size, module.output_size, disable_sp_comm, module.tp_group, True


def _targets_for(variant: str, target_modules: Sequence[str]) -> dict[str, set[str]]:
    """Map each match pattern to the CanonicalLoRA components it enables (empty for plain targets)."""
    mapping: dict[str, set[str]] = {}
    for target in target_modules:
        pattern, components = target, set()
        if variant == "canonical":
            comp = next((c for c in _CANONICAL_COMPONENT_OF if target.endswith(c)), None)
            if comp is not None:  # linear_q -> pattern linear_qkv, component linear_q
                pattern, components = target[: -len(comp)] + _CANONICAL_COMPONENT_OF[comp], {comp}
            elif target.endswith("linear_qkv"):  # convenience (Bridge asserts): all of q, k, v
                components = {"linear_q", "linear_k", "linear_v"}
            elif target.endswith("linear_fc1"):  # convenience (Bridge asserts): gate and up
                components = {"linear_fc1_up", "linear_fc1_gate"}
        mapping.setdefault(pattern, set()).update(components)
    return mapping


def _make_wrapper(variant, module, name, full_name, components, *, dim, alpha, dropout, dropout_position, quirks, expert_adapters):
    parallel_input, in_f, out_f, disable_sp, group, base_parallel = _base_attrs(module)
    is_expert = _is_expert_linear(full_name)

    def adapter(out_features, cls=BridgeParallelAdapter):
        return cls(
            in_f,
            out_features,
            dim,
            base_linear_name=full_name,
            input_is_parallel=parallel_input,
            config=module.config,
            tp_group=group,
            alpha=alpha,
            dropout=dropout,
            dropout_position=dropout_position,
            disable_sequence_parallel_comm=disable_sp,
            is_expert=is_expert,
            base_linear_is_parallel=base_parallel,
        )

    if isinstance(module, (TopKRouter, CpuGroupedLinear)) and (variant != "lora" or dropout):
        raise NotImplementedError("router and grouped-expert adapters are modelled for LoRA without dropout")
    if isinstance(module, TopKRouter):
        return BridgeLoRATopKRouter(module, adapter(out_f))
    if isinstance(module, CpuGroupedLinear) and expert_adapters != "shared":
        cls = BridgeGroupedExpertAdapter if expert_adapters == "per_expert" else BridgeSharedOuterExpertAdapter
        return BridgeLoRALinear(module, cls(in_f, out_f, dim, num_local_experts=module.num_gemms, input_is_parallel=parallel_input,
                                            config=module.config, tp_group=group, alpha=alpha))

    if variant == "dora":
        if dropout_position != "pre":
            raise ValueError("DoRA only supports dropout_position='pre' (as Bridge)")
        return BridgeDoRALinear(module, adapter(out_f, BridgeDoRAAdapter), bridge_tp_quirks=quirks)
    if variant == "canonical" and name == "linear_qkv":
        cfg = module.config
        outs = {
            "linear_q": cfg.kv_channels * cfg.num_attention_heads,
            "linear_k": cfg.kv_channels * cfg.num_query_groups,
            "linear_v": cfg.kv_channels * cfg.num_query_groups,
        }
        parts = {f"adapter_{c[-1]}": adapter(n) if c in components else None for c, n in outs.items()}
        return BridgeLoRASplitQKV(module, CanonicalAdapterDict(parts), bridge_tp_quirks=quirks)
    if variant == "canonical" and name == "linear_fc1":
        if not module.config.gated_linear_unit:
            raise NotImplementedError("CanonicalLoRA on a non-gated linear_fc1 is not modelled")
        parts = {
            f"adapter_{c.rsplit('_', 1)[1]}": adapter(out_f // 2) if c in components else None
            for c in ("linear_fc1_up", "linear_fc1_gate")
        }
        return BridgeLoRASplitFC1(module, CanonicalAdapterDict(parts))
    return BridgeLoRALinear(module, adapter(out_f))


def _walk(module: nn.Module, prefix: str = ""):
    """Yield (parent, child_name, child, full_name) depth-first, not entering wrappers."""
    for child_name, child in list(module.named_children()):
        if child is None:
            continue
        full = f"{prefix}.{child_name}" if prefix else child_name
        yield module, child_name, child, full
        if not isinstance(child, BridgeAdapterWrapper):
            yield from _walk(child, full)


def apply_bridge_lora(
    model_or_chunks,
    *,
    variant: str = "lora",
    dim: int = 8,
    alpha: float = 16,
    target_modules: Iterable[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    dropout_position: str = "pre",
    freeze_base: bool = True,
    bridge_tp_quirks: bool = False,
    expert_adapters: str = "shared",
):
    """Wrap the targeted linears of a GPTModel (or list of VPP chunks) in place, as Bridge does.

    Args:
        model_or_chunks: a megatron-core ``GPTModel`` built from the local spec, or a
            list of them (virtual-pipeline chunks). Parallel state must be initialized.
        variant: "lora" (Bridge ``LoRA``), "canonical" (``CanonicalLoRA``) or "dora" (``DoRA``).
        dim, alpha: rank and alpha; the adapter output is scaled by ``alpha / dim``.
        target_modules: Bridge-style targets: a child name (``linear_qkv``) or a
            ``*`` wildcard over the dotted path (``*.layers.0.*.linear_qkv``). For
            "canonical" use ``linear_q/k/v`` and ``linear_fc1_up/gate``; the fused
            names ``linear_qkv`` / ``linear_fc1`` are accepted and mean all parts.
        dropout, dropout_position: adapter dropout, "pre" (on the adapter input) or
            "post" (on the adapter output, before scaling). DoRA requires "pre".
        freeze_base: set ``requires_grad=False`` on every pre-existing parameter first,
            as Bridge's PEFT.__call__ does (adapter parameters stay trainable).
        bridge_tp_quirks: reproduce Bridge's TP > 1 behaviour exactly: DoRA's
            row-parallel weight norm over the local input columns only, and
            CanonicalLoRA's QKV reshape with global head counts (raises when
            s*b % tp != 0). Default False: TP-consistent math (== Bridge at TP=1).
        expert_adapters: LoRA on grouped experts (``tiny_moe.GROUPED_EXPERTS``): "shared" (one
            2-D adapter for all local experts of an EP rank, Bridge's default), "per_expert" (3-D,
            ``share_expert_adapters=False``) or "shared_outer" (``experts_shared_outer_loras=True``).
            Target the router with "router" (LoRATopKRouter).

    Returns the same object it was given. Adapters start as Bridge's do: A xavier-normal,
    B zero (DoRA magnitude = row norms of the base weight).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if expert_adapters not in EXPERT_ADAPTERS:
        raise ValueError(f"expert_adapters must be one of {EXPERT_ADAPTERS}, got {expert_adapters!r}")
    chunks = model_or_chunks if isinstance(model_or_chunks, (list, tuple)) else [model_or_chunks]
    patterns = _targets_for(variant, tuple(target_modules))
    for chunk in chunks:
        if freeze_base:
            for p in chunk.parameters():
                p.requires_grad = False
        for parent, name, child, full_name in list(_walk(chunk)):
            if isinstance(child, BridgeAdapterWrapper):
                continue
            hit = next((p for p in patterns if _pattern_matches(p, name, full_name)), None)
            if hit is None:
                continue
            wrapper = _make_wrapper(
                variant,
                child,
                name,
                full_name,
                patterns[hit],
                dim=dim,
                alpha=alpha,
                dropout=dropout,
                dropout_position=dropout_position,
                quirks=bridge_tp_quirks,
                expert_adapters=expert_adapters,
            )
            setattr(parent, name, wrapper)
    return model_or_chunks


def iter_bridge_wrappers(model_or_chunks):
    """Yield (full_name, wrapper) for every adapter wrapper (full names are per chunk)."""
    chunks = model_or_chunks if isinstance(model_or_chunks, (list, tuple)) else [model_or_chunks]
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, BridgeAdapterWrapper):
                yield name, module


def set_adapters_enabled(model_or_chunks, enabled: bool) -> None:
    """Bridge's enable_/disable_adapter_layers over the whole model."""
    for _, wrapper in iter_bridge_wrappers(model_or_chunks):
        (wrapper.enable_adapter_layers if enabled else wrapper.disable_adapter_layers)()
