"""Reading saved Megatron checkpoints: find the iteration, its recorded settings, and adapter tensors only.

Every file goes through safe_read (regular files inside the checkpoint directory, sizes from the opened
file). `.metadata` through dcp_metadata (no class of it is built); common.pt, modelopt_state/common.pt and
legacy rank files through torch_save.load_torch_file (no torch.load, no code of the file runs); stored items
are decoded in memory by torch_save.decode, and an item it does not take is refused (torch's own loader would
unpickle entries the metadata declares as bytes, so it is never called).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..io.checkpoints import ITERATION_PLACEHOLDER, TRACKER, iteration_dir, read_tracker
from ..io.safe_read import GiB, RegularFile, open_regular, read_bytes, read_yaml
from ..io.torch_save import (
    Layout,
    NotPlainTensor,
    RefusedGlobal,
    StoredTensor,
    decode,
    gather,
    layout_of,
    load_torch_file,
    matching,
)
from .dcp_metadata import (
    CheckpointMetadata,
    Chunk,
    MetadataError,
    StoredItem,
    TensorEntry,
    parse_metadata,
)
from .dcp_metadata import (
    RefusedGlobal as RefusedMetadataGlobal,
)

log = logging.getLogger("megatron_peft_export")
METADATA_LIMIT = 4 * GiB
"""`.metadata` is read whole; a large model's with a sharded optimizer is tens of MB."""
MAX_CHUNKS = 1 << 12
"""Chunks of one adapter tensor (one per TP, EP or PP shard that saved a piece of it)."""


def locate(path: str | Path) -> Path:
    """An iteration directory, or a save directory resolved through its tracker file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: expected a checkpoint directory ({ITERATION_PLACEHOLDER} or a save directory), found "
            f"{'a file' if path.exists() else 'nothing'}"
        )
    iteration = read_tracker(path, error=CheckpointError)
    return path if iteration is None else iteration_dir(path, iteration)


def checkpoint_format(directory: Path) -> str:
    if os.path.lexists(directory / ".metadata"):
        return "torch_dist"
    if any(directory.glob("mp_rank_*/model_optim_rng.pt")):
        return "legacy"
    found = sorted(p.name for p in directory.iterdir())[:8] if directory.is_dir() else []
    raise CheckpointError(
        f"{directory}: expected a Megatron checkpoint (torch_dist .metadata, or mp_rank_*/model_optim_rng.pt), "
        f"found {found or 'no files'}; "
        f"pass an {ITERATION_PLACEHOLDER} directory or a save directory with {TRACKER}"
    )


@contextlib.contextmanager
def torch_file(path: Path, directory: Path) -> Iterator[tuple[Any, RegularFile]]:
    """(the object a torch.save file holds, its open file) for a file inside `directory`; tensors are StoredTensor
    records, read with `.read(file)` while the file is open."""
    with open_regular(path, within=directory, error=CheckpointError, what="a torch.save file") as f:
        try:
            found = load_torch_file(f)
        except RefusedGlobal as exc:
            raise CheckpointError(
                f"{path}: refused, it needs unsafe unpickling ({exc} is not loaded: only tensors, argument "
                f"namespaces and plain data "
                "are; nothing of the file ran)"
            ) from None
        except CheckpointError:
            raise
        except (
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            OverflowError,
            EOFError,
            struct.error,
            pickle.UnpicklingError,
            MemoryError,
        ) as exc:
            raise CheckpointError(
                f"{path}: cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); is the file "
                f"truncated or corrupt?"
            ) from None
        yield found, f


def read_stored(stored: StoredTensor, path: Path, directory: Path) -> torch.Tensor:
    """The values of a tensor record of a torch.save file (only the bytes it covers are read)."""
    with open_regular(path, within=directory, error=CheckpointError, what="a torch.save file") as f:
        try:
            return stored.read(f)
        except CheckpointError:
            raise
        except (ValueError, TypeError, RuntimeError, struct.error) as exc:
            raise CheckpointError(
                f"{path}: reading a tensor failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); is "
                f"the file truncated or corrupt?"
            ) from None


def read_torch_file(path: Path, directory: Path) -> Any:
    """The object of a small torch.save file (common.pt): plain data; tensors in it stay unread records."""
    with torch_file(path, directory) as (found, _):
        return found


@dataclass
class RecordedSettings:
    """What a checkpoint says about itself: Megatron-LM args, Bridge's run_config.yaml, ModelOpt's PEFT config."""

    args: Any = None
    run_config: dict | None = None
    modelopt_peft: list[dict] | None = None


def modelopt_peft_configs(state: Any, where: Path) -> list[dict] | None:
    """ModelOpt's PEFT configs from its saved state ({"modelopt_state_dict": [(mode, {"config": ...}), ...]})."""
    if state is None:
        return None
    modes = state.get("modelopt_state_dict", []) if isinstance(state, dict) else None
    if not isinstance(modes, list) or not all(
        isinstance(m, (tuple, list)) and len(m) == 2 and isinstance(m[1], dict) for m in modes
    ):
        raise CheckpointError(
            f"{where}: expected ModelOpt's state (modelopt_state_dict: a list of (mode, settings) pairs), found "
            f"{type(modes).__name__}"
        )
    configs = [mode[1].get("config") for mode in modes if mode[0] == "peft"]
    if not all(isinstance(c, dict) for c in configs):
        raise CheckpointError(f"{where}: ModelOpt's PEFT config is not a mapping")
    return configs


