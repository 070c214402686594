"""Adapter dialects: how each LoRA implementation names and shards its tensors on a live model.

A dialect looks at one module and, if that module carries its adapter, yields the adapter's
tensors with their role. Sharding comes from megatron's own parameter attributes
(`tensor_model_parallel`, `partition_dim`), not from names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..core.plan import OUTPUT_LAYER
from ..core.shards import ShardSpec
from ..errors import DialectError
from . import bridge, modelopt
from .base import FoundTensor, Reader, Refusal, attribute

Read = Callable[[Any, str], Any]
"""`getattr(obj, name, None)` as `dialects.base.attribute` answers it (that function, or a walk's `Reader`)."""


class Dialect(Protocol):
    NAME: str

    def find(self, module: torch.nn.Module, adapter_name: str, read: Read = attribute) -> Iterator[FoundTensor] | None:
        """None when the module carries no adapter of this dialect; else its tensors for `adapter_name`."""

    def adapter_names(self, module: torch.nn.Module) -> set[str]:
        """Adapter names on a module this dialect owns (for error messages)."""


LIVE_DIALECTS: tuple[Dialect, ...] = (modelopt, bridge)
"""The live matchers, one per dialect family; the tensors each looks for are core/registry.py's declarations."""


@dataclass
class LocalShard:
    spec: ShardSpec
    tensor: torch.Tensor
    source: bool = True
    """True when this rank's copy is the one exported (one data-parallel replica; experts: one expert-DP replica)."""


@dataclass
class Collected:
    """What one rank found: the dialects present, adapter names seen, and its shards of the requested adapter."""

    dialects: set[str]
    adapter_names: set[str]
    shards: list[LocalShard]
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(reason, global module path) of each module whose adapter no HF adapter reproduces (see `raise_refusals`)."""
    carriers: list[tuple[torch.nn.Module, Dialect]] = field(default_factory=list)
    """(module, dialect) of every module that carries an adapter of that dialect (of any name), in walk order."""


@dataclass(frozen=True)
class _Where:
    """A module's global Megatron path and, for experts, the expert-parallel groups it is sharded over."""

    path: str
    expert_tp: tuple[int, int] | None = None
    expert_dp_source: bool | None = None
    expert_offset: int | None = None
    """Grouped experts: the global index of local expert 0; `path` holds `{e}` for the expert a tensor is for."""

    def tensor_path(self, expert: int | None, module: str, dialect: str) -> str:
        if (expert is None) == (self.expert_offset is None):
            return self.path if expert is None else self.path.replace("{e}", str(self.expert_offset + expert))
        if expert is None:
            raise DialectError(
                f"found a {dialect} adapter on the grouped experts linear {module!r} without per-expert tensors; "
                f"expected "
                "Megatron-Bridge LoRA on grouped experts (shared, per-expert or shared-outer), or SequentialMLP experts"
            )
        raise DialectError(
            f"found per-expert {dialect} adapter tensors on {module!r}, which is not a grouped experts linear"
        )


def _experts(named: list[tuple[str, torch.nn.Module]], expert_dp_source: bool, read: Read) -> dict[str, _Where]:
    """Where the experts of each MoE layer go, from megatron's expert modules (EP, expert-TP and expert-DP groups).

    SequentialMLP: `<experts>.local_experts.<k>` -> global expert `ep_rank * num_local_experts + k`. Grouped experts
    (TEGroupedMLP: `linear_fc1`/`linear_fc2` with one GEMM per local expert, no expert-DP group of its own):
    `<experts>`,
    with the expert left to each tensor.
    """
    found = {}
    for name, module in named:
        if read(module, "num_local_experts") is None or any(read(module, a) is None for a in ("ep_group", "tp_group")):
            continue
        offset = module.ep_group.rank() * module.num_local_experts
        tp = (module.tp_group.rank(), module.tp_group.size())
        dp_group = read(module, "dp_group")
        source = expert_dp_source if dp_group is None else dp_group.rank() == 0
        if read(module, "local_experts") is not None:
            for k in range(module.num_local_experts):
                found[f"{name}.local_experts.{k}"] = _Where(f"local_experts.{offset + k}", tp, source)
        elif read(module, "linear_fc1") is not None:  # not the MoE layer itself, which has these groups too
            found[name] = _Where("local_experts.{e}", tp, source, offset)
    return found


def _enclosing(name: str, prefixes: dict[str, _Where]) -> str | None:
    """The longest of `prefixes` that is `name` or a dotted ancestor of it: one lookup per path depth, not a scan."""
    while True:
        if name in prefixes:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]


