"""The collective export: every rank snapshots; the writer plans (every rank raises a plan's error), gathers bytes,
converts and publishes.

`export_adapter` (live.py) runs it synchronously; the training hook takes the snapshot on the training thread
and runs the rest in the background on its own process group.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import math
import operator
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed as coll
from .compat import log_findings
from .core.archs import ArchMap
from .core.experts import FusedLayout, fuse_experts, fused_layout, refuse_missing_layout
from .core.geometry import ModelGeometry
from .core.options import check_fields, config_class
from .core.peft_format import adapter_config, model_card
from .core.plan import AdapterPlan, BulkCopy, apply_placements, plan_adapter
from .core.rank_padding import pad_ranks
from .core.shards import ShardSpec
from .dialects import LocalShard, collect, raise_refusals
from .errors import DialectError, ExportError, NoAdaptersError
from .io import safetensors_out
from .io.atomic_dir import discard, staging_dir
from .io.hf_config import choose_arch, parse_dtype, read_hf_config
from .io.peft_dir import check_finite, write_staging
from .quantization import Described
from .quantization import summary as quantization_summary

log = logging.getLogger("megatron_peft_export")
WRITER = 0


@config_class("hook", "ExportOptions")
class ExportOptions:
    """What to write and how to name it (the same for every rank); the fields are the options of the schema
    (`core/options.py`) on the ExportOptions surface, checked when made. `dtype` may be a torch.dtype too."""

    def __post_init__(self) -> None:
        check_fields(self)

    def inputs(self) -> list[tuple[Path, str]]:
        """What an export reads from disk besides the model: the base model's directory, when it is a local one."""
        base = self.base_model_name_or_path
        return [(Path(base), "the base model directory being read")] if base and Path(base).is_dir() else []


@dataclass
class _Report:
    """What a rank tells the others before any byte moves."""

    error: ExportError | None = None
    dialects: set[str] = field(default_factory=set)
    adapter_names: set[str] = field(default_factory=set)
    specs: list[ShardSpec] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(reason, module) of this rank's modules whose adapter no HF adapter reproduces: the export refuses them all,
    named."""
    geometry: ModelGeometry | None = None
    megatron_vocab: int | None = None
    hf_config: dict[str, Any] | None = None
    quantization: set[str] = field(default_factory=set)
    """How this rank's base linears are quantized (QLoRA-style training), for the model card."""
    walk: int | None = None
    """The cached walk this report comes from (host_snapshot.py; unique in the process), None when not cached: two
    reports of one walk are the same report (but `hf_config`, which `export_adapter` reads again at every export), so
    the writer reuses its plan of the same walks (`_planned`)."""


@dataclass
class Snapshot:
    """One rank's adapter shards at one moment, with the report the other ranks need."""

    report: _Report
    shards: list[LocalShard]
    carriers: list = dataclasses.field(default_factory=list)
    """(module, dialect) of every module carrying an adapter (from the walk; the hook's change check reads them)."""
    plans: dict | None = None
    """The writer's plans of reports of the cached walk this snapshot comes from (`_planned`); None: not cached. Held
    by the walk, so they go with it."""


_COLLECTION = {"paused": 0, "was_enabled": False}
_COLLECTION_LOCK = threading.Lock()


@contextmanager
def paused_collection() -> Iterator[None]:
    """Python's cyclic garbage collector off while an export walks, plans or writes (and while the hook's training
    thread snapshots): they allocate ~10 objects per adapter tensor, and every few hundred allocations the collector
    would traverse the whole model's objects (millions at MoE scale), which made the walk grow quadratically. What
    they leave is collected later. Counted, so overlapping users (the hook's background export and a save on the
    training thread) restore it once, at the end of the last."""
    with _COLLECTION_LOCK:
        if not _COLLECTION["paused"]:
            _COLLECTION["was_enabled"] = gc.isenabled()
            gc.disable()
        _COLLECTION["paused"] += 1
    try:
        yield
    finally:
        with _COLLECTION_LOCK:
            _COLLECTION["paused"] -= 1
            if not _COLLECTION["paused"] and _COLLECTION["was_enabled"]:
                gc.enable()


