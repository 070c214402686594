"""The training hook's snapshots: at a save, the training thread copies the adapter into host buffers that are reused.

Two costs used to sit on the training thread at every save (bench/: 80 layers of rank-256 LoRA, TP=2 on CPU):
finding the adapter tensors (the dialect walk over every module, ~80 ms) and copying them into freshly allocated
host memory (the kernel's first touch of each page made that copy ~2-3x slower than into touched memory). Now:

- the full walk runs at the first save, and again only when a cheap check says the model changed: the ids of
  all modules (adding an adapter adds modules) and, on the modules that carry an adapter, what the dialect
  reports (tensor identity, shape, dtype, scale, split): ~10 ms at 80 layers, all on the training thread
  (the background never touches the model: ModelOpt's modules are not safe to read from another thread);
- each snapshot is copied into the buffers of an export that has finished (pinned when the adapter is on a
  GPU); the buffers of up to `max_pending` exports stay allocated while the hook lives.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed as coll
from .dialects import DIALECTS
from .export import ExportOptions, Snapshot, model_chunks, take_snapshot


@dataclass
class _Found:
    """One full walk: the live adapter tensors (not copies) with the report, and what the cheap check compares."""

    key: tuple
    modules: tuple[int, ...]
    held: list[torch.nn.Module]
    """Every module of the walk, held so that no id in `modules` can be reused by a new module while cached."""
    carriers: list[tuple[torch.nn.Module, Any]]
    """(module, dialect) for every module that carries an adapter."""
    state: list
    live: Snapshot
    generation: int


def _module_ids(chunks: list[torch.nn.Module]) -> tuple[int, ...]:
    return tuple(id(m) for chunk in chunks for m in chunk.modules())


def _described(value: Any) -> Any:
    return (id(value), tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value


def _adapter_state(carriers: list[tuple[torch.nn.Module, Any]], adapter_name: str) -> list:
    """What its dialect reports for each adapter-carrying module (tensors by identity, shape and dtype; scale, split).

    A module gaining an adapter (of any dialect, or another named one) gains modules, which the module ids show.
    """
    return [[[_described(v) for v in vars(t).values()] for t in dialect.find(module, adapter_name) or ()] for module, dialect in carriers]


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
        """This rank's adapter shards, copied to host memory."""
        chunks = model_chunks(model)
        key = (tuple(id(c) for c in chunks), layout)
        modules = _module_ids(chunks)
        found = self._found
        if found is None or found.key != key or found.modules != modules or _adapter_state(found.carriers, self._options.adapter_name) != found.state:
            self.walks += 1
            live = take_snapshot(model, layout, self._options, copy=False)
            if live.report.error is not None:  # nothing to copy; the error reaches every rank in the export
                return live
            found = self._adopt(key, modules, chunks, live)
        buffers = self._buffers(found)
        shards = [dataclasses.replace(s, tensor=buffer.copy_(s.tensor.detach())) for s, buffer in zip(found.live.shards, buffers)]
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

    def _adopt(self, key: tuple, modules: tuple[int, ...], chunks: list[torch.nn.Module], live: Snapshot) -> _Found:
        name = self._options.adapter_name
        held = [m for chunk in chunks for m in chunk.modules()]
        carriers = [(m, d) for m in held for d in DIALECTS if d.find(m, name) is not None]
        found = _Found(key, modules, held, carriers, _adapter_state(carriers, name), live, next(self._generations))
        with self._lock:
            self._found = found
            self._free.clear()
        return found

    def _buffers(self, found: _Found) -> list[torch.Tensor]:
        with self._lock:
            if self._free and self._free[-1][0] == found.generation:
                return self._free.pop()[1]
        return [torch.empty(s.tensor.shape, dtype=s.tensor.dtype, pin_memory=s.tensor.is_cuda) for s in found.live.shards]