def _path_parts(named: list[tuple[str, torch.nn.Module]]) -> dict[str, tuple[str, str, str]]:
    """Module name -> (head, anchor, rest) for the names under a transformer layer or the output layer: `anchor` the
    last `decoder.layers.<i>` or `output_layer` components of the name, `head` the name up to and with them, `rest`
    the components after them.

    Each name's split is its parent's with one component more (`named_modules` lists parents first), or a new anchor:
    one dictionary lookup per module instead of a backtracking match of the whole name.
    """
    parts: dict[str, tuple[str, str, str]] = {}
    for name, _ in named:
        parent, _, last = name.rpartition(".")
        if last == OUTPUT_LAYER:
            parts[name] = (name, OUTPUT_LAYER, "")
        elif last.isdecimal() and (parent == "decoder.layers" or parent.endswith(".decoder.layers")):
            parts[name] = (name, "decoder.layers." + last, "")
        elif parent in parts:
            head, anchor, rest = parts[parent]
            parts[name] = (head, anchor, f"{rest}.{last}")
    return parts


def _global_paths(
    named: list[tuple[str, torch.nn.Module]], expert_dp_source: bool, read: Read = attribute
) -> dict[str, _Where]:
    """Module name -> Megatron path with global layer (`layer_number` is 1-based and global) and expert indices.

    `named` is the chunk's `named_modules()`, listed once by the caller and read here in linear passes, never rescanned
    per module.
    """
    parts = _path_parts(named)
    layer_of = {}
    for name, module in named:
        split = parts.get(name)
        if split is not None and not split[2] and split[1] != OUTPUT_LAYER and read(module, "layer_number") is not None:
            layer_of[name] = f"decoder.layers.{module.layer_number - 1}"
    experts = _experts(named, expert_dp_source, read)
    paths = {}
    for name, (head, anchor, rest) in parts.items():
        if anchor == OUTPUT_LAYER:
            paths[name] = _Where(OUTPUT_LAYER + rest)
        elif head in layer_of:
            expert = _enclosing(name, experts)
            if expert is None:
                paths[name] = _Where(layer_of[head] + rest)
            else:
                where = experts[expert]
                local = expert[len(head) :].rsplit(".local_experts.", 1)[0] + "." + where.path + name[len(expert) :]
                paths[name] = _Where(
                    layer_of[head] + local, where.expert_tp, where.expert_dp_source, where.expert_offset
                )
    return paths