def model_chunks(model: Any) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def megatron_config(chunk: torch.nn.Module) -> tuple[Any, int | None]:
    """The TransformerConfig and padded vocabulary of a (possibly wrapped) megatron-core model."""
    while not hasattr(chunk, "config") and hasattr(chunk, "module"):
        chunk = chunk.module
    if not hasattr(chunk, "config"):
        raise ExportError(f"expected a megatron-core model (with .config), found {type(chunk).__name__}")
    return chunk.config, getattr(chunk, "vocab_size", None)


def model_geometry(chunk: torch.nn.Module) -> tuple[ModelGeometry, int | None]:
    """The geometry of a (possibly wrapped) megatron-core model and its padded vocabulary; a hybrid model (MambaModel)
    adds its layer pattern."""
    config, vocab = megatron_config(chunk)
    while not hasattr(chunk, "config") and hasattr(chunk, "module"):
        chunk = chunk.module
    pattern = getattr(chunk, "hybrid_override_pattern", None)
    return ModelGeometry.from_megatron(config, layer_pattern=pattern if isinstance(pattern, str) else None), vocab


@paused_collection()
def take_snapshot(model: Any, layout: coll.RankLayout, options: ExportOptions, *, copy: bool) -> Snapshot:
    """This rank's shards of the adapter (copied to host memory when `copy`); errors go into the report."""
    report = _Report()
    shards: list[LocalShard] = []
    carriers: list = []
    try:
        chunks = model_chunks(model)
        report.geometry, report.megatron_vocab = model_geometry(chunks[0])
        quantized = Described()  # rides along the one walk of the modules
        found = collect(
            chunks,
            options.adapter_name,
            layout.tp_rank,
            layout.tp_size,
            layout.is_data_parallel_source,
            layout.is_expert_data_parallel_source,
            visit=quantized,
        )
        report.quantization = quantized.found
        report.dialects, report.adapter_names, report.refused = found.dialects, found.adapter_names, found.refused
        carriers = found.carriers
        shards = [s for s in found.shards if s.source and not s.spec.is_replica]  # replicas are never sent
        if copy:
            shards = [LocalShard(s.spec, s.tensor.detach().to("cpu", copy=True)) for s in shards]
        report.specs = [s.spec for s in shards]
        if layout.rank == WRITER:
            report.hf_config = read_hf_config(options.base_model_name_or_path)
    except ExportError as exc:
        report.error = exc
        shards = []
    return Snapshot(report, shards, carriers)


def _report_key(report: _Report, options: ExportOptions) -> tuple | None:
    """What names `report` on the writer once it has it (`coll.gather_held`): its walk and adapter (a walk reports each
    of its adapters), None when it is not of a cached walk or carries an error. The writer reads no other rank's
    `hf_config`, the one field two reports of one walk may differ in."""
    if report.walk is None or report.error is not None:
        return None
    return report.walk, options.adapter_name


@dataclass
class _Planned:
    """The writer's plan of one export, and what depends on it alone (reused while the reports stay those of the same
    walks: `_planned`)."""

    plan: AdapterPlan
    dialect: str
    ordered: list[tuple[int, int, ShardSpec]]
    names: Naming
    fused: Any = None
    """`fused_layout` of the plan, once `allocate_adapter` has asked for it (False: not the plain case)."""
    configs: dict = field(default_factory=dict)
    """The adapter configs of the plan (`stage_adapter`)."""
    runs: dict = field(default_factory=dict)
    """((rank, transfer), whether fused tensors are stacked, output dtype) -> `_runs` of those shards' placements."""
    ranks: dict | None = None
    """Each rank's positions in `ordered` and transfers (`_ranks`), once `_gather` has listed them."""
    payloads: dict = field(default_factory=dict)
    """(fused layout, output dtype) -> the entries and layout of this plan's `safetensors_out.Payload`, which
    `allocate_adapter` reuses."""
    received: dict = field(default_factory=dict)
    """((rank, transfer), whether fused tensors are stacked, output dtype) -> `_byte_copies` of that transfer (None:
    placed by `_place`), once `_place_received` has listed them."""
    own: dict = field(default_factory=dict)
    """((rank, transfer), whether fused tensors are stacked) -> those shards' placements (`_own_slices`), once `_place`
    has listed them."""


_PLANS_KEPT = 8
"""Plans a walk keeps (one per adapter, options and other ranks' walks; the oldest goes first)."""


