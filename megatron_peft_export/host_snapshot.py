"""The training hook's snapshots: at a save, the training thread copies the adapters into host buffers that are reused.

One adapter is the case of a list of one: a snapshot holds every selected adapter (`AdapterSnapshots`), found by
one walk of the model and copied by one bulk copy.

- The walk (`take_snapshots` without copying) runs at `prepare`, or in the background for a save that finds no
  current walk: that save lists the parameters from the modules' dictionaries alone (no dialect, no names), copies
  every trainable one (one `torch.stack` per shape and dtype in host memory, no buffer view per parameter) and notes
  the others' version counters, and the background walks, then takes each adapter tensor's values from those copies
  (`Deferred`). A cheap check on
  the training thread says whether the cached walk is current: whether any module or parameter was registered in the
  process since (adding an adapter adds modules; one integer compare), on the modules that carry an adapter what
  the dialect reports (or its own summary of what it reads: ModelOpt's adapter entries), and each adapter tensor's
  storage, shape and dtype. The walk reads registered children, parameters and plain attributes from the modules'
  own dictionaries (`dialects.base.attribute`), not through ModelOpt's `__getattr__` (which can add entries to a
  module's dictionary while it runs), so the background only reads the modules the training thread uses. The cyclic
  garbage collector is off while either walks or copies.
- The copy is one `torch._foreach_copy_` into the buffers of an export that has finished: views of one flat
  tensor per dtype. On a GPU the buffers are pinned and the copy (a fused gather into one flat device buffer per
  dtype, then one transfer each) is queued on a side stream after the work already queued on the training stream,
  which then waits for it (on the device, not on the host) before its next in-place update; the background waits
  for the copy's event before reading (`AdapterSnapshots.wait`).
  The buffers of up to `max_pending` exports stay allocated while the hook lives.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import operator
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed as coll
from .dialects import LocalShard
from .dialects.base import Refusal
from .errors import ExportError
from .export import WRITER, ExportOptions, Snapshot, _Report, model_chunks, paused_collection
from .io.hf_config import read_hf_config
from .multi_adapter import AdapterSnapshots, Selection, check_selection, take_snapshots

_registrations = itertools.count(1)
_registration_count = 0
_registration_hooks: list = []


def _count_registration(module: torch.nn.Module, name: str, value: Any) -> None:
    global _registration_count
    _registration_count = next(_registrations)  # atomic under the GIL, whatever thread registers


def _modules_registered() -> int:
    """How many times any module was given a child module or a parameter (`add_module`, `register_parameter`,
    `setattr`) in this process, since the first call (buffers are not counted: modules that cache tensors as buffers
    at every step would make every save walk).

    Adding an adapter adds modules (ModelOpt's `lora_a_<name>`, Bridge's `adapter`), replacing a weight registers a
    parameter: a cached walk is stale when this count moved, and the check costs one integer compare instead of
    listing ~10^5 modules at every save. A removal, or a change to an existing adapter, shows in what the dialects
    report on the carriers (`_adapter_state`).
    """
    if not _registration_hooks:
        registration = torch.nn.modules.module
        _registration_hooks.extend(
            register(_count_registration)
            for register in (
                registration.register_module_module_registration_hook,
                registration.register_module_parameter_registration_hook,
            )
        )
    return _registration_count


def _adapter_state(carriers: list[tuple[torch.nn.Module, Any]], names: list[str]) -> list:
    """What its dialect reports for each adapter-carrying module and each adapter name: one flat list (compared with
    one `==`). A module gaining an adapter (of any dialect, or another named one) gains modules, which
    `_modules_registered` shows.

    What `find` reports is compared, each tensor by identity (a view by its storage: a dialect may hand out a fresh
    view of a parameter each time), storage, shape and dtype. (Carriers whose dialect gives `probes`, ModelOpt's, are
    checked by those instead: `_Probes`.)
    """
    state: list = []
    append = state.append
    for module, dialect in carriers:
        for name in names:
            for t in dialect.find(module, name) or ():
                if type(t) is Refusal:
                    append(t.reason)
                    continue
                tensor = t.tensor
                identity = id(tensor) if tensor._base is None else None
                append((t.role, t.alpha, t.split_dim, t.part, id(t.tp_group), t.expert, identity, *_tensor(tensor)))
    return state


class _Probes:
    """The dictionary lookups of the carriers whose dialect gives them (`probes`): the check repeats each lookup with
    C-level maps, the found objects compared by identity (held here: no id is reused while they are), the plain
    values by type, then `==`. A lookup a dialect lists again (the same dictionary and key: a path read for a tensor,
    then for its owner's group) is kept once; it found the same value (the walk reads the model at one time)."""

    def __init__(self) -> None:
        self.same: tuple[list, list, list] = ([], [], [])
        self.equal: tuple[list, list, list] = ([], [], [])
        self._listed: set[tuple[int, str]] = set()

    def add(self, probes: list[tuple[dict, str, Any, bool]]) -> None:
        listed = self._listed
        for table, key, value, by_identity in probes:
            lookup = (id(table), key)  # the table is held in a column: its id stays its own
            if lookup in listed:
                continue
            listed.add(lookup)
            for column, item in zip(self.same if by_identity else self.equal, (table, key, value), strict=True):
                column.append(item)

    def hold(self) -> bool:
        """Every lookup still finds what the walk found: in C (`_hook_reads.entries_hold`) when it is built, else
        `_entries_hold` (~10^6 lookups at 61 layers x 256 experts: most of a later save's check)."""
        accelerated = _accelerated()
        return (_entries_hold if accelerated is None else accelerated.entries_hold)(*self.same, *self.equal)


def _entries_hold(
    tables: list[dict], keys: list[str], objects: list, equal_tables: list[dict], equal_keys: list[str], values: list
) -> bool:
    """The lookups `tables[i].get(keys[i])` find `objects[i]` (the same object), and `equal_tables[i].get(equal_keys
    [i])` a value of the type of `values[i]` (all types compared first), then equal to it."""
    get = dict.get
    if not all(map(operator.is_, map(get, tables, keys), objects)):
        return False
    now = list(map(get, equal_tables, equal_keys))
    return list(map(type, now)) == list(map(type, values)) and now == values


def _split_carriers(
    carriers: list[tuple[torch.nn.Module, Any]], names: list[str]
) -> tuple[_Probes, list[tuple[torch.nn.Module, Any]]]:
    """The carriers' probes, and the carriers whose dialect gives none (compared by `_adapter_state`)."""
    probed, rest = _Probes(), []
    for module, dialect in carriers:
        make = getattr(dialect, "probes", None)
        found = [make(module, name) for name in names] if make is not None else [None]
        if any(f is None for f in found):
            rest.append((module, dialect))
            continue
        for f in found:
            probed.add(f)
    return probed, rest


def _tensor(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tensor.shape, tensor.dtype


_SHAPE_AND_DTYPE = operator.attrgetter("shape", "dtype")


def _tensors_state(tensors: list[torch.Tensor]) -> list:
    """Storage, and shape and dtype, of the tensors (two lists, each made by one `map`: each tensor is read twice, not
    three times): a `param.data = ...` since the walk shows here."""
    return [list(map(torch.Tensor.data_ptr, tensors)), list(map(_SHAPE_AND_DTYPE, tensors))]


@dataclass
class _Walk:
    """One full walk: the live adapter tensors (not copies) with their reports, and what the cheap check compares."""

    key: tuple
    registered: int
    """`_modules_registered()` when the walk started."""
    found: AdapterSnapshots
    """The live shards (not copies) of each adapter, without carriers."""
    carriers: list[tuple[torch.nn.Module, Any]]
    """(module, dialect) for every module that carries an adapter and whose dialect gives no probes (held: their ids
    stay theirs while cached)."""
    state: list
    """`_adapter_state` of the carriers, then `_tensors_state` of the sources, when the walk was made."""
    generation: int | None
    """Unique in the process (every report of the walk names it: `_Report.walk`); None when the walk found an error:
    it is used once, never cached."""
    sources: list[torch.Tensor]
    """The live tensors of every adapter's shards, in order (not detached views: those would miss a `param.data =
    ...`)."""
    staging: _Flat | None = None
    """On a GPU: one flat device buffer per dtype the sources are gathered into before one transfer to the host."""
    plans: dict = dataclasses.field(default_factory=dict)
    """The writer's plans of this walk's reports (`export._planned`), held as long as the walk."""
    probes: _Probes = dataclasses.field(default_factory=_Probes)
    """The lookups that pin what the dialects report on the probed carriers (the others: `carriers` in `state`)."""

    def current(self, key: tuple, registered: int) -> bool:
        """The model still holds what this walk found (the cheap check, on the training thread)."""
        return (
            self.key == key
            and self.registered == registered
            and self.probes.hold()
            and _adapter_state(self.carriers, list(self.found.snapshots)) + _tensors_state(self.sources) == self.state
        )

    def over(self, buffers: list[torch.Tensor], copied: Any) -> AdapterSnapshots:
        """The snapshots of this walk with `buffers` (copies of `sources`) in place of the live tensors."""
        held = iter(buffers)
        snapshots = {
            name: Snapshot(
                dataclasses.replace(s.report),
                [LocalShard(shard.spec, next(held), shard.source) for shard in s.shards],
                plans=s.plans,
            )
            for name, s in self.found.snapshots.items()
        }
        first = next(iter(snapshots.values()))
        return AdapterSnapshots(self.found.selection, snapshots, first, copied)

    def failed(self, error: ExportError) -> AdapterSnapshots:
        """Snapshots that carry `error` and no shards: every rank raises it at the export's first agreement."""
        snapshots = {
            name: Snapshot(dataclasses.replace(s.report, error=error, specs=[]), [])
            for name, s in self.found.snapshots.items()
        }
        return AdapterSnapshots(self.found.selection, snapshots, next(iter(snapshots.values())))


def _key(model: Any, layout: coll.RankLayout) -> tuple:
    return tuple(id(c) for c in model_chunks(model)), layout


_generations = itertools.count()


def _walk_model(
    model: Any,
    key: tuple,
    registered: int,
    layout: coll.RankLayout,
    options: ExportOptions,
    selection: Selection | None,
) -> _Walk:
    """A full walk of the model: the live shards of each selected adapter, and what the cheap check compares. A walk
    that found an error has no generation (it is never cached)."""
    found = take_snapshots(model, layout, options, selection, copy=False)
    carriers = found.first.carriers
    failed = any(s.report.error is not None for s in found.snapshots.values())
    generation = None if failed else next(_generations)
    plans: dict = {}
    for name, snapshot in found.snapshots.items():
        report = dataclasses.replace(snapshot.report, walk=generation)
        found.snapshots[name] = dataclasses.replace(
            snapshot, report=report, carriers=[], plans=None if failed else plans
        )
    found.first = next(iter(found.snapshots.values()))
    sources = [s.tensor for s in found.shards]
    probes, carriers = _split_carriers(carriers, list(found.snapshots))
    state = _adapter_state(carriers, list(found.snapshots)) + _tensors_state(sources)
    return _Walk(key, registered, found, carriers, state, generation, sources, plans=plans, probes=probes)


_LIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""First model chunk -> {(adapter name, selection): its current walk} for `live_snapshots` (the model held weakly:
a model no one else holds goes, with its walks)."""
_LIVE_LOCK = threading.Lock()
_LIVE_KEPT = 4
"""Walks kept per model (adapter names and selections; the oldest goes first)."""


def live_snapshots(
    model: Any, layout: coll.RankLayout, options: ExportOptions, selection: Selection | None = None
) -> AdapterSnapshots:
    """`take_snapshots(..., copy=False)` for `export_adapter` and `export_adapters`: the live shards of the model's
    cached walk when the hook's cheap check (`_Walk.current`) says the model still holds what it found, else a new
    walk (kept if it found no error). The base model's config is read again at every call, as a walk reads it."""
    selection = check_selection(selection)
    which = (options.adapter_name, selection if not isinstance(selection, list) else tuple(selection))
    with paused_collection():
        chunks = model_chunks(model)
        key, registered = _key(model, layout), _modules_registered()
        try:  # not a module (refused by the walk, named): nothing to cache
            with _LIVE_LOCK:
                walk = _LIVE.get(chunks[0], {}).get(which)
        except (IndexError, TypeError):
            return _walk_model(model, key, registered, layout, options, selection).found
        if walk is None or not walk.current(key, registered):
            walk = _walk_model(model, key, registered, layout, options, selection)
            if walk.generation is None:
                return walk.found
            chunk = chunks[0]
            with _LIVE_LOCK:
                walks = _LIVE.setdefault(chunk, {})
                walks.pop(which, None)
                while len(walks) >= _LIVE_KEPT:
                    walks.pop(next(iter(walks)))
                walks[which] = walk
            return walk.found
        try:
            hf_config = read_hf_config(options.base_model_name_or_path) if layout.rank == WRITER else None
        except ExportError as exc:
            return walk.failed(exc)
    snapshots = {
        name: dataclasses.replace(s, report=dataclasses.replace(s.report, hf_config=hf_config))
        for name, s in walk.found.snapshots.items()
    }
    return AdapterSnapshots(walk.found.selection, snapshots, next(iter(snapshots.values())))


@dataclass
class _Taken:
    """A save of the current walk: its sources copied into `buffers` (on a GPU asynchronously, `copied` recording its
    completion); `HostSnapshots.resolve` makes the snapshots from them, in the background."""

    walk: _Walk
    buffers: _Flat
    copied: Any


@dataclass
class Deferred:
    """A save taken before the model was walked (or after it changed): every trainable parameter copied at the save,
    the others' version counters and storage noted; the background walks the model, then takes each adapter tensor
    from those copies (`HostSnapshots.resolve`)."""

    model: Any
    layout: coll.RankLayout
    key: tuple
    registered: int
    """`_modules_registered()` at the save: a module or parameter registered after it shows at the next save."""
    params: list[torch.Tensor]
    host: _Flat | _Stacked
    """Copies of `params`, made at the save: views of flat buffers (GPU), or one stacked copy per shape and dtype
    (`_Stacked`, CPU), viewed per parameter in the background."""
    frozen: _Noted
    """Every parameter not copied, with its version counter and storage address at the save."""
    copied: Any = None
    staging: _Flat | None = None

    def values_of(self, sources: list[torch.Tensor]) -> list[torch.Tensor]:
        """The values at the save of each of the walk's `sources`: a copy made then, a view into one, or (a
        parameter not trained) the tensor itself if it has provably not been written since."""
        index = {id(p): i for i, p in enumerate(self.params)}
        copies = self.host.views
        values = []
        for source in sources:
            owner = source if source._base is None else source._base
            i = index.get(id(owner))
            copy = None if i is None else copies[i]
            if copy is not None and (copy.shape, copy.dtype) == (owner.shape, owner.dtype) and owner.is_contiguous():
                values.append(copy if owner is source else _same_view(source, owner, copy))
            else:
                values.append(self._unwritten(source, owner))
        return values

    def _unwritten(self, source: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        noted = self.frozen.by_id.get(id(owner))
        unchanged = noted is not None and (owner._version, owner.data_ptr()) == noted[1:]
        value = source.detach().to("cpu", copy=True) if unchanged else None
        if value is None or (owner._version, owner.data_ptr()) != noted[1:]:
            raise ExportError(
                f"expected the adapter tensor of shape {tuple(source.shape)} as it was at this save, found it "
                "written after the save, before the model's first walk had found it (it is not trained, so it "
                "was not copied at the save); call hook.prepare(model) once before training: later saves copy it"
            )
        return value


def _same_view(source: torch.Tensor, owner: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    """The view of `copy` that `source` is of `owner` (a contiguous tensor of the same shape as `copy`)."""
    offset = source.storage_offset() - owner.storage_offset()
    return copy.as_strided(source.shape, source.stride(), copy.storage_offset() + offset)


def _parameters(model: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(trainable, other) parameters of every chunk's modules, each module read once: in C (`_hook_reads.parameters`,
    built with the package) when it is there, else `_listed_parameters` (the reference: the same walk, and
    tests/test_host_snapshot.py pins that both give the same lists). A parameter shared by two modules is listed
    twice (copied twice: harmless, and cheaper than making them unique here).

    This runs on the training thread at a save before the walk, over every module (~10^5 at MoE scale): in Python its
    cost is reading each module's dictionaries (~2 us a module, ~0.2 s at 61 layers x 256 experts); the C listing
    reads the same objects without the interpreter's work per module."""
    accelerated = _accelerated()
    return (_listed_parameters if accelerated is None else accelerated.parameters)(list(model_chunks(model)))


@functools.cache
def _accelerated() -> Any:
    """The C reads (`megatron_peft_export._hook_reads`, built by `pip install -e .`), or None when they were not built
    (then their Python references run, slower)."""
    try:
        return importlib.import_module("megatron_peft_export._hook_reads")
    except ImportError:
        return None


def _listed_parameters(roots: list[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(trainable, other) parameters of every module reachable from `roots` through `_modules`: one pass over the
    modules' own dictionaries (`_parameters` and `_modules`, the attribute when the dictionary lacks it), each module
    once (by identity: a module registered twice, or a cycle, is read once). The loop reads each object once and the
    rest (dropping unset parameters, reading `requires_grad`) runs in C-level `map`s."""
    stack: list[Any] = list(roots)
    found: list[Any] = []
    seen: set[int] = set()
    pop, push, keep, note = stack.pop, stack.extend, found.extend, seen.add
    while stack:
        module = pop()
        if module is None or id(module) in seen:
            continue
        note(id(module))
        own = module.__dict__
        parameters, children = own.get("_parameters"), own.get("_modules")
        keep((module._parameters if parameters is None else parameters).values())
        push((module._modules if children is None else children).values())
    params = list(filter(_IS_SET, found))
    trainable = list(map(_REQUIRES_GRAD, params))
    return list(itertools.compress(params, trainable)), list(itertools.compress(params, map(operator.not_, trainable)))


_REQUIRES_GRAD, _VERSION = operator.attrgetter("requires_grad"), operator.attrgetter("_version")
_IS_SET = functools.partial(operator.is_not, None)


@dataclass
class _Noted:
    """Parameters not copied at a save, with their version counters and storage addresses then (read by C-level
    `map`s on the training thread); `by_id` (id -> (parameter, version, address)) is made in the background."""

    params: list[torch.Tensor]
    versions: list[int]
    addresses: list[int]
    _by_id: dict | None = None

    @classmethod
    def of(cls, params: list[torch.Tensor]) -> _Noted:
        return cls(params, list(map(_VERSION, params)), list(map(torch.Tensor.data_ptr, params)))

    @property
    def by_id(self) -> dict[int, tuple[torch.Tensor, int, int]]:
        if self._by_id is None:
            self._by_id = dict(zip(map(id, self.params), zip(self.params, self.versions, self.addresses)))
        return self._by_id


def _defer(model: Any, layout: coll.RankLayout, key: tuple, registered: int) -> Deferred:
    """On the training thread: copy every trainable parameter and note the others. In host memory the copy is one
    `torch.stack` per shape and dtype (`_Stacked`: no buffer view per parameter is made here, the background makes
    them); on a GPU, one bulk copy into views of pinned buffers (`_bulk_copy`)."""
    trainable, other = _parameters(model)
    frozen = _Noted.of(other)
    if not any(t.is_cuda for t in trainable):
        return Deferred(model, layout, key, registered, trainable, _Stacked.of(trainable), frozen)
    host = _flat_buffers(trainable, pinned=True)
    deferred = Deferred(model, layout, key, registered, trainable, host, frozen)
    deferred.copied = _bulk_copy(host, trainable, deferred)
    return deferred


class HostSnapshots:
    """The snapshots of one hook: `take` on the training thread, `release` once the export of a snapshot is over."""

    def __init__(self, options: ExportOptions, selection: Selection | None = None) -> None:
        self._options = options
        self._selection = check_selection(selection)
        self._walk: _Walk | None = None
        self._free: list[tuple[int, _Flat]] = []
        self._in_use: dict[int, tuple[int | None, _Flat]] = {}
        self._lock = threading.Lock()
        self.walks = 0
        """Full walks of the model so far (the first save, and each save after the model changed)."""

    def prepare(self, model: Any, layout: coll.RankLayout) -> None:
        """Walk the model and allocate (and touch) host buffers now, before training, so the first save only copies."""
        with paused_collection():
            walk = self._walk_model(model, _key(model, layout), _modules_registered(), layout)
        if walk.generation is not None:
            self._keep_buffers(walk)

    def take(self, model: Any, layout: coll.RankLayout) -> _Taken | Deferred:
        """This rank's shards of every selected adapter, copied to host memory (one bulk copy into reused buffers).

        When the model is not walked yet (or changed since its walk), every trainable parameter is copied instead and
        the walk is left to the background (`resolve`): the training thread never walks the model at a save. The
        snapshots are made from the copies in the background too (`resolve`)."""
        with paused_collection():
            key, registered = _key(model, layout), _modules_registered()
            walk = self._walk
            if walk is None or not walk.current(key, registered):
                return _defer(model, layout, key, registered)
            buffers = self._buffers(walk)
            taken = _Taken(walk, buffers, _bulk_copy(buffers, walk.sources, walk))
        with self._lock:
            self._in_use[id(taken)] = (walk.generation, buffers)
        return taken

    def resolve(self, taken: _Taken | Deferred) -> AdapterSnapshots:
        """Background: the snapshots of what `take` returned, once its copy is complete. A deferred save is walked
        here (the walk is cached for later saves) and takes each adapter tensor from the copies made at the save."""
        if isinstance(taken, _Taken):
            if taken.copied is not None:
                taken.copied.synchronize()  # the asynchronous copy to host memory (GPU) is complete
            return taken.walk.over(taken.buffers.views, None)
        try:
            return self._walked(taken)
        except Exception as exc:  # every rank must reach the export's first agreement, which raises it everywhere
            error = exc if isinstance(exc, ExportError) else ExportError(f"walking the model failed: {exc!r}")
            failed = Snapshot(_Report(error=error), [])
            return AdapterSnapshots(self._selection, {self._options.adapter_name: failed}, failed)

    def _walked(self, taken: Deferred) -> AdapterSnapshots:
        if taken.copied is not None:
            taken.copied.synchronize()
        with paused_collection():
            walk = self._walk
            if walk is None or not walk.current(taken.key, taken.registered):
                walk = self._walk_model(taken.model, taken.key, taken.registered, taken.layout)
                if walk.generation is not None:
                    self._keep_buffers(walk)  # the next save copies into touched buffers
            try:
                return walk.over(taken.values_of(walk.sources), None)
            except ExportError as exc:
                return walk.failed(exc)

    def release(self, snapshots: _Taken | Deferred) -> None:
        """The export of `snapshots` is over (any thread): its buffers serve a later save."""
        with self._lock:
            generation, buffers = self._in_use.pop(id(snapshots), (None, None))
            if buffers is not None and self._walk is not None and generation == self._walk.generation:
                self._free.append((generation, buffers))

    def _walk_model(self, model: Any, key: tuple, registered: int, layout: coll.RankLayout) -> _Walk:
        """A full walk of the model (cached unless it found an error: the next save walks again)."""
        self.walks += 1
        walk = _walk_model(model, key, registered, layout, self._options, self._selection)
        if walk.generation is not None:  # an error reaches every rank in the export; the next save walks again
            with self._lock:
                self._walk = walk
                self._free.clear()
        return walk

    def _keep_buffers(self, walk: _Walk) -> None:
        buffers = _flat_buffers(walk.sources, pinned=any(t.is_cuda for t in walk.sources), touch=True)
        with self._lock:
            self._free.append((walk.generation, buffers))

    def _buffers(self, walk: _Walk, touch: bool = False) -> _Flat:
        with self._lock:
            if self._free and self._free[-1][0] == walk.generation:
                return self._free.pop()[1]
        return _flat_buffers(walk.sources, pinned=any(t.is_cuda for t in walk.sources), touch=touch)


@dataclass
class _Flat:
    """Buffers shaped like a list of tensors: `views` of one flat tensor per dtype (`flats`, in order of first use)."""

    flats: list[torch.Tensor]
    views: list[torch.Tensor]


@dataclass
class _Stacked:
    """Copies of a list of tensors: one `torch.stack` per distinct (shape, dtype), its tensors in order, made on the
    training thread (one C++ call per group: no tensor object per copy, no Python work per tensor beyond its shape,
    dtype and group); `views` (made at first use, in the background) are the copies in the tensors' order."""

    stacks: list[torch.Tensor]
    keys: list[tuple]
    """(shape, dtype) of each tensor at the copy, in order: the groups, in order of first appearance, are
    `_groups(keys)`."""
    _views: list[torch.Tensor] | None = None

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> _Stacked:
        keys = list(map(_SHAPE_AND_DTYPE, tensors))
        take = tensors.__getitem__
        with torch.no_grad():  # a stack is a new tensor, never a view of its inputs, even for a group of one
            stacks = [torch.stack(list(map(take, indices))) for indices in _groups(keys).values()]
        return cls(stacks, keys)

    @property
    def views(self) -> list[torch.Tensor]:
        if self._views is None:
            views: list[Any] = [None] * len(self.keys)
            for stack, indices in zip(self.stacks, _groups(self.keys).values()):
                for i, view in zip(indices, stack.unbind(0), strict=True):
                    views[i] = view
            self._views = views
        return self._views


def _groups(keys: list[tuple]) -> dict[tuple, list[int]]:
    """The indices of each distinct key, in order of first appearance (the order `_Stacked.of` stacks in)."""
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def _flat_buffers(
    tensors: list[torch.Tensor], *, device: Any = "cpu", pinned: bool = False, touch: bool = False
) -> _Flat:
    """Buffers for `tensors` on `device` (host memory: pinned when the tensors are on a GPU)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    flats, views = [], [None] * len(tensors)
    for dtype, indices in by_dtype.items():
        group = [tensors[i] for i in indices]
        flat = torch.empty(sum(t.numel() for t in group), dtype=dtype, device=device, pin_memory=pinned)
        if touch:  # the kernel's first touch of each page, paid now rather than by the first copy
            flat.zero_()
        flats.append(flat)
        for i, view in zip(indices, torch._C._nn.unflatten_dense_tensors(flat, group)):
            views[i] = view
    return _Flat(flats, views)


_SIDE_STREAMS: dict[Any, Any] = {}


def _bulk_copy(host: _Flat, sources: list[torch.Tensor], holder: Any) -> Any:
    """Copy `sources` into `host` (`holder.staging`: the device buffer they are gathered into, made at first use).
    On one CUDA device: asynchronously, returning the event to wait for;
    otherwise synchronously (one `_foreach_copy_`), returning None.

    On the GPU the sources are gathered into one flat device buffer per dtype (fused multi-tensor copies: a few
    hundred kernel launches for ~10^5 tensors), then each flat buffer goes to pinned host memory in one transfer. All
    of it runs on a side stream after everything already queued on the current (training) stream, so it reads the
    values of this save; the training stream then waits for the side stream (on the device: the host goes on), so no
    later in-place update (the optimizer step) overwrites a parameter before it has been read. Untested here (no GPU
    in CI); the CPU tests run `_gather_copy`, the same copies without streams.
    """
    if not sources:
        return None
    device = sources[0].device
    if device.type != "cuda" or any(s.device != device for s in sources):
        with torch.no_grad():  # reads the parameters without recording the copy for autograd
            torch._foreach_copy_(host.views, sources)
        return None
    training = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side.wait_stream(training)
    with torch.no_grad(), torch.cuda.stream(side):
        if holder.staging is None:  # allocated on the side stream, which alone uses it (successive saves in its order)
            holder.staging = _flat_buffers(sources, device=device)
        _gather_copy(host, holder.staging, sources)
        copied = torch.cuda.Event()
        copied.record(side)
    training.wait_stream(side)
    return copied


def _gather_copy(host: _Flat, staging: _Flat, sources: list[torch.Tensor]) -> None:
    """`sources` into `staging` (same device, fused), then each flat staging buffer into `host` in one transfer."""
    torch._foreach_copy_(staging.views, sources)
    for flat, gathered in zip(host.flats, staging.flats):
        flat.copy_(gathered, non_blocking=True)