def read_settings(directory: Path) -> RecordedSettings:
    settings = RecordedSettings()
    common = directory / "common.pt"
    if os.path.lexists(common):
        state = read_torch_file(common, directory)
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{common}: expected Megatron's common state (a mapping), found {type(state).__name__}"
            )
        settings.args = state.get("args")
    run_config = directory / "run_config.yaml"
    if os.path.lexists(run_config):
        settings.run_config = read_yaml(
            run_config, within=directory, error=CheckpointError, what="Megatron-Bridge's run_config.yaml"
        )
        if settings.run_config is not None and not isinstance(settings.run_config, dict):
            raise CheckpointError(f"{run_config}: expected a mapping, found {type(settings.run_config).__name__}")
    modelopt = directory / "modelopt_state" / "common.pt"
    if os.path.lexists(modelopt):
        settings.modelopt_peft = modelopt_peft_configs(read_torch_file(modelopt, directory) or {}, modelopt)
    return settings


def modelopt_alpha(peft_configs: list[dict], adapter_name: str, module: str, rank: int) -> float | None:
    """alpha = scale * r from ModelOpt's saved PEFT config: the merged settings of every pattern matching the module."""
    for config in peft_configs:
        if config.get("adapter_name") != adapter_name:
            continue
        merged: dict = {}
        patterns = config.get("adapter_cfg", {})
        for pattern, setting in patterns.items() if isinstance(patterns, dict) else ():
            if isinstance(pattern, str) and isinstance(setting, dict) and fnmatch(module, pattern):
                merged.update(setting)
        if not merged:
            return None
        if merged.get("rank", rank) != rank:
            raise CheckpointError(
                f"{module}: ModelOpt's saved config gives rank {merged['rank']!r:.20} but the tensors have rank "
                f"{rank}; "
                "layer-specific patterns under pipeline parallelism match stage-local names. Pass --lora-alpha."
            )
        scale = merged.get("scale", 1.0)
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)):
            raise CheckpointError(
                f"{module}: ModelOpt's saved config gives the LoRA scale {scale!r:.40}, expected a finite number; "
                f"pass --lora-alpha"
            )
        return float(scale) * rank
    return None


READ_BATCH_BYTES = 32 * 2**20
"""Adapter bytes the offline exporter reads ahead: one batch of stored items, decoded together."""