def _planned(reports: list[_Report], options: ExportOptions, plans: dict | None) -> _Planned:
    """`_plan`, or its plan of the same reports: every rank's report comes from the same cached walk as then (each
    walk is one report: `_Report.walk`), with the same options `_plan` reads and the same base model config. A failed
    plan is never kept (it raises again)."""
    walks = tuple(r.walk for r in reports)
    key = (
        None
        if plans is None or None in walks
        else (walks, options.adapter_name, options.model_type, options.expert_layout)
    )
    hf_config = reports[WRITER].hf_config
    if key is not None and key in plans and plans[key][0] == hf_config:
        return plans[key][1]
    planned = _Planned(*_plan(reports, options))
    if key is not None:
        plans.pop(key, None)
        while len(plans) >= _PLANS_KEPT:
            plans.pop(next(iter(plans)))
        plans[key] = (hf_config, planned)
    return planned


def _plan(
    reports: list[_Report], options: ExportOptions
) -> tuple[AdapterPlan, str, list[tuple[int, int, ShardSpec]], Naming]:
    """On the writer, from every rank's report (`run_export` broadcasts its outcome: every rank raises its error)."""
    dialects = set().union(*(r.dialects for r in reports))
    if not dialects:
        raise NoAdaptersError(
            "no adapter tensors found on any rank; expected ModelOpt LoRA (lora_a_<name>/lora_b_<name>) or "
            "Megatron-Bridge LoRA/CanonicalLoRA/DoRA (adapter.linear_in/linear_out). Apply the adapter before "
            "exporting."
        )
    if len(dialects) > 1:
        raise DialectError(
            f"found adapters of several dialects ({', '.join(sorted(dialects))}); expected one per model"
        )
    raise_refusals(item for r in reports for item in r.refused)
    ordered = [(rank, i, spec) for rank, r in enumerate(reports) for i, spec in enumerate(r.specs)]
    if not ordered:
        names = sorted(set().union(*(r.adapter_names for r in reports)))
        raise NoAdaptersError(
            f"no adapter named {options.adapter_name!r}; the model has adapters {names}. Pass adapter_name="
        )
    first = reports[WRITER]
    names = naming(options.model_type, first.hf_config, first.geometry)
    plan = plan_adapter([spec for _, _, spec in ordered], names.geometry, names.arch, first.megatron_vocab)
    writes_fused(options.expert_layout, names.arch)
    return plan, dialects.pop(), ordered, names


@dataclass(frozen=True)
class Naming:
    """The HF name map and the model geometry (checked against the base model's config when there is one)."""

    arch: ArchMap
    geometry: ModelGeometry


def naming(model_type: str | None, hf_config: dict[str, Any] | None, geometry: ModelGeometry) -> Naming:
    """The HF name map, and the geometry checked against the base model's config (which also gives the real
    vocabulary)."""
    arch = choose_arch(model_type, hf_config)
    if hf_config is None:
        return Naming(arch, geometry)
    hf = ModelGeometry.from_hf_config(hf_config, geometry.gated_linear_unit)
    geometry.check_matches(hf, "the base model's config.json")
    return Naming(arch, dataclasses.replace(geometry, vocab_size=hf.vocab_size))


def writes_fused(option: str, arch: ArchMap) -> bool:
    """Whether MoE experts are written in transformers v5's fused layout; refuses a per-expert layout the family has
    not (before any byte moves: the planners call this right after planning)."""
    if refuse_missing_layout(option, arch):
        return True
    if option != "auto":
        return option == "fused"
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def stage_adapter(
    tmp: Path,
    plan: AdapterPlan,
    tensors: dict[str, torch.Tensor],
    options: ExportOptions,
    names: Naming,
    *,
    dialect: str,
    source: str,
    extra_files: dict[str, bytes] | None = None,
    quantization: str | None = None,
    fused: dict[str, list[str]] | None = None,
    configs: dict | None = None,
) -> None:
    """Write config, card and weights into the staging directory (MoE experts in the chosen layout, ranks padded when
    asked). `fused` (from `allocate_adapter`): `tensors` are in the fused layout already. `configs` (held with the
    plan, `_Planned.configs`): the adapter configs made of this very plan, reused (a copy) while it is not padded or
    fused here.

    Logs what vLLM would refuse, serve wrong or need engine flags for in the result (`compat`, for the name map's
    family);
    `quantization` describes the base for the card.
    """
    key = (options.base_model_name_or_path, names.arch.name, fused is not None)
    if fused is None and options.pad_rank_to is not None:
        plan, tensors, configs = *pad_ranks(plan, tensors, options.pad_rank_to), None
    if fused is None and _fuses(options, names):
        tensors, fused = fuse_experts(
            plan, tensors, names.arch, names.geometry.num_experts
        )  # what vLLM makes of it: log_findings below
        configs = None
    config = None if configs is None else configs.get(key)
    if config is None:
        config = adapter_config(
            plan, options.base_model_name_or_path, fused_experts=fused or None, model_type=names.arch.name
        )
        if configs is not None:
            configs[key] = config
    config = copy.deepcopy(config)
    log_findings(
        config,
        safetensors_out.shapes(tensors),
        f"the adapter from {source}",
        model_type=names.arch.name,
    )
    card = model_card(config, dialect=dialect, source=source, num_tensors=len(tensors), quantization=quantization)
    write_staging(tmp, tensors=tensors, config=config, card=card, extra_files=extra_files)