def named_modules(chunk: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """`list(chunk.named_modules())`: the same modules, names and order (depth first, children in registration order,
    each module once), listed with one stack instead of a generator per level (whose yields pass up through every
    level above: ~10 per module in a MoE model). A model whose classes define their own `named_modules` is listed
    by it."""
    found: list[tuple[str, torch.nn.Module]] = []
    memo: set[torch.nn.Module] = set()
    classes: set[type] = set()
    stack = [("", chunk)]
    pop, push = stack.pop, stack.extend
    while stack:
        name, module = pop()
        if module in memo:
            continue
        memo.add(module)
        classes.add(type(module))
        found.append((name, module))
        children = module._modules
        if children:
            prefix = name + "." if name else ""
            push(reversed([(prefix + key, child) for key, child in children.items() if child is not None]))
    if any(cls.named_modules is not torch.nn.Module.named_modules for cls in classes):
        return list(chunk.named_modules())
    return found


def collect(
    chunks: Iterable[torch.nn.Module],
    adapter_name: str,
    tp_rank: int,
    tp_size: int,
    dp_source: bool = True,
    expert_dp_source: bool = True,
    visit: Callable[[str, torch.nn.Module, Read], None] | None = None,
) -> Collected:
    """Walk model chunks (VPP or one) and collect this rank's tensors of `adapter_name`, with global paths.

    A tensor's TP coordinates come from the process group of the megatron linear that owns it (expert
    linears: expert TP), else (tp_rank, tp_size); a split over a group of one is no split. Experts are
    replicated over the expert data-parallel group (SequentialMLP's, else `expert_dp_source`), everything
    else over data parallelism (`dp_source`). A grouped-experts adapter yields its tensors per local
    expert; each becomes that global expert's (a shared tensor: every local expert's).

    One walk: each chunk's modules are listed once (`named_modules`) and read through one `Reader`; `visit(name,
    module, read)`, when given, sees every module of that walk (the export's quantization scan).
    """
    found = Collected(set(), set(), [])
    read = Reader()
    dtypes: dict[torch.dtype, str] = {}
    for chunk in chunks:
        named = named_modules(chunk)
        paths = None  # computed at the first module that carries an adapter
        for name, module in named:
            if visit is not None:
                visit(name, module, read)
            for dialect in LIVE_DIALECTS:
                tensors = dialect.find(module, adapter_name, read)
                if tensors is None:
                    continue
                found.carriers.append((module, dialect))
                found.dialects.add(dialect.NAME)
                found.adapter_names |= dialect.adapter_names(module)
                if paths is None:
                    paths = _global_paths(named, expert_dp_source, read)
                if name not in paths:
                    raise DialectError(
                        f"found {dialect.NAME} adapter on module {name!r}, which is not under decoder.layers.<i> or "
                        "output_layer; expected adapters on transformer-layer linears or the output layer"
                    )
                where = paths[name]
                for t in tensors:
                    if isinstance(t, Refusal):
                        found.refused.append((t.reason, where.path.replace("{e}", "*")))
                        continue
                    rank, size = (
                        (t.tp_group.rank(), t.tp_group.size())
                        if t.tp_group is not None
                        else where.expert_tp or (tp_rank, tp_size)
                    )
                    dtype = t.tensor.dtype
                    spec = ShardSpec(
                        module=where.tensor_path(t.expert, name, dialect.NAME),
                        role=t.role,
                        part=t.part,
                        shape=tuple(t.tensor.shape),
                        split_dim=t.split_dim if size > 1 else None,
                        tp_rank=rank,
                        tp_size=size,
                        alpha=float(t.alpha),
                        dtype=dtypes.get(dtype) or dtypes.setdefault(dtype, str(dtype).removeprefix("torch.")),
                    )
                    source = dp_source if where.expert_dp_source is None else where.expert_dp_source
                    found.shards.append(LocalShard(spec, t.tensor, source))
    return found


_INDEX = re.compile(r"(?<=\.layers\.)\d+|(?<=\.local_experts\.)\d+")


def _indices(values: Iterable[int]) -> str:
    ordered = sorted(set(values))
    if len(ordered) == 1:
        return str(ordered[0])
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{{{ordered[0]}..{ordered[-1]}}}"
    return "{" + ",".join(map(str, ordered)) + "}"


def name_modules(paths: Iterable[str]) -> str:
    """Module paths, layers and experts folded: `decoder.layers.{0..3}.mlp.linear_fc2, output_layer`."""
    groups: dict[str, list[list[int]]] = {}
    for path in paths:
        numbers = [int(m.group()) for m in _INDEX.finditer(path)]
        template = _INDEX.sub("#", path)
        slots = groups.setdefault(template, [[] for _ in numbers])
        for slot, number in zip(slots, numbers):
            slot.append(number)
    named = []
    for template, slots in groups.items():
        parts = template.split("#")
        named.append(parts[0] + "".join(_indices(slot) + rest for slot, rest in zip(slots, parts[1:])))
    return ", ".join(sorted(named))


def raise_refusals(refused: Iterable[tuple[str, str]], prefix: str = "") -> None:
    """One DialectError naming every refused module (the same on every rank when given every rank's refusals)."""
    by_reason: dict[str, list[str]] = {}
    for reason, path in refused:
        by_reason.setdefault(reason, []).append(path)
    if by_reason:
        raise DialectError(
            prefix
            + "; ".join(reason.replace("{modules}", name_modules(paths)) for reason, paths in sorted(by_reason.items()))
        )
