"""Reading saved Megatron checkpoints: find the iteration, its recorded settings, and adapter tensors only.

Every file goes through safe_read (regular files inside the checkpoint directory, sizes from the opened
file). `.metadata` through dcp_metadata (no class of it is built); common.pt, modelopt_state/common.pt and
legacy rank files through torch_save.load_torch_file (no torch.load, no code of the file runs); stored items
are decoded in memory by torch_save.decode, and an item it does not take is refused (torch's own loader would
unpickle entries the metadata declares as bytes, so it is never called).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import pickle
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import CheckpointError
from ..io.checkpoints import ITERATION_PLACEHOLDER, TRACKER, iteration_dir, read_tracker
from ..io.safe_read import GiB, RegularFile, open_regular, read_bytes, read_yaml
from ..io.safetensors_out import copy_segments
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
    sorted_distinct,
)
from .dcp_metadata import (
    CheckpointMetadata,
    Chunk,
    MetadataError,
    StoredItem,
    StoredItems,
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
        self._stored: dict[str, _Stored] = {}
        """The keys checked by `check_stored`, with their stored items as arrays."""
        self._file_ids: dict[str, int] = {}
        """Data file name -> its number in the arrays of `_stored`."""
        self._covering: set[tuple[tuple[int, ...], bytes]] = set()
        """Chunkings (a tensor's size, its `_chunk_table` as bytes) found to cover their tensor exactly once."""

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

        Per tensor, on an array of its chunks: its chunks cover its shape exactly once. Per stored item, on arrays of
        all of them at once: it exists, is plain, holds its chunk's bytes, lies inside its file and overlaps no other
        (sorted by file and offset once). The checked items are kept, as arrays, for reading."""
        found = [self._stored_items(key, self.entry(key)) for key in keys]
        if not found:
            return
        lengths = np.concatenate([stored.lengths for stored, _ in found])
        needed = np.concatenate([need for _, need in found])
        counts = np.cumsum([len(stored.lengths) for stored, _ in found])
        short = np.flatnonzero(lengths < needed)
        if len(short):
            n = int(short[0])
            key = keys[int(np.searchsorted(counts, n, side="right"))]
            raise CheckpointError(
                f"{self.directory / '.metadata'}: {key} claims {int(needed[n])} bytes of {self.entry(key).dtype} data "
                f"in a stored item of {int(lengths[n])} bytes"
            )
        files = np.concatenate([stored.files for stored, _ in found])
        starts = np.concatenate([stored.starts for stored, _ in found])
        self._check_ranges(files, starts, lengths, lambda n: keys[int(np.searchsorted(counts, n, side="right"))])
        self._stored.update(zip(keys, (stored for stored, _ in found)))
        self._metadata.forget_items(keys)  # kept above as arrays: ~15 MB of StoredItems at 61x256 experts

    def _stored_items(self, key: str, entry: TensorEntry) -> tuple[_Stored, np.ndarray]:
        """A key's chunks checked (`_check_chunks`) and its stored items looked up and checked to exist and be plain:
        the items as arrays, and the bytes each must hold. Any item missing or transformed is refused by
        `_refuse_items`, which names the first."""
        table = _chunk_table(entry)
        self._check_chunks(key, entry, table)
        items = self._metadata.items
        try:
            if isinstance(items, StoredItems):
                found = items.get_many(key, [offsets for offsets, _ in entry.chunks])
            else:  # a plain mapping (tests simulating a crafted file)
                found = [items.get((key, offsets)) for offsets, _ in entry.chunks]
        except Exception as exc:
            raise self._unreadable(exc) from None
        if None in found:
            self._refuse_items(key)
        if not found:
            empty = np.empty(0, dtype=np.int64)
            return _Stored(empty, empty, empty, empty, None, row_slabs(entry, table)), empty
        paths, starts, lengths, transforms = zip(*found)
        if any(transforms):
            self._refuse_items(key)
        ids = self._file_ids
        for path in dict.fromkeys(paths):  # numbered in the order first named
            ids.setdefault(path, len(ids))
        files = np.fromiter(map(ids.__getitem__, paths), dtype=np.int64, count=len(paths))
        if table is None:  # 2^62 bytes or more, which no stored item holds (at most 2^48 bytes each)
            needed = np.array([min(chunk.numel * entry.dtype.itemsize, 1 << 62) for chunk in entry.chunks])
            common = None
        else:
            sizes = table[:, 1]
            needed = sizes.prod(axis=1) * entry.dtype.itemsize
            common = entry.chunks[0].sizes if (sizes == sizes[0]).all() else None
        needed = needed.astype(np.int64)
        starts, lengths = np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.int64)
        stored = _Stored(files, starts, lengths, needed, common, row_slabs(entry, table))
        return stored, needed

    def slabs(self, key: str) -> np.ndarray | None:
        """A key checked by `check_stored` (its chunks cover it exactly once): `row_slabs` of its chunks."""
        return self._stored[key].slabs

    def _refuse_items(self, key: str) -> None:
        """Refuse a key's first chunk (in its entry's order) that has no stored item or a transformed one."""
        for chunk, item in self._items(key):
            if item is None:
                raise CheckpointError(
                    f"{self.directory / '.metadata'}: {key} has no stored item for its chunk at "
                    f"{list(chunk.offsets)}; is the checkpoint complete?"
                )
            if item.transforms:
                raise CheckpointError(
                    f"{self.directory}: {key} is stored transformed ({', '.join(item.transforms)}); only plain "
                    f"items are read"
                )
        raise AssertionError(f"{key}: its stored items were refused, but none is missing or transformed")

    def _check_chunks(self, key: str, entry: TensorEntry, table: np.ndarray | None) -> None:
        """A tensor's chunks cover its shape exactly once (on `_chunk_table`'s array; with Python's integers when
        there is none)."""
        if len(entry.chunks) > MAX_CHUNKS:
            raise CheckpointError(
                f"{self.directory / '.metadata'}: {key} is stored in {len(entry.chunks)} chunks; expected at most "
                f"{MAX_CHUNKS}"
            )
        if table is None:
            covered = sum(chunk.numel for chunk in entry.chunks) == math.prod(entry.size) and not _overlapping(entry)
        else:  # once per chunking: the layers of a model are chunked alike
            chunking = (entry.size, table.tobytes())
            covered = chunking in self._covering or _covers(table, entry.size)
            if covered:
                self._covering.add(chunking)
        if not covered:
            raise CheckpointError(
                f"{self.directory}: {key} is not fully stored (its chunks do not cover {list(entry.size)} "
                f"exactly once); is the checkpoint complete?"
            )

    def _check_ranges(self, files, starts, lengths, owner) -> None:
        """Stored items (file number, start, length; `owner(n)` the key of item n) inside their files and not
        overlapping: sorted by file name and offset once, checked on the arrays."""
        names = sorted(self._file_ids)
        rank = self._file_ranks(names)
        order = np.lexsort((lengths, starts, rank[files]))
        ranks, starts, ends = rank[files][order], starts[order], starts[order] + lengths[order]
        for index in sorted_distinct(ranks).tolist():
            name = names[index]
            lo, hi = np.searchsorted(ranks, [index, index + 1])
            with open_regular(
                self.directory / name, within=self.directory, error=CheckpointError, what="a .distcp data file"
            ) as f:
                outside = np.flatnonzero(ends[lo:hi] > f.size)
                if len(outside):
                    n = lo + int(outside[0])
                    f.check_range(int(starts[n]), int(ends[n] - starts[n]), f"the stored item of {owner(order[n])}")
            overlap = np.flatnonzero(starts[lo + 1 : hi] < ends[lo : hi - 1])
            if len(overlap):
                n = lo + int(overlap[0])
                raise CheckpointError(
                    f"{self.directory / '.metadata'}: the stored items of {owner(order[n])} and "
                    f"{owner(order[n + 1])} overlap in {name}"
                )

    def _file_ranks(self, names: list[str]) -> np.ndarray:
        """File number -> the rank of its name among `names` (the data files sorted by name)."""
        rank = np.empty(len(self._file_ids), dtype=np.int64)
        for n, name in enumerate(names):
            rank[self._file_ids[name]] = n
        return rank

    def load(self, key: str) -> torch.Tensor:
        return next(self.load_many([key]))[1]

    def load_many(
        self,
        keys: list[str],
        budget: int = READ_BATCH_BYTES,
        *,
        direct: Mapping[str, Segments] | None = None,
        payload: memoryview | None = None,
    ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(key, tensor) for each key in order, read in batches of up to `budget` bytes (a larger tensor is read alone).

        Each stored item is read with one positional read of its byte range, in file order, and decoded in memory
        (io/torch_save.py); an item that decoder does not take is refused. The budget bounds what is read ahead.

        `direct` (key -> its Segments) names keys whose values go straight into `payload`: each segment (a chunk,
        start in the chunk's bytes, start in `payload`, length) is copied from the decoded chunk's bytes, in C order,
        with no tensor built; such keys are yielded as (key, None) once copied.
        """
        unchecked = [key for key in keys if key not in self._stored]
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
        decoded in memory: the keys of `direct` copied into `payload` (`_copy_items`), the others' tensors returned
        (`_read_tensors`)."""
        direct = direct or {}
        copied = [key for key in keys if key in direct]
        if copied:
            self._copy_items(copied, [direct[key] for key in copied], payload)
        rest = [key for key in keys if key not in direct]
        return self._read_tensors(rest) if rest else {}

    def _runs(self, keys: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """The keys' stored items read in runs (`_run_bounds`, in file order): per run, the buffer read and its items'
        numbers (the keys' items numbered in order, each key's in its entry's chunk order), starts in the buffer and
        lengths. The buffer is reused: nothing read into it outlives its run."""
        stored = [self._stored[key] for key in keys]
        files = np.concatenate([s.files for s in stored])
        starts = np.concatenate([s.starts for s in stored])
        lengths = np.concatenate([s.lengths for s in stored])
        names = sorted(self._file_ids)
        ranks = self._file_ranks(names)[files]
        order = np.lexsort((starts, ranks))
        ranks, starts, lengths = ranks[order], starts[order], lengths[order]
        ends = np.cumsum([len(s.starts) for s in stored])
        scratch = np.empty(0, dtype=np.uint8)
        with contextlib.ExitStack() as opened:
            f, open_rank = None, -1
            for lo, hi in _run_bounds(ranks, starts, lengths):
                if ranks[lo] != open_rank:
                    open_rank = int(ranks[lo])
                    f = opened.enter_context(
                        open_regular(
                            self.directory / names[open_rank],
                            within=self.directory,
                            error=CheckpointError,
                            what="a .distcp data file",
                        )
                    )
                start = int(starts[lo])
                size = int(starts[hi - 1] + lengths[hi - 1]) - start
                owner = keys[int(np.searchsorted(ends, order[lo], side="right"))]
                f.check_range(start, size, f"the stored items of {owner}" + (" and others" if hi - lo > 1 else ""))
                if len(scratch) < size:
                    scratch = np.empty(size, dtype=np.uint8)  # not zero-filled: the read below fills all of it
                buffer = scratch[:size]
                f.readinto(buffer, start)
                yield buffer, order[lo:hi], starts[lo:hi] - start, lengths[lo:hi]

    def _read_tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The keys' tensors: blobs laid out as one already decoded (the same bytes wherever decode looks) are taken
        together, any other blob is decoded on its own."""
        chunks = [(key, chunk) for key in keys for chunk in self.entry(key).chunks]
        tensors: dict[str, torch.Tensor] = {}
        for buffer, items, ats, lengths in self._runs(keys):
            blobs = [(at, length, *chunks[n]) for at, length, n in zip(ats.tolist(), lengths.tolist(), items.tolist())]
            for group in _same_layout(buffer, blobs):
                self._place(tensors, buffer, group)
        return tensors

    def _copy_items(self, keys: list[str], segments: list[Segments], payload: memoryview) -> None:
        """Copy the keys' stored chunks into `payload` by their segments.

        A blob laid out as a known whole tensor (the same bytes wherever decode looks as a blob already read) is
        checked against the metadata (dtype and shape, on arrays per run) and copied from where its data lies in the
        buffer; any other is decoded alone, checked and copied from its contiguous values. A blob that is not what
        the metadata says is refused as `_put` refuses it, in file order."""
        entries = [self.entry(key) for key in keys]
        stored = [self._stored[key] for key in keys]
        counts = [len(s.starts) for s in stored]
        first = np.cumsum([0, *counts])
        nbytes = np.concatenate([s.nbytes for s in stored])
        for seg, count in zip(segments, counts):
            chunk = np.asarray(seg.chunk)
            if len(chunk) and (chunk.min() < 0 or chunk.max() >= count):
                raise ValueError("a segment of a chunk the key does not have")
        item = np.concatenate([first[k] + np.asarray(seg.chunk, dtype=np.int64) for k, seg in enumerate(segments)])
        src, dst, length = (
            np.concatenate([np.asarray(getattr(seg, name), dtype=np.int64) for seg in segments])
            for name in ("src", "dst", "length")
        )
        if ((src < 0) | (length < 0) | (src + length > nbytes[item])).any():
            raise ValueError("a segment outside its chunk's bytes")
        by_item = np.argsort(item, kind="stable")
        item, src, dst, length = item[by_item], src[by_item], dst[by_item], length[by_item]
        bounds = np.searchsorted(item, np.arange(first[-1] + 1))
        key_of = np.repeat(np.arange(len(keys)), counts)
        sizes: dict[tuple[int, ...], int] = {}
        size_of = np.concatenate(
            [
                np.full(n, sizes.setdefault(s.sizes, len(sizes)), dtype=np.int64)
                if s.sizes is not None
                else np.array([sizes.setdefault(c.sizes, len(sizes)) for c in e.chunks], dtype=np.int64)
                for s, e, n in zip(stored, entries, counts)
            ]
        )
        dtypes: dict[torch.dtype, int] = {}
        dtype_of = np.array([dtypes.setdefault(e.dtype, len(dtypes)) for e in entries], dtype=np.int64)[key_of]
        learnt = _Layouts()
        for buffer, items, ats, lengths in self._runs(keys):
            which = learnt.find(buffer, ats, lengths)
            table = learnt.table(sizes, dtypes)  # per layout: whole, dtype, size, data offset; a last row for none
            whole = table[which, 0] == 1
            fits = whole & (table[which, 1] == dtype_of[items]) & (table[which, 2] == size_of[items])
            bad = np.flatnonzero(whole & ~fits)
            alone = np.flatnonzero(~whole)
            stop = int(bad[0]) if len(bad) else len(items)
            for n in alone[alone < stop].tolist():
                k, chunk = int(key_of[items[n]]), int(items[n] - first[key_of[items[n]]])
                part = _decode_one(buffer, int(ats[n]), int(lengths[n]), keys[k])
                _check_part(keys[k], entries[k], entries[k].chunks[chunk], part.dtype, tuple(part.shape))
                data = _bytes(part)
                lo, hi = bounds[items[n]], bounds[items[n] + 1]
                for s, d, m in zip(src[lo:hi].tolist(), dst[lo:hi].tolist(), length[lo:hi].tolist()):
                    payload[d : d + m] = data[s : s + m]
            if len(bad):
                n = int(bad[0])
                k, chunk = int(key_of[items[n]]), int(items[n] - first[key_of[items[n]]])
                layout = learnt.layouts[which[n]]
                _check_part(keys[k], entries[k], entries[k].chunks[chunk], layout.dtype, layout.size)
                raise AssertionError("a blob failed its check but was not refused")
            picked = np.flatnonzero(fits)
            at = ats[picked] + table[which[picked], 3]
            picked = items[picked]
            lo, count = bounds[picked], bounds[picked + 1] - bounds[picked]
            index = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(int(count.sum()))
            copy_segments(payload, buffer, np.repeat(at, count) + src[index], dst[index], length[index])

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


RUN_BYTES = 4 * 2**20
"""At most this many bytes of adjacent stored items are read by one read (a larger item is read alone); the buffer is
part of the offline export's peak memory (at 61x256 experts 16 MiB runs read no faster than 4 MiB ones)."""


def _run_bounds(files: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[tuple[int, int]]:
    """Items sorted by file and offset cut into runs of adjacent items (each starts where the last ended, in one
    file), of up to RUN_BYTES (a larger item alone): (first, end) index pairs. Nothing between items is read."""
    ends = starts + lengths
    cuts = (np.flatnonzero((files[1:] != files[:-1]) | (starts[1:] != ends[:-1])) + 1).tolist()
    bounds = []
    for lo, hi in zip([0, *cuts], [*cuts, len(starts)]):
        while lo < hi:  # items are added while the run's end is at most RUN_BYTES past its start
            stop = lo + 1 + int(np.searchsorted(ends[lo + 1 : hi], starts[lo] + RUN_BYTES, side="right"))
            bounds.append((lo, stop))
            lo = stop
    return bounds


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


class _Layouts:
    """Layouts learnt from blobs while reading (up to MAX_LAYOUTS per blob length), numbered in the order learnt."""

    def __init__(self) -> None:
        self.known: dict[int, list[Layout]] = {}
        self.layouts: list[Layout] = []
        self._numbers: dict[int, list[int]] = {}

    def find(self, buffer: np.ndarray, ats: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Per blob (adjacent blobs: starts in `buffer`, lengths): the number of its layout, learnt as needed; -1 for
        a blob to decode alone."""
        out = np.empty(len(ats), dtype=np.int64)
        cuts = (np.flatnonzero(lengths[1:] != lengths[:-1]) + 1).tolist()
        for lo, hi in zip([0, *cuts], [*cuts, len(ats)]):
            length = int(lengths[lo])
            which = _layout_indices(buffer, ats[lo:hi], self.known, length)
            numbers = self._numbers.setdefault(length, [])
            for layout in self.known[length][len(numbers) :]:
                numbers.append(len(self.layouts))
                self.layouts.append(layout)
            out[lo:hi] = np.array([*numbers, -1], dtype=np.int64)[which]
        return out

    def table(self, sizes: dict[tuple[int, ...], int], dtypes: dict[torch.dtype, int]) -> np.ndarray:
        """Per layout, then a last row for none (-1): whether it is a whole tensor, its dtype's and size's numbers
        (-1 when neither is in `dtypes`, `sizes`), where its data starts in a blob."""
        rows = [(int(t.whole), dtypes.get(t.dtype, -1), sizes.get(t.size, -1), t.data_offset) for t in self.layouts]
        return np.array([*rows, (0, -1, -1, 0)], dtype=np.int64)


class Segments(NamedTuple):
    """A key's copies into a payload, one per segment (arrays): its chunk (index in the key's entry's chunks), start in
    that chunk's bytes in C order, start in the payload, length in bytes."""

    chunk: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    length: np.ndarray


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


class _Stored(NamedTuple):
    """A checked key's stored items (`TorchDistReader.check_stored`), in the order of its entry's chunks."""

    files: np.ndarray
    """The reader's number of each item's data file."""
    starts: np.ndarray
    lengths: np.ndarray
    nbytes: np.ndarray
    """Each chunk's bytes (in C order)."""
    sizes: tuple[int, ...] | None
    """The size every chunk has, None when they differ."""
    slabs: np.ndarray | None
    """`row_slabs` of the key's chunks (kept for the payload segments; 16 bytes a chunk)."""


def _chunk_table(entry: TensorEntry) -> np.ndarray | None:
    """A tensor's chunks as one array [chunks, 2, dims] (offsets, sizes), None for a tensor of 2^62 bytes or more
    (whose products would not fit int64; checked with Python's integers instead). A chunk of other dimensions than
    the tensor's (the metadata's parser refuses it) makes the array cover nothing (`_covers` refuses it)."""
    size, chunks = entry.size, entry.chunks
    if math.prod(size) * entry.dtype.itemsize >= 1 << 62:
        return None
    dims = len(size)
    if sum(map(len, itertools.chain.from_iterable(chunks))) != 2 * dims * len(chunks):
        return np.full((1, 2, dims), -1, dtype=np.int64)
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable(chunks))
    return np.fromiter(flat, dtype=np.int64, count=2 * dims * len(chunks)).reshape(len(chunks), 2, dims)


def row_slabs(entry: TensorEntry, table: np.ndarray | None = None) -> np.ndarray | None:
    """A tensor's chunks as (first row, rows) [chunks, 2] when each is a slab of whole rows along dim 0 (its other
    dimensions the tensor's), else None (also for 2^62 bytes or more); from `_chunk_table`'s array when given."""
    table = _chunk_table(entry) if table is None else table
    if not entry.size or table is None or (table < 0).any() or (table[:, 1, 1:] != entry.size[1:]).any():
        return None
    return table[:, :, 0].copy()  # not a view: the whole table is not kept with it


def _covers(table: np.ndarray, size: tuple[int, ...]) -> bool:
    """Whether chunks (`_chunk_table`'s array of a tensor under 2^62 bytes) cover `size` exactly once: each inside
    it, their elements adding up to its, none overlapping. Each chunk's element count fits int64: its sizes are at
    most the tensor's."""
    offsets, sizes = table[:, 0], table[:, 1]
    limit = np.array(size, dtype=np.int64)
    if (offsets < 0).any() or (sizes < 0).any() or (offsets + sizes > limit).any():
        return False
    return sum(sizes.prod(axis=1).tolist()) == math.prod(size) and not _overlapping_boxes(offsets, sizes)


def _overlapping(entry: TensorEntry) -> bool:
    """Whether two chunks of a tensor overlap (as boxes of offsets and sizes; empty chunks overlap nothing). Offsets and
    sizes fit int64 (the metadata's parser bounds them); nothing here multiplies them."""
    dims = len(entry.size)
    table = np.array([c.offsets + c.sizes for c in entry.chunks], dtype=np.int64).reshape(len(entry.chunks), 2, dims)
    return _overlapping_boxes(table[:, 0], table[:, 1])


def _overlapping_boxes(offsets: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether two chunks (offsets and sizes [chunks, dims]) overlap; empty chunks overlap nothing.

    Chunks of one size whose offsets are multiples of it (a tensor split evenly, as TP, EP and PP shards are) lie on
    that size's grid, where two boxes either coincide or do not meet: they overlap if and only if two offsets are
    equal. Any other chunks are compared pairwise."""
    nonempty = (sizes > 0).all(axis=1)
    offsets, sizes = offsets[nonempty], sizes[nonempty]
    if len(offsets) < 2:
        return False
    if not offsets.shape[1]:
        return True  # two non-empty chunks of a scalar
    if (sizes == sizes[0]).all() and not (offsets % sizes[0]).any():
        ordered = offsets[np.lexsort(offsets.T[::-1])]
        return bool((ordered[1:] == ordered[:-1]).all(axis=1).any())
    return _overlapping_pairs([Chunk(tuple(o), tuple(s)) for o, s in zip(offsets.tolist(), sizes.tolist())])


def _overlapping_pairs(chunks: list[Chunk]) -> bool:
    """Whether two of these non-empty chunks overlap, every pair compared."""
    starts = torch.tensor([c.offsets for c in chunks], dtype=torch.int64)
    ends = starts + torch.tensor([c.sizes for c in chunks], dtype=torch.int64)
    meet = ((starts[:, None, :] < ends[None, :, :]) & (starts[None, :, :] < ends[:, None, :])).all(-1)
    meet.fill_diagonal_(False)
    return bool(meet.any())