def _gather(
    snapshot: Snapshot, planned: _Planned, allocated: Allocated | None, group: Any, failure: Exception | None
) -> Exception | None:
    """The writer: receive every other rank's shards (one message per bucket) and place every shard into the HF
    tensors (its own shards at once when they are in host memory, by `_place`, else queued views, copied in bulk;
    another rank's bucket by bucket as each arrives, by `_place_received`). Every send is received, even after a
    failure, so no sender hangs; the first failure is returned."""
    ordered, plan = planned.ordered, planned.plan
    copies = BulkCopy()
    if planned.ranks is None:
        planned.ranks = _ranks(ordered)
    for rank, (positions, indices, buckets) in planned.ranks.items():
        mine = rank == WRITER
        if mine and failure is None:
            try:
                shards = list(map(_TENSOR, map(snapshot.shards.__getitem__, indices)))
                if all(map(_IS_CPU, shards)):
                    _place(shards, planned, (rank, None), positions, allocated)
                    continue
            except Exception as exc:
                failure = exc
                continue
        for b, bucket in enumerate([range(len(positions))] if mine else buckets):
            if not mine:
                shapes = [ordered[positions[k]][2].shape for k in bucket]
                dtype = getattr(torch, ordered[positions[bucket[0]]][2].dtype)
                flat = coll.receive_flat(shapes, dtype, rank, group)  # every send is received, even after a failure
                if failure is None:
                    try:
                        _place_received(flat, shapes, planned, (rank, b), [positions[k] for k in bucket], allocated)
                    except Exception as exc:
                        failure = exc
                continue
            if failure is not None:
                continue
            try:
                for k in bucket:  # the writer's own shards, each off the device in turn
                    shard = snapshot.shards[indices[k]].tensor.detach()
                    shard = shard if shard.device.type == "cpu" else coll.host_copy(shard)
                    apply_placements(allocated.targets, plan.placements[positions[k]], shard, copies)
            except Exception as exc:
                failure = exc
    if failure is None:
        try:
            copies.flush()
        except Exception as exc:
            failure = exc
    return failure


def _place_received(
    flat: torch.Tensor,
    shapes: list[tuple[int, ...]],
    planned: _Planned,
    which: tuple,
    positions: list[int],
    allocated: Allocated,
) -> None:
    """Another rank's transfer (`flat`: its shards at `positions` in `ordered`, back to back) into the HF tensors: by
    its byte copies into the file's payload (`_byte_copies`, listed once per plan and output layout; no tensor made
    per shard), else as views placed as the writer's own shards are (`_place`)."""
    key = (which, allocated.layout is not None, allocated.dtype)
    copies = planned.received.get(key, _UNLISTED)
    if copies is _UNLISTED:
        copies = planned.received[key] = _byte_copies(planned, positions, shapes, flat.dtype, allocated.written)
    if copies is None:
        _place(coll.split_flat(flat, shapes), planned, which, positions, allocated)
        return
    safetensors_out.copy_segments(allocated.written.buffer(), flat.view(torch.uint8).numpy(), *copies)


_UNLISTED = object()


