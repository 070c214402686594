"""The training hook's snapshots: at a save, the training thread copies the adapter into host buffers that are reused.

Two costs used to sit on the training thread at every save (bench/: 80 layers of rank-256 LoRA, TP=2 on CPU):
finding the adapter tensors (the dialect walk over every module, ~80 ms) and copying them into freshly allocated
host memory (the kernel's first touch of each page made that copy ~2-3x slower than into touched memory). Now:

- the full walk runs at the first save, and again only when a cheap check says the model changed: whether any
  module was registered in the process since (adding an adapter adds modules; one integer compare) and, on the
  modules that carry an adapter, what the dialect reports (tensor identity, shape, dtype, scale, split), all on
  the training thread (the background never touches the model: ModelOpt's modules are not safe to read from
  another thread);
- each snapshot is one bulk copy (`torch._foreach_copy_`) into the buffers of an export that has finished: views
  of one flat tensor per dtype (pinned when the adapter is on a GPU); the buffers of up to `max_pending` exports
  stay allocated while the hook lives.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed as coll
from .dialects import LocalShard
from .export import ExportOptions, Snapshot, model_chunks, take_snapshot

_registrations = itertools.count(1)
_registration_count = 0
_registration_hook = None


def _count_registration(module: torch.nn.Module, name: str, submodule: Any) -> None:
    global _registration_count
    _registration_count = next(_registrations)  # atomic under the GIL, whatever thread registers


def _modules_registered() -> int:
    """How many times any module was given a child module (`add_module`, `setattr`) in this process, since the first
    call.

    Adding an adapter adds modules (ModelOpt's `lora_a_<name>`, Bridge's `adapter`): a cached walk is stale when this
    count moved, and the check costs one integer compare instead of listing ~10^5 modules at every save. A removal, or a
    change to an existing adapter, shows in what the dialects report on the carriers (`_adapter_state`).
    """
    global _registration_hook
    if _registration_hook is None:
        _registration_hook = torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
    return _registration_count


@dataclass
class _Found:
    """One full walk: the live adapter tensors (not copies) with the report, and what the cheap check compares."""

    key: tuple
    registered: int
    """`_modules_registered()` when the walk started."""
    carriers: list[tuple[torch.nn.Module, Any]]
    """(module, dialect) for every module that carries an adapter (held: their ids stay theirs while cached)."""
    state: list
    live: Snapshot
    generation: int
    sources: list[torch.Tensor]
    """The live tensors of `live.shards` (not detached views: those would miss a `param.data = ...`), in order."""


def _adapter_state(carriers: list[tuple[torch.nn.Module, Any]], adapter_name: str) -> list:
    """What its dialect reports for each adapter-carrying module (tensors by identity, shape and dtype; scale, split).

    One flat list of tuples (compared with one `==`); a module gaining an adapter (of any dialect, or another named
    one) gains modules, which `_modules_registered` shows.
    """
    state = []
    for module, dialect in carriers:
        state.append(id(module))
        for t in dialect.find(module, adapter_name) or ():
            state.append(
                tuple((id(v), v.shape, v.dtype) if isinstance(v, torch.Tensor) else v for v in vars(t).values())
            )
    return state


class HostSnapshots:
    """The snapshots of one hook: `take` on the training thread, `release` once the export of a snapshot is over."""

    def __init__(self, options: ExportOptions) -> None:
        self._options = options
        self._found: _Found | None = None
        self._free: list[tuple[int, list[torch.Tensor]]] = []
        self._in_use: dict[int, tuple[int, list[torch.Tensor]]] = {}
        self._generations = itertools.count()
        self._lock = threading.Lock()
        self.walks = 0
        """Full walks of the model so far (the first save, and each save after the model changed)."""

    def take(self, model: Any, layout: coll.RankLayout) -> Snapshot:
        """This rank's adapter shards, copied to host memory (one bulk copy into reused buffers)."""
        chunks = model_chunks(model)
        key = (tuple(id(c) for c in chunks), layout)
        found = self._found
        registered = _modules_registered()
        if (
            found is None
            or found.key != key
            or found.registered != registered
            or _adapter_state(found.carriers, self._options.adapter_name) != found.state
        ):
            self.walks += 1
            live = take_snapshot(model, layout, self._options, copy=False)
            if live.report.error is not None:  # nothing to copy; the error reaches every rank in the export
                return live
            found = self._adopt(key, registered, live)
        buffers = self._buffers(found)
        if buffers:
            with torch.no_grad():  # reads the parameters without recording the copy for autograd
                torch._foreach_copy_(buffers, found.sources)
        shards = [LocalShard(s.spec, buffer, s.source) for s, buffer in zip(found.live.shards, buffers)]
        snapshot = Snapshot(dataclasses.replace(found.live.report), shards)
        with self._lock:
            self._in_use[id(snapshot)] = (found.generation, buffers)
        return snapshot

    def release(self, snapshot: Snapshot) -> None:
        """The export of `snapshot` is over (any thread): its buffers serve a later save."""
        with self._lock:
            generation, buffers = self._in_use.pop(id(snapshot), (None, None))
            if buffers is not None and self._found is not None and generation == self._found.generation:
                self._free.append((generation, buffers))

    def _adopt(self, key: tuple, registered: int, live: Snapshot) -> _Found:
        carriers = live.carriers
        live = dataclasses.replace(live, carriers=[])
        found = _Found(
            key,
            registered,
            carriers,
            _adapter_state(carriers, self._options.adapter_name),
            live,
            next(self._generations),
            [s.tensor for s in live.shards],
        )
        with self._lock:
            self._found = found
            self._free.clear()
        return found

    def _buffers(self, found: _Found) -> list[torch.Tensor]:
        with self._lock:
            if self._free and self._free[-1][0] == found.generation:
                return self._free.pop()[1]
        return _flat_buffers([s.tensor for s in found.live.shards])


def _flat_buffers(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Host buffers shaped like `tensors`: views of one flat tensor per dtype (pinned when the tensors are on a GPU)."""
    sizes: dict[torch.dtype, int] = {}
    for t in tensors:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    pinned = any(t.is_cuda for t in tensors)
    flat = {dtype: torch.empty(n, dtype=dtype, pin_memory=pinned) for dtype, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    buffers = []
    for t in tensors:
        n, start = t.numel(), offsets[t.dtype]
        buffers.append(flat[t.dtype][start : start + n].view(t.shape))
        offsets[t.dtype] = start + n
    return buffers
