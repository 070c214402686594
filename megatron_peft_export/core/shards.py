"""Shards and placements: the plain data the core works on.

A shard is one adapter tensor as one rank holds it; a placement says which slice of which
HF tensor a slice of that shard fills. Placements are computed from metadata alone, so the
writer can allocate every HF tensor before a single byte moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from operator import attrgetter
from typing import Literal, NamedTuple

Role = Literal["lora_A", "lora_B", "magnitude"]
ROLES: tuple[Role, ...] = ("lora_A", "lora_B", "magnitude")


@dataclass(frozen=True, kw_only=True)
class ShardSpec:
    """One local adapter tensor and where it sits in its global Megatron tensor."""

    module: str
    """Megatron module path with the GLOBAL layer index, e.g. `decoder.layers.3.mlp.linear_fc1`."""
    role: Role
    """lora_A ([r, in]), lora_B ([out, r]) or the DoRA magnitude ([out])."""
    shape: tuple[int, ...]
    """Local shape on this rank."""
    split_dim: int | None
    """Tensor-parallel split axis, or None when every TP rank holds the whole tensor."""
    tp_rank: int
    tp_size: int
    alpha: float
    """HF lora_alpha for this module: the LoRA output is scaled by alpha / r."""
    part: str | None = None
    """CanonicalLoRA sub-adapter (q, k, v, gate, up) of a fused module; None for the fused adapter."""
    dtype: str = "float32"

    @property
    def is_replica(self) -> bool:
        """True for a copy that another TP rank holds too; only TP rank 0's copy is exported."""
        return self.split_dim is None and self.tp_rank != 0

    @property
    def global_shape(self) -> tuple[int, ...]:
        if self.split_dim is None:
            return self.shape
        dims = list(self.shape)
        dims[self.split_dim] *= self.tp_size
        return tuple(dims)

    def describe(self) -> str:
        part = f" ({self.part})" if self.part else ""
        return f"{self.module}{part} {self.role} shape {self.shape} at tp_rank {self.tp_rank}/{self.tp_size}"


_PLAIN_SPEC = not hasattr(ShardSpec, "__post_init__") and not hasattr(ShardSpec, "__slots__")


def with_module(spec: ShardSpec, module: str) -> ShardSpec:
    """`dataclasses.replace(spec, module=module)`, made without running ShardSpec's __init__ when it is a plain
    dataclass (no __post_init__ to run, no slots): what an offline MoE export does for 10^5 specs."""
    if not _PLAIN_SPEC:
        return replace(spec, module=module)
    copy = object.__new__(ShardSpec)
    state = copy.__dict__
    state.update(spec.__dict__)
    state["module"] = module
    return copy


class SpecTable(Sequence):
    """Shard specs given as columns: spec n is `templates[n]` with its module `modules[n]` (a template object is
    shared by many shards). An offline MoE export plans 10^5 specs that differ in module alone; making a ShardSpec
    for each cost more than planning them, so the planner reads columns (`spec_column`) and a spec is made only
    where one is asked for (`table[n]`)."""

    __slots__ = ("templates", "modules")

    def __init__(self, templates: list[ShardSpec], modules: list[str]) -> None:
        if len(templates) != len(modules):
            raise ValueError(f"{len(templates)} templates for {len(modules)} modules; expected one per module")
        self.templates, self.modules = templates, modules

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, n):
        if isinstance(n, slice):
            return [with_module(t, m) for t, m in zip(self.templates[n], self.modules[n])]
        return with_module(self.templates[n], self.modules[n])

    def column(self, name: str) -> list:
        """Every spec's field `name`, in order."""
        return self.modules if name == "module" else list(map(attrgetter(name), self.templates))


def spec_column(specs: Sequence[ShardSpec], name: str) -> list:
    """Every spec's field `name`, in order: from a SpecTable's columns, or from each spec."""
    if isinstance(specs, SpecTable):
        return specs.column(name)
    return list(map(attrgetter(name), specs))


class Placement(NamedTuple):
    """Copy `length` entries along `dim`, from `src_start` in the shard to `dst_start` in the HF tensor (a named tuple:
    an MoE export makes 10^5 of them)."""

    key: str
    shape: tuple[int, ...]
    dim: int
    dst_start: int
    src_start: int
    length: int


class StampedPlacements(Sequence):
    """Each shard's placements (`AdapterPlan.placements`) as the bulk planner stamps them out: every placement's key,
    shards in order (`keys`; shard n's are `keys[firsts[n]:firsts[n + 1]]`), and per combination of shards its
    placements but their keys (`rests[c]`: shape, dim, destination start, source start, length; shard n's combination
    is `combination_of[n]`). A plan of SpecTable specs keeps its placements so: an offline MoE export copies 10^5 of
    them by byte ranges computed from these columns, and `table[n]` makes shard n's Placement objects only where a
    caller asks for them."""

    __slots__ = ("keys", "firsts", "combination_of", "rests")

    def __init__(self, keys: list[str], counts: list[int], combination_of: list[int], rests: list[list[tuple]]) -> None:
        self.keys, self.combination_of, self.rests = keys, combination_of, rests
        self.firsts = list(accumulate(counts, initial=0))
        if len(self.firsts) != len(combination_of) + 1 or self.firsts[-1] != len(keys):
            raise ValueError(f"{len(keys)} keys for {sum(counts)} placements of {len(combination_of)} shards")

    def __len__(self) -> int:
        return len(self.combination_of)

    def __getitem__(self, n):
        if isinstance(n, slice):
            return [self[i] for i in range(*n.indices(len(self)))]
        n = range(len(self))[n]  # negative indices and IndexError as a list's
        keys = self.keys[self.firsts[n] : self.firsts[n + 1]]
        return [tuple.__new__(Placement, (key, *rest)) for key, rest in zip(keys, self.rests[self.combination_of[n]])]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, StampedPlacements)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]