def _byte_copies(
    planned: _Planned,
    positions: list[int],
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    written: Any,
) -> tuple[Any, Any, Any] | None:
    """The placements of shards laid back to back (`shapes`, of `dtype`; at `positions` in `ordered`) as byte copies
    into the payload `written`, as `safetensors_out.copy_segments`' arrays (first byte in the shards, first byte in
    the payload, bytes), in payload order, each merged with the next when both continue it. None when some placement
    is not a plain byte copy: into a view of a fused tensor (not in the payload by name), into another dtype (a
    conversion), between shapes that differ off the placement's dim (a broadcast)."""
    if not isinstance(written, safetensors_out.Payload):
        return None
    where, entries, placements = written.where, written.entries, planned.plan.placements
    size = dtype.itemsize
    copies = []
    at = 0
    for n, shape in zip(positions, shapes):
        for p in placements[n]:
            span, entry = where.get(p.key), entries.get(p.key)
            if span is None or entry[0] != dtype or len(entry[1]) != len(shape):
                return None
            full, dim = entry[1], p.dim
            if any(a != b for i, (a, b) in enumerate(zip(shape, full)) if i != dim):
                return None
            inner = math.prod(shape[dim + 1 :]) * size  # bytes per index along `dim`
            src, dst, length = at + p.src_start * inner, span[0] + p.dst_start * inner, p.length * inner
            for _ in range(math.prod(shape[:dim])):  # one copy per index before `dim` (none when dim is 0)
                if length:
                    copies.append((src, dst, length))
                src, dst = src + shape[dim] * inner, dst + full[dim] * inner
        at += math.prod(shape) * size
    copies.sort(key=operator.itemgetter(1))
    merged: list[list[int]] = []
    for src, dst, length in copies:
        if merged and merged[-1][0] + merged[-1][2] == src and merged[-1][1] + merged[-1][2] == dst:
            merged[-1][2] += length
        else:
            merged.append([src, dst, length])
    import numpy as np

    starts, dsts, lengths = np.array(merged, dtype=np.int64).reshape(-1, 3).T
    return starts, dsts, lengths


def _ranks(ordered: list[tuple[int, int, ShardSpec]]) -> dict[int, tuple[list[int], list[int], list[list[int]]]]:
    """rank -> (positions in `ordered` of its specs, their indices among its shards, its transfers: `_transfers` of
    its specs, as it sends them), listed once per plan (`_Planned.ranks`)."""
    by_rank: dict[int, tuple[list[int], list[int]]] = {}
    for n, (rank, i, _) in enumerate(ordered):
        positions, indices = by_rank.setdefault(rank, ([], []))
        positions.append(n)
        indices.append(i)
    return {
        rank: (
            positions,
            indices,
            [] if rank == WRITER else _transfers([ordered[n][2] for n in positions]),
        )
        for rank, (positions, indices) in by_rank.items()
    }


_IS_CPU, _TENSOR = operator.attrgetter("is_cpu"), operator.attrgetter("tensor")
_SPEC, _SHAPE_AND_DTYPE = operator.attrgetter("spec"), operator.attrgetter("shape", "dtype")


def _transfers(specs: list[ShardSpec]) -> list[list[int]]:
    """A rank's transfers (`coll.buckets`) of its shards' specs, in the order it sends them: the sender and the writer
    list them by this one function, so they agree without a message."""
    return coll.buckets(list(map(_SHAPE_AND_DTYPE, specs)))