class TorchDistReader:
    """Reads single keys of a torch_dist checkpoint; bytes of other keys (base weights, optimizer) are never read.

    `.metadata` is parsed by dcp_metadata (checked field by field); `check_stored` checks the keys to be read against
    the data files (every chunk stored once, items inside their files and not overlapping) before anything is
    allocated for them.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        path = directory / ".metadata"
        data = read_bytes(
            path,
            limit=METADATA_LIMIT,
            within=directory,
            error=CheckpointError,
            what="torch.distributed.checkpoint metadata",
        )
        try:
            self._metadata: CheckpointMetadata = parse_metadata(data)
        except RefusedMetadataGlobal as exc:
            raise CheckpointError(
                f"{path}: refused, it needs unsafe unpickling ({str(exc).splitlines()[0]}); only torch's "
                f"checkpoint metadata classes are loaded"
            ) from None
        except Exception as exc:
            raise self._unreadable(exc) from None
        self._checked: set[str] = set()

    def _unreadable(self, exc: Exception) -> CheckpointError:
        """The error for a metadata that fails its checks (when parsed, or when a key's entries are first read)."""
        path = self.directory / ".metadata"
        if isinstance(exc, MetadataError):
            return CheckpointError(f"{path}: {exc}")
        return CheckpointError(
            f"{path}: cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); is the "
            f"checkpoint truncated?"
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._metadata.sizes)

    @property
    def byte_keys(self) -> frozenset[str]:
        """Keys stored as pickled bytes (BytesStorageMetadata): never read."""
        return self._metadata.byte_keys

    def entry(self, key: str) -> TensorEntry:
        """What the metadata says of a tensor: dtype, size, chunks (checked when first asked for)."""
        if key not in self._metadata.tensors:
            raise KeyError(key)
        try:
            return self._metadata.tensors[key]
        except Exception as exc:
            raise self._unreadable(exc) from None

    def dtype(self, key: str) -> str:
        return str(self.entry(key).dtype).removeprefix("torch.")

    def _items(self, key: str) -> list[tuple[Any, StoredItem]]:
        entry = self.entry(key)
        try:
            return [(chunk, self._metadata.items.get((key, chunk.offsets))) for chunk in entry.chunks]
        except Exception as exc:
            raise self._unreadable(exc) from None

    def check_stored(self, keys: list[str]) -> None:
        """Refuse keys whose stored data cannot be what the metadata says, before anything is allocated for them.

        Per tensor: its chunks cover its shape exactly once. Per stored item, on arrays of all of them at once: it
        exists, is plain, holds its chunk's bytes, lies inside its file and overlaps no other (sorted by file and
        offset once)."""
        where = self.directory / ".metadata"
        paths, starts, lengths, needed, owners = [], [], [], [], []
        for key in keys:
            entry = self.entry(key)
            self._check_chunks(key, entry)
            itemsize = entry.dtype.itemsize
            for chunk, item in self._items(key):
                if item is None:
                    raise CheckpointError(
                        f"{where}: {key} has no stored item for its chunk at {list(chunk.offsets)}; is the "
                        f"checkpoint complete?"
                    )
                if item.transforms:
                    raise CheckpointError(
                        f"{self.directory}: {key} is stored transformed ({', '.join(item.transforms)}); only plain "
                        f"items are read"
                    )
                paths.append(item.relative_path)
                starts.append(item.offset)
                lengths.append(item.length)
                needed.append(chunk.numel * itemsize)
                owners.append(key)
        lengths_ = np.array(lengths, dtype=np.int64)
        short = np.flatnonzero(lengths_ < np.array(needed, dtype=np.int64))
        if len(short):
            n, key = int(short[0]), owners[int(short[0])]
            raise CheckpointError(
                f"{where}: {key} claims {needed[n]} bytes of {self.entry(key).dtype} data in a stored "
                f"item of {lengths[n]} bytes"
            )
        names = sorted(set(paths))
        position = {name: n for n, name in enumerate(names)}
        files = np.array([position[path] for path in paths], dtype=np.int64)
        self._check_ranges(names, files, np.array(starts, dtype=np.int64), lengths_, owners)
        self._checked.update(keys)

    def _check_chunks(self, key: str, entry: TensorEntry) -> None:
        if len(entry.chunks) > MAX_CHUNKS:
            raise CheckpointError(
                f"{self.directory / '.metadata'}: {key} is stored in {len(entry.chunks)} chunks; expected at most "
                f"{MAX_CHUNKS}"
            )
        if sum(chunk.numel for chunk in entry.chunks) != math.prod(entry.size) or _overlapping(entry):
            raise CheckpointError(
                f"{self.directory}: {key} is not fully stored (its chunks do not cover {list(entry.size)} "
                f"exactly once); is the checkpoint complete?"
            )

    def _check_ranges(self, names: list[str], files, starts, lengths, owners: list[str]) -> None:
        """Stored items (file index, start, length, owning key) inside their files and not overlapping: sorted by
        file and offset once, checked on the arrays."""
        order = np.lexsort((lengths, starts, files))
        files, starts, ends = files[order], starts[order], starts[order] + lengths[order]
        for index, name in enumerate(names):
            lo, hi = np.searchsorted(files, [index, index + 1])
            with open_regular(
                self.directory / name, within=self.directory, error=CheckpointError, what="a .distcp data file"
            ) as f:
                outside = np.flatnonzero(ends[lo:hi] > f.size)
                if len(outside):
                    n = lo + int(outside[0])
                    f.check_range(int(starts[n]), int(ends[n] - starts[n]), f"the stored item of {owners[order[n]]}")
            overlap = np.flatnonzero(starts[lo + 1 : hi] < ends[lo : hi - 1])
            if len(overlap):
                n = lo + int(overlap[0])
                raise CheckpointError(
                    f"{self.directory / '.metadata'}: the stored items of {owners[order[n]]} and "
                    f"{owners[order[n + 1]]} overlap in {name}"
                )

    def load(self, key: str) -> torch.Tensor:
        return next(self.load_many([key]))[1]

    def load_many(
        self,
        keys: list[str],
        budget: int = READ_BATCH_BYTES,
        *,
        direct: Mapping[str, Mapping[tuple[int, ...], list[Segment]]] | None = None,
        payload: memoryview | None = None,
    ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(key, tensor) for each key in order, read in batches of up to `budget` bytes (a larger tensor is read alone).

        Each stored item is read with one positional read of its byte range, in file order, and decoded in memory
        (io/torch_save.py); an item that decoder does not take is refused. The budget bounds what is read ahead.

        `direct` (key -> chunk offsets -> segments) names keys whose values go straight into `payload`: each segment
        (start in the chunk's bytes, start in `payload`, length) is copied from the decoded chunk's bytes, in C
        order, with no tensor built; such keys are yielded as (key, None) once copied.
        """
        unchecked = [key for key in keys if key not in self._checked]
        if unchecked:
            self.check_stored(unchecked)
        batch: list[str] = []
        size = 0
        for key in keys:
            nbytes = self.entry(key).nbytes
            if batch and size + nbytes > budget:
                yield from self._load_batch(batch, direct or {}, payload)
                batch, size = [], 0
            batch.append(key)
            size += nbytes
        if batch:
            yield from self._load_batch(batch, direct or {}, payload)

    def _load_batch(self, keys: list[str], direct, payload) -> Iterator[tuple[str, torch.Tensor | None]]:
        try:
            tensors = self._read_items(keys, direct, payload)
        except CheckpointError:
            raise
        except NotPlainTensor as exc:
            raise CheckpointError(
                f"{self.directory}: {exc}; expected a tensor as torch.distributed.checkpoint stores it (a plain "
                f"torch.save zip); "
                "is a .distcp file corrupt?"
            ) from None
        except Exception as exc:
            what = keys[0] if len(keys) == 1 else f"{keys[0]} (and {len(keys) - 1} more tensors)"
            raise CheckpointError(
                f"{self.directory}: reading {what} failed ({type(exc).__name__}); is a .distcp file truncated or "
                f"missing?"
            ) from None
        for key in keys:
            yield key, (None if key in direct else tensors.pop(key))

    def _read_items(self, keys: list[str], direct=None, payload=None) -> dict[str, torch.Tensor]:
        """The keys' stored items, read in runs of adjacent items (one positional read per run, in file order) and
        decoded in memory: blobs laid out as one already decoded (the same bytes wherever decode looks) are taken
        together, any other blob is decoded on its own."""
        items = sorted(
            (
                (item.relative_path, item.offset, item.length, key, chunk)
                for key in keys
                for chunk, item in self._items(key)
            ),
            key=lambda item: item[:2],
        )
        tensors: dict[str, torch.Tensor] = {}
        scratch = np.empty(0, dtype=np.uint8)  # reused: nothing read into it outlives its run (decoding copies)
        with contextlib.ExitStack() as files:
            opened: dict[str, RegularFile] = {}
            for run in _runs(items):
                relative_path, start = run[0][0], run[0][1]
                if relative_path not in opened:
                    opened[relative_path] = files.enter_context(
                        open_regular(
                            self.directory / relative_path,
                            within=self.directory,
                            error=CheckpointError,
                            what="a .distcp data file",
                        )
                    )
                f = opened[relative_path]
                size = run[-1][1] + run[-1][2] - start
                f.check_range(start, size, f"the stored items of {run[0][3]}" + (" and others" if len(run) > 1 else ""))
                if len(scratch) < size:
                    scratch = np.empty(size, dtype=np.uint8)  # not zero-filled: the read below fills all of it
                buffer = scratch[:size]
                f.readinto(buffer, start)
                for group in _same_layout(
                    buffer, [(offset - start, length, key, chunk) for _, offset, length, key, chunk in run]
                ):
                    if direct:
                        group = self._copy_direct(buffer, group, direct, payload)
                    if group[1]:
                        self._place(tensors, buffer, group)
        return tensors

    def _copy_direct(self, buffer: np.ndarray, group, direct, payload: memoryview) -> tuple:
        """Copy the blobs of `direct` keys in a group into the payload by their segments; the group of the others.

        A blob laid out as one whole tensor is copied from where its data lies in the buffer; any other is decoded
        alone (and made contiguous) first. Either way its dtype and shape are the metadata's, or it is refused as
        `_put` refuses it."""
        layout, blobs = group
        rest = []
        source = memoryview(buffer)
        last = None  # a group's blobs are mostly of one key: its entry and segments looked up once
        for blob in blobs:
            at, length, key, chunk = blob
            if key != last:
                last, segments = key, direct.get(key)
                entry = None if segments is None else self.entry(key)
            if segments is None:
                rest.append(blob)
                continue
            if layout is not None and layout.whole:
                _check_part(key, entry, chunk, layout.dtype, layout.size)
                data, base = source, at + layout.data_offset
            else:
                part = _decode_one(buffer, at, length, key)
                _check_part(key, entry, chunk, part.dtype, tuple(part.shape))
                data, base = _bytes(part), 0
            for src, dst, n in segments[chunk.offsets]:
                payload[dst : dst + n] = data[base + src : base + src + n]
        if rest and len(rest) < len(blobs) and layout is not None:  # the others need not lie one after another
            return None, rest
        return layout, rest

    def _place(self, tensors: dict[str, torch.Tensor], buffer, group) -> None:
        """Put a group of blobs (the layout they share, or None: each decoded alone) into the keys' tensors."""
        layout, blobs = group
        if layout is None or not layout.whole:
            for at, length, key, chunk in blobs:
                self._put(tensors, key, chunk, _decode_one(buffer, at, length, key))
            return
        stacked = gather(buffer, blobs[0][0], len(blobs), layout.length, layout)
        key, first = blobs[0][2], blobs[0][3]
        entry = self.entry(key)
        rows = layout.size[0] if layout.size else 0
        if (
            layout.size
            and entry.dtype == layout.dtype
            and all(k == key for _, _, k, _ in blobs)
            and all(chunk.sizes == layout.size for *_, chunk in blobs)
            and layout.size[1:] == entry.size[1:]
            and all(
                chunk.offsets == (first.offsets[0] + n * rows,) + first.offsets[1:]
                for n, (*_, chunk) in enumerate(blobs)
            )
        ):  # one key's chunks, one after another along dim 0: one copy (none when they are the whole tensor)
            whole = Chunk((first.offsets[0],) + first.offsets[1:], (rows * len(blobs),) + layout.size[1:])
            self._put(tensors, key, whole, stacked.view(whole.sizes))
            return
        for n, (_, _, key, chunk) in enumerate(blobs):
            self._put(tensors, key, chunk, stacked[n])

    def _put(self, tensors: dict[str, torch.Tensor], key: str, chunk: Chunk, part: torch.Tensor) -> None:
        entry = self.entry(key)
        _check_part(key, entry, chunk, part.dtype, part.shape)
        if chunk.sizes == entry.size:
            tensors[key] = part
            return
        if key not in tensors:
            tensors[key] = torch.empty(entry.size, dtype=entry.dtype)
        tensors[key][tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))] = part


RUN_BYTES = 16 * 2**20
"""At most this many bytes of adjacent stored items are read by one read (a larger item is read alone)."""


def _runs(items: list[tuple]) -> Iterator[list[tuple]]:
    """Sorted (file, offset, length, ...) items cut into runs of adjacent items (each starts where the last ended, in
    one file), of up to RUN_BYTES. Nothing between items is read."""
    run: list[tuple] = []
    for item in items:
        if run and (
            item[0] != run[-1][0] or item[1] != run[-1][1] + run[-1][2] or item[1] + item[2] - run[0][1] > RUN_BYTES
        ):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


MAX_LAYOUTS = 64
"""Layouts learnt per blob length (one per shape and dtype stored at that length); blobs past them are decoded alone."""


def _same_layout(buffer: bytearray, blobs: list[tuple]) -> Iterator[tuple[Layout | None, list[tuple]]]:
    """(layout, blobs) groups of consecutive blobs (offset in buffer, length, ...) that decode as one layout, in
    order; (None, [blob]) for a blob decoded alone. Layouts are learnt from the first blob that matches none."""
    known: dict[int, list[Layout]] = {}
    n = 0
    while n < len(blobs):
        at, length = blobs[n][:2]
        end = n + 1
        while end < len(blobs) and blobs[end][1] == length and blobs[end][0] == at + (end - n) * length:
            end += 1
        which = _layout_indices(buffer, np.arange(at, at + (end - n) * length, length, dtype=np.int64), known, length)
        layouts = known.get(length, [])
        k = 0
        while k < len(which):
            stop = k + 1
            while stop < len(which) and which[stop] == which[k] >= 0:
                stop += 1
            yield (layouts[which[k]] if which[k] >= 0 else None), blobs[n + k : n + stop]
            k = stop
        n = end


def _layout_indices(buffer: bytearray, starts: np.ndarray, known: dict[int, list[Layout]], length: int) -> np.ndarray:
    """Per blob at `starts` (all of `length` bytes): the index of its layout in known[length] (learnt as needed), or -1
    for a blob to decode alone."""
    layouts = known.setdefault(length, [])
    which = np.full(len(starts), -1, dtype=np.int64)
    for index, layout in enumerate(layouts):
        which[(which < 0) & matching(buffer, starts, layout)] = index
    while len(layouts) < MAX_LAYOUTS:
        unmatched = np.flatnonzero(which == -1)
        if not len(unmatched):
            break
        first = int(starts[unmatched[0]])
        try:
            layouts.append(layout_of(memoryview(buffer)[first : first + length]))
        except NotPlainTensor:
            which[unmatched[0]] = -2  # decoded alone, which says why
            continue
        rest = unmatched[matching(buffer, starts[unmatched], layouts[-1])]
        which[rest] = len(layouts) - 1
    return np.where(which < 0, -1, which)


Segment = tuple[int, int, int]
"""(start in a stored chunk's bytes in C order, start in the payload, length in bytes)."""


def _check_part(key: str, entry: TensorEntry, chunk: Chunk, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """A decoded chunk is what the metadata says it is (dtype and shape), else it is refused."""
    if tuple(shape) != chunk.sizes or dtype != entry.dtype:
        raise NotPlainTensor(f"{key}: stored {dtype} {list(shape)}, metadata says {entry.dtype} {list(chunk.sizes)}")


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's values in C order as bytes."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _decode_one(buffer, at: int, length: int, key: str) -> torch.Tensor:
    try:
        return decode(bytearray(memoryview(buffer)[at : at + length]))
    except NotPlainTensor as exc:
        raise NotPlainTensor(f"{key}: {exc}") from None


def _overlapping(entry: TensorEntry) -> bool:
    """Whether two chunks of a tensor overlap (as boxes of offsets and sizes; empty chunks overlap nothing).

    Chunks of one size whose offsets are multiples of it (a tensor split evenly, as TP, EP and PP shards are) lie on
    that size's grid, where two boxes either coincide or do not meet: they overlap if and only if two offsets are
    equal. Any other chunks are compared pairwise."""
    chunks = [c for c in entry.chunks if c.numel]
    if len(chunks) < 2:
        return False
    sizes = chunks[0].sizes
    if all(c.sizes == sizes for c in chunks) and all(
        o % s == 0 for c in chunks for o, s in zip(c.offsets, sizes, strict=True)
    ):
        return len({c.offsets for c in chunks}) < len(chunks)
    return _overlapping_pairs(chunks)


def _overlapping_pairs(chunks: list[Chunk]) -> bool:
    """Whether two of these non-empty chunks overlap, every pair compared."""
    starts = torch.tensor([c.offsets for c in chunks], dtype=torch.int64)
    ends = starts + torch.tensor([c.sizes for c in chunks], dtype=torch.int64)
    meet = ((starts[:, None, :] < ends[None, :, :]) & (starts[None, :, :] < ends[:, None, :])).all(-1)
    meet.fill_diagonal_(False)
    return bool(meet.any())
