"""Which checkpoint keys are adapter tensors, and how each becomes shard specs. Pure: names and shapes in, specs out.

The key names, each tensor's role and how torch_dist stores its rows are the dialects' declarations
(core/registry.py); the row layouts are undone here with the TP size of the save (core/splits.py):
- Megatron-Bridge LoRA on MoE experts (`mlp.experts.experts.linear_fc1/2`, tests/support/BRIDGE_FACTS.md) is stacked
  on a layer and a global expert axis, as TP=1 tensors (fc1 B `[gate; up]`); a tensor without the expert axis
  (shared-outer's shared side) is every expert's. Other expert layouts are refused with the key named.
- ModelOpt stores gated linear_fc1's LoRA B as a plain concatenation of TP shards, `[g0;u0;g1;u1;...]`
  (`rank_blocks`): read as tp_save shards of the gate_up layout.
- Megatron-Bridge stacks homogeneous layers (`decoder.layers.<rest>` with a leading layer axis) and
  stores linear_fc1's fused LoRA B as `[gate; up]` (one whole shard); its DoRA fc1 magnitude is not
  rearranged, so it is rank-interleaved like ModelOpt's B; and its SwiGLU rearrangement is also
  applied to CanonicalLoRA's separate gate/up B (`rank_halves`), storing
  `[s0 first half; s1 first half; ...; s0 second half; ...]`, which is undone to `[s0; s1; ...]`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple

from ..core.registry import DIALECTS, MODELOPT, TensorDecl, match_key
from ..core.shards import Role, ShardSpec, SpecTable, with_module
from ..core.splits import stored_row_pieces
from ..errors import DialectError, ShapeMismatchError

_BRIDGE_EXPERTS = re.compile(r"^decoder\.layers(?:\.\{i\}|\.\d+)\.mlp\.experts\.local_experts\.\{e\}\.linear_fc[12]$")
"""Routed experts as megatron saves them (SequentialMLP and TEGroupedMLP alike), on a global expert axis."""


@dataclass(frozen=True)
class AdapterKey:
    """One adapter tensor in a checkpoint."""

    key: str
    dialect: str
    module: str
    """Megatron module path; `{i}` marks Bridge's layer axis, `{e}` megatron's global expert axis."""
    role: Role
    part: str | None
    adapter_name: str | None
    tensor: TensorDecl
    """The dialect's declaration of this tensor (core/registry.py): its TP split and stored row layout."""
    axes: str = ""
    """The leading axes the tensor is stacked on, in order: `i` (layers), `e` (experts)."""

    @property
    def routed_expert(self) -> bool:
        """A routed expert's adapter (megatron saves those on a global expert axis; shared experts are dense MLPs)."""
        return "e" in self.axes


class OfflineShard(NamedTuple):
    """A shard spec and where its data is in a checkpoint tensor: an index into its leading axes and row ranges (a
    named tuple: an MoE checkpoint makes 10^5 of them). The spec is kept as a template shared by the key's shards and
    the shard's module: `spec` makes it, `specs_of` gives the plan many of them as columns, none made."""

    template: ShardSpec
    """The spec but its module (which is this shard's `module`)."""
    module: str
    key: str
    index: tuple[int, ...]
    """Index into the stacked leading axes (empty for an unstacked tensor)."""
    rows: tuple[tuple[int, int], ...] | None
    """(start, length) row ranges of the indexed tensor, concatenated; None for all of it."""

    @property
    def spec(self) -> ShardSpec:
        return with_module(self.template, self.module)


def specs_of(shards: list[OfflineShard]) -> SpecTable:
    """The shards' specs, as columns (`SpecTable`)."""
    return SpecTable(list(map(itemgetter(0), shards)), list(map(itemgetter(1), shards)))


@functools.cache
def _leaf_ends() -> tuple[str, ...]:
    """The fixed text ending every dialect's tensor leaf (after its last `{name}` or `{part}`)."""
    return tuple(sorted({decl.leaf.rsplit("}", 1)[-1] for dialect in DIALECTS for decl in dialect.tensors}))


def may_classify(key: str) -> bool:
    """False only for a key `classify` returns None for without raising (`may_classify_all`)."""
    return bool(may_classify_all([key]))


def may_classify_all(keys: Iterable[str]) -> list[str]:
    """The keys `classify` may return an AdapterKey for or raise on, tested without a regular expression (a large MoE
    checkpoint has 10^5 keys of extra state): an adapter key ends in its leaf's fixed end (or holds a newline, before
    which `$` matches too), and classify raises only for keys holding `.lora_A.` or `.lora_B.`."""
    ends = _leaf_ends()
    return [key for key in keys if key.endswith(ends) or "\n" in key or ".lora_A." in key or ".lora_B." in key]