def _place(
    shards: list[torch.Tensor], planned: _Planned, which: tuple, positions: list[int], allocated: Allocated
) -> None:
    """Shards in host memory (`positions` in `ordered`) into the HF tensors, from their slices of the plan listed once
    (`_Planned.own[which]`, `_own_slices`): each fused expert tensor whose experts are all whole shards among them
    stacked into its place in the file's payload (one `torch.stack` per fused tensor, no per-expert view); the
    whole-shard-to-whole-tensor placements looked up by C-level maps, the others narrowed in one loop, then one bulk
    copy."""
    stacking = allocated.layout is not None
    listed = planned.own.get((which, stacking))
    if listed is None:
        listed = planned.own[(which, stacking)] = _own_slices(planned, positions, allocated.layout)
    stacks, whole_keys, whole_shards, partial, per_expert_views = listed
    written = allocated.written
    runs = None
    if isinstance(written, safetensors_out.Payload):  # its byte layout depends on the output dtype
        spans = (which, stacking, allocated.dtype)
        runs = planned.runs.get(spans)
        if runs is None:
            runs = planned.runs[spans] = _runs(whole_keys, whole_shards, partial, written)
        runs, whole_keys, whole_shards, partial = runs
    targets = allocated.targets if per_expert_views else written  # the same tensors for every plain key
    dst, src = list(map(targets.__getitem__, whole_keys)), list(map(shards.__getitem__, whole_shards))
    with torch.no_grad():
        for key, shape, dim, members in stacks:
            out, stacked = written[key].view(shape), list(map(shards.__getitem__, members))
            if out.dtype == stacked[0].dtype:
                torch.stack(stacked, dim, out=out)
            else:  # converted as every other copy converts
                out.copy_(torch.stack(stacked, dim))
        for dtype, start, end, whole, members in runs or ():
            dst.append(written.flat[start:end].view(dtype))
            parts = (
                list(map(shards.__getitem__, whole))
                if members is None
                else [shards[k] if first is None else shards[k].narrow(0, first, rows) for k, first, rows in members]
            )
            src.append(torch._C._nn.flatten_dense_tensors(parts))
        for k, key, dim, dst_start, src_start, length, whole_dst, whole_src in partial:
            target, shard = targets[key], shards[k]
            dst.append(target if whole_dst else target.narrow(dim, dst_start, length))
            src.append(shard if whole_src else shard.narrow(dim, src_start, length))
        if dst:  # none when every placement was stacked
            torch._foreach_copy_(dst, src)


_SMALL = 1 << 16
"""HF tensors of at most this many bytes are filled a run at a time (`_runs`)."""


def _runs(
    whole_keys: list[str], whole_shards: list[int], partial: list[tuple], written: safetensors_out.Payload
) -> tuple:
    """The placements that fill a whole small tensor of the payload (from a whole shard, or rows of one) and lie back to
    back, as runs: (dtype, first byte, end byte, shard positions in payload order, or None when every member is a
    whole shard, else each member's (shard position, first row, rows; first row None: the whole shard)), each copied
    from its members flattened into one (no view of the payload per tensor); the other placements as they were
    ((HF keys, shard positions), partial)."""
    where, entries = written.where, written.entries
    small, keys, shards, rest = [], [], [], []
    for key, k in zip(whole_keys, whole_shards):
        start, end = where.get(key, (0, 0))  # absent: a per-expert view of a fused tensor
        if 0 < end - start <= _SMALL:
            small.append((start, end, entries[key][0], (k, None, None), (key, k)))
        else:
            keys.append(key)
            shards.append(k)
    for item in partial:
        k, key, dim, _, src_start, length, whole_dst, _ = item
        start, end = where.get(key, (0, 0))
        if whole_dst and dim == 0 and 0 < end - start <= _SMALL:
            small.append((start, end, entries[key][0], (k, src_start, length), item))
        else:
            rest.append(item)
    small.sort(key=operator.itemgetter(0))
    runs: list[list] = []
    for start, end, dtype, member, item in small:
        if runs and runs[-1][0] == dtype and runs[-1][2] == start:
            runs[-1][2] = end
            runs[-1][3].append(member)
        else:
            runs.append([dtype, start, end, [member], item])
    out = []
    for dtype, start, end, members, item in runs:
        if len(members) == 1:  # a tensor alone: its view, as before
            if len(item) == 2:
                keys.append(item[0])
                shards.append(item[1])
            else:
                rest.append(item)
        elif all(first is None for _, first, _ in members):
            out.append((dtype, start, end, [k for k, _, _ in members], None))
        else:
            out.append((dtype, start, end, None, members))
    return out, keys, shards, rest