def classify(key: str) -> AdapterKey | None:
    """An AdapterKey for adapter tensors of a known dialect, None for everything else (base weights, optimizer...)."""
    match = match_key(key)
    if match is None:
        if ".lora_A." in key or ".lora_B." in key:
            raise DialectError(
                f"{key}: peft-style LoRA applied directly to Megatron layers is not supported yet; expected ModelOpt "
                f"or Megatron-Bridge adapters"
            )
        return None
    if match.family != MODELOPT.family and ".mlp.experts." in match.module and not _BRIDGE_EXPERTS.match(match.module):
        raise DialectError(
            f"{key}: Megatron-Bridge expert adapter in a layout offline export does not read; expected "
            f"megatron's expert-stacked "
            "`mlp.experts.experts.linear_fc1/2` keys. Export expert adapters from the live model "
            "(export_adapter, or the training hook)"
        )
    return AdapterKey(
        key, match.family, match.module, match.tensor.role, match.part, match.adapter_name, match.tensor, match.axes
    )


def check_shape(found: AdapterKey, shape: tuple[int, ...], where: str) -> None:
    """A LoRA A or B is a matrix and a DoRA magnitude a vector, on the key's stacked axes (a Bridge expert tensor may
    lack its expert axis: one tensor for every expert); no axis may be empty."""
    matrix_dims = 1 if found.role == "magnitude" else 2
    allowed = {len(found.axes) + matrix_dims} | ({len(found.axes) - 1 + matrix_dims} if "e" in found.axes else set())
    if len(shape) not in allowed or 0 in shape:
        expected = " or ".join(f"{n} dimensions" for n in sorted(allowed))
        raise ShapeMismatchError(
            f"{where}: {found.key} has shape {list(shape)}; expected {expected}, none empty "
            f"({'a vector' if matrix_dims == 1 else 'a matrix'}"
            f"{' on stacked axes ' + found.axes if found.axes else ''})"
        )


def _matrices(found: AdapterKey, shape: tuple[int, ...], num_experts: int | None) -> list[tuple[tuple[int, ...], str]]:
    """(index into the stored tensor, module path) for each matrix (or magnitude vector) one checkpoint tensor holds.

    Each stacked axis gives one per entry; a Bridge expert tensor without its expert axis (shared-outer's shared
    side, one tensor for all experts) is every expert's, which needs `num_experts`. The module path is the key's
    with `{i}` and `{e}` replaced by the layer and expert (`None` for an axis the key does not have).
    """
    axes, matrix_dims = found.axes, 1 if found.role == "magnitude" else 2
    shared = "e" in axes and len(shape) == len(axes) - 1 + matrix_dims
    if shared:
        if not num_experts:
            raise DialectError(
                f"{found.key}: one adapter tensor for all experts, but the number of experts is not known; pass "
                f"--num-experts"
            )
        axes = axes.replace("e", "")
    out: list[tuple[tuple[int, ...], str]] = [((), found.module)]
    for axis, count in zip(axes, shape):  # in itertools.product's order: the first axis outermost
        mark = "{" + axis + "}"
        out = [(index + (n,), module.replace(mark, str(n))) for index, module in out for n in range(count)]
    for axis in "ie":
        if axis not in axes and not (shared and axis == "e") and "{" + axis + "}" in found.module:
            out = [(index, module.replace("{" + axis + "}", "None")) for index, module in out]
    if shared:
        out = [(index, module.replace("{e}", str(e))) for index, module in out for e in range(num_experts)]
    return out


def stored_per_rank(found: AdapterKey, gated: bool) -> bool:
    """Whether the tensor's rows are stored per TP rank of the save (undone with its TP size: `offline_shards` splits
    it), from the dialect's declaration alone. The layer and expert in a module path never change it."""
    return found.tensor.stored(found.module, found.part, gated) != "whole"


def offline_shards(
    found: AdapterKey,
    shape: tuple[int, ...],
    *,
    alpha: float,
    tp_save: int,
    gated: bool,
    dtype: str,
    num_experts: int | None = None,
) -> list[OfflineShard]:
    """Shard specs for one checkpoint tensor (every layer or expert of a stacked one), with the save-time layouts
    undone.

    `tp_save` is the tensor-parallel size the tensor was saved at (expert tensor parallelism for experts). Every
    matrix of the tensor has the same shape and stored layout (`stored_per_rank`): the specs of one are made once,
    and each matrix's are copies with its module path."""
    matrices = _matrices(found, shape, num_experts)
    if not matrices:
        return []
    local = shape[len(matrices[0][0]) :]
    layout = found.tensor.stored(found.module, found.part, gated)
    pieces = [None] if layout == "whole" else stored_row_pieces(layout, local[0], tp_save)
    templates = []
    for t, rows in enumerate(pieces):
        split = rows is not None
        spec = ShardSpec(
            module=found.module,
            role=found.role,
            part=found.part,
            shape=(sum(n for _, n in rows), *local[1:]) if split else tuple(local),
            split_dim=0 if split else None,
            tp_rank=t if split else 0,
            tp_size=tp_save if split else 1,
            alpha=alpha,
            dtype=dtype,
        )
        templates.append((spec, rows))
    return _shards_like(templates, matrices, found.key)


def _shards_like(
    templates: list[tuple[ShardSpec, tuple[tuple[int, int], ...] | None]],
    matrices: list[tuple[tuple[int, ...], str]],
    key: str,
) -> list[OfflineShard]:
    """Each matrix's shards: the templates on its module, made without OfflineShard's Python __new__ (10^5 of them in an
    MoE checkpoint)."""
    make = tuple.__new__
    return [
        make(OfflineShard, (spec, module, key, index, rows)) for index, module in matrices for spec, rows in templates
    ]