def _own_slices(planned: _Planned, positions: list[int], layout: FusedLayout | None) -> tuple:
    """The placements of the shards at `positions`, listed for `_place`: (stacks, HF keys, shard positions, partial,
    per-expert views) where `stacks` are the fused tensors of `layout` filled by stacking whole shards (`_stacks`:
    fused key, the shape it is viewed as, the stacking dim, the shard positions in expert order), (HF keys, shard
    positions) the other placements that copy a whole shard into a whole HF tensor, `partial` each remaining one as
    (shard position among those shards, HF key, dim, destination start, source start, length, whole destination, whole
    source), and whether any of those fills a per-expert view of a fused tensor (`Allocated.targets` makes those)."""
    views = layout.views if layout is not None else {}
    shapes = planned.plan.shapes
    by_fused: dict[str, list] = {}
    rest: list[tuple[int, Any, tuple]] = []
    for k, n in enumerate(positions):
        spec = planned.ordered[n][2]
        for p in planned.plan.placements[n]:
            view = views.get(p.key)
            if view is None:
                rest.append((k, p, spec.shape))
            else:
                by_fused.setdefault(view[0], []).append((view, k, p, spec.shape))
    stacks = []
    for key, entries in by_fused.items():
        stack = _stacks(key, entries, layout, shapes)
        if stack is None:
            rest += [(k, p, shape) for _, k, p, shape in entries]
        else:
            stacks.append(stack)
    whole_keys: list[str] = []
    whole_shards: list[int] = []
    partial: list[tuple] = []
    for k, p, shard_shape in rest:
        whole_dst = p.dst_start == 0 and p.length == shapes[p.key][p.dim]
        whole_src = p.src_start == 0 and p.length == shard_shape[p.dim]
        if whole_dst and whole_src:
            whole_keys.append(p.key)
            whole_shards.append(k)
        else:
            partial.append((k, p.key, p.dim, p.dst_start, p.src_start, p.length, whole_dst, whole_src))
    per_expert_views = any(key in views for key in whole_keys) or any(item[1] in views for item in partial)
    return stacks, whole_keys, whole_shards, partial, per_expert_views


def _stacks(key: str, entries: list[tuple], layout: FusedLayout, shapes: dict) -> tuple | None:
    """How the fused tensor `key` is filled by stacking one whole shard per expert: (key, the shape it is viewed as,
    the stacking dim, the shard position of each expert), or None when its placements are not that (an expert held by
    another rank, a per-expert tensor filled from several shards or from a shard's slice it does not tile).

    `entries`: (its `FusedLayout.views` entry, shard position, placement, shard shape) of every placement into one of
    its per-expert views. The stacking is peft's layout (`FusedLayout.stacking`); each expert's per-expert lora_B is
    its consecutive row blocks."""
    count = layout.experts[key]
    shape, dim = layout.stacking(key)
    member = shape[:dim] + shape[dim + 1 :]
    sources: list[Any] = [None] * count
    rows: list[set] = [set() for _ in range(count)]
    for (_, e, start, length), k, p, shard_shape in entries:
        per_expert = shapes[p.key]
        if p.dst_start != 0 or p.length != per_expert[p.dim] or tuple(shard_shape) != member:
            return None
        if p.dim == 0:
            src_start = p.src_start
        elif p.src_start == 0 and p.length == shard_shape[p.dim] and tuple(per_expert) == member:
            src_start = 0  # the whole shard along another dim: its rows all
        else:
            return None
        if src_start != start or tuple(per_expert) != (length, member[1]) or sources[e] not in (None, k):
            return None
        sources[e] = k
        rows[e].add((start, length))
    for e in range(count):
        if sources[e] is None:
            return None
        ends = 0
        for start, length in sorted(rows[e]):
            if start != ends:
                return None
            ends = start + length
        if ends != member[0]:
            return None
    return key, shape, dim, sources


@dataclass
class Allocated:
    """The writer's HF tensors: `written` (views of one buffer laid out as the file's payload) and `targets`, what the
    plan's placements fill: the same tensors, or (fused experts, `layout`) views of the fused ones in `written`, made
    at first use (`_place` stacks whole expert shards into the fused tensors without them)."""

    written: dict[str, torch.Tensor]
    fused: dict[str, list[str]] | None
    """Per fused parameter, the per-expert modules it replaces, when `written` is in the fused layout already."""
    layout: FusedLayout | None = None
    dtype: torch.dtype | None = None
    """The output dtype asked for (None: each tensor's source dtype)."""
    _targets: dict[str, torch.Tensor] | None = None

    @property
    def targets(self) -> dict[str, torch.Tensor]:
        if self._targets is None:
            self._targets = self.written if self.layout is None else self.layout.targets(self.written)
        return self._targets


def _fuses(options: ExportOptions, names: Naming) -> bool:
    return bool(
        names.arch.fused_experts and names.geometry.num_experts and writes_fused(options.expert_layout, names.arch)
    )


def allocate_adapter(planned: _Planned, options: ExportOptions, dtype: torch.dtype | None) -> Allocated:
    """The HF tensors of the plan (each in its source dtype unless `dtype`). In the fused layout the fused tensors are
    allocated and the per-expert ones are views of them (experts stacked by placement), unless ranks are padded or
    the plan is not the plain case (`fused_layout`, kept with the plan): then `stage_adapter` fuses the per-expert
    tensors."""
    plan, names = planned.plan, planned.names
    if options.pad_rank_to is None and _fuses(options, names):
        if planned.fused is None:
            planned.fused = fused_layout(plan, names.arch, names.geometry.num_experts) or False
        layout = planned.fused
        if layout:
            written = _allocate(
                planned,
                (True, dtype),
                lambda: safetensors_out.allocate(
                    {key: (dtype or getattr(torch, layout.dtypes[key]), shape) for key, shape in layout.shapes.items()}
                ),
            )
            return Allocated(written, layout.replaced, layout, dtype)
    tensors = _allocate(planned, (False, dtype), lambda: safetensors_out.allocate_plan(plan, dtype))
    return Allocated(tensors, None, None, dtype)


def _allocate(
    planned: _Planned, key: tuple, allocate: Callable[[], safetensors_out.Payload]
) -> safetensors_out.Payload:
    """`allocate()`, or a new payload of the layout it gave for this plan before (`_Planned.payloads`: the layout of
    10^5 tensors is made once per plan, each export only a new buffer)."""
    held = planned.payloads.get(key)
    if held is not None:
        return safetensors_out.Payload(*held)
    payload = allocate()
    planned.payloads[key] = (payload.entries, payload.layout)  # not the payload: its buffer goes with the export
    return payload


@paused_collection()
def run_export(
    snapshot: Snapshot,
    output_dir: str | os.PathLike,
    options: ExportOptions,
    layout: coll.RankLayout,
    group: Any,
    *,
    finish: Callable[[Path], Path | None],
    source: str,
    extra_files: dict[str, bytes] | None = None,
) -> Path | None:
    """Collective: exchange reports, plan, move bytes to the writer, write a staging directory.

    `extra_files` (writer only) are written into the adapter directory too. `finish(staging)` runs on the writer
    (publish, or hand over for a later publish); its failure
    raises on every rank. Returns finish's result on the writer, None elsewhere.
    """
    out_dtype = parse_dtype(options.dtype)
    reports = coll.gather_held(snapshot.report, _report_key(snapshot.report, options), WRITER, group)
    coll.agree(snapshot.report.error, group)

    def plan_and_stage() -> tuple:
        """The writer alone plans (the other ranks only send their shards) and, if the plan holds, makes the staging
        directory; a failure of either raises on every rank."""
        planned = _planned(reports, options, snapshot.plans)
        return planned, staging_dir(output_dir, options.overwrite, reading=options.inputs())

    outcome = coll.broadcast_outcome(plan_and_stage, WRITER, group)
    if layout.rank != WRITER:
        failure = None
        tensors, specs = list(map(_TENSOR, snapshot.shards)), list(map(_SPEC, snapshot.shards))
        for bucket in _transfers(specs):
            # a local failure is sent as zeros and agreed on below, so the writer never waits
            failure = coll.send_bucket(list(map(tensors.__getitem__, bucket)), WRITER, group) or failure
        coll.agree(failure, group)
        coll.broadcast_outcome(lambda: None, WRITER, group)
        return None

    planned, tmp = outcome
    plan, dialect, names = planned.plan, planned.dialect, planned.names
    try:  # a collective failure (a rank died or timed out) leaves no staging behind
        failure: Exception | None = None
        try:
            allocated = allocate_adapter(planned, options, out_dtype)
        except Exception as exc:
            allocated, failure = None, exc
        failure = _gather(snapshot, planned, allocated, group, failure)
        coll.agree(failure, group)
    except BaseException:
        discard(tmp)
        raise
    tensors = allocated.written

    def convert_and_write() -> Path | None:
        try:
            check_finite(tensors, allow=options.allow_nonfinite)
            stage_adapter(
                tmp,
                plan,
                tensors,
                options,
                names,
                dialect=dialect,
                source=source,
                extra_files=extra_files,
                quantization=quantization_summary(r.quantization for r in reports),
                fused=allocated.fused,
                configs=planned.configs,
            )
            log.info("converted %d %s adapter tensors for %s", len(tensors), dialect, output_dir)
            return finish(tmp)
        except BaseException:
            discard(tmp)
            raise

    return coll.broadcast_outcome(convert_and_write, WRITER, group)
