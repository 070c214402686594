"""A torch_dist checkpoint's `.metadata`, read without building any of its classes.

torch itself reads `.metadata` with a plain `pickle.load`. Here the pickle's declared lengths are checked first
(torch_save.check_pickle), and the unpickler knows a fixed list of torch.distributed.checkpoint class names; for
each it builds an inert Record (the constructor arguments and the state the pickle gives, no code of the class
runs), and anything else it refuses, except torch.Size, dtypes, layouts and OrderedDict. The records are then
checked field by field (exact class names, no unknown attributes, integer sizes, chunks inside the global shape,
plain data file names, non-negative offsets and lengths) and turned into this module's own plain types. Nothing
else of the pickle (the planner's data, Megatron's cached save plans) is used.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .torch_save import check_pickle

_DCP = "torch.distributed.checkpoint."
_RECORDED = {
    (_DCP + "metadata", name) for name in
    ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta")
} | {(_DCP + "filesystem", "_StorageInfo")} | {
    (_DCP + "planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")  # Megatron's cached plans, unused
}
_FIELDS = {
    "Metadata": {"state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version", "all_local_plans"},  # the last: Megatron's
    "TensorStorageMetadata": {"properties", "size", "chunks"},
    "BytesStorageMetadata": set(),
    "ChunkStorageMetadata": {"offsets", "sizes"},
    "TensorProperties": {"dtype", "layout", "requires_grad", "memory_format", "pin_memory"},
    "MetadataIndex": {"fqn", "offset", "index"},
    "_StorageInfo": {"relative_path", "offset", "length", "transform_descriptors"},
}
MAX_DIMS = 64
MAX_EXTENT = 1 << 48


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a class or function outside the allowed ones."""


class MetadataError(ValueError):
    """The metadata is not what torch.distributed.checkpoint writes."""


class Record:
    """An object of an allowed class as the pickle describes it: arguments and state, nothing built."""

    class_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Record":
        record = object.__new__(cls)
        record.args, record.state = args, None
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"{self.class_name}(...)"


_RECORD_TYPES = {key: type(key[1], (Record,), {"class_name": key[1]}) for key in _RECORDED}
_BY_NAME = {name: cls for (_, name), cls in _RECORD_TYPES.items()}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RECORD_TYPES:
            return _RECORD_TYPES[(module, name)]
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise RefusedGlobal(f"{module}.{name} is not allowed in checkpoint metadata")


@dataclass(frozen=True)
class StoredItem:
    """Where one stored item is: a byte range of a data file in the checkpoint directory."""

    relative_path: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the checkpoint: its dtype, global size and the chunks it is stored in."""

    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * self.dtype.itemsize


@dataclass(frozen=True)
class CheckpointMetadata:
    tensors: dict[str, TensorEntry]
    byte_keys: frozenset[str]
    """Entries torch stores as pickled bytes (BytesStorageMetadata): never read here."""
    items: dict[tuple[str, tuple[int, ...] | None], StoredItem]
    """(key, chunk offsets) -> stored item; offsets None for a byte entry."""


def _state(record: Any, name: str, where: str) -> dict[str, Any]:
    if type(record) is not _class(name):
        raise MetadataError(f"{where}: expected a {name}, found {_describe(record)}")
    state = record.state if record.state is not None else {}
    if record.args or not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise MetadataError(f"{where}: a {name} built from {_describe(record.args or state)}, expected its fields")
    extra = sorted(set(state) - _FIELDS[name])
    if extra:
        raise MetadataError(f"{where}: a {name} with attributes it does not have ({', '.join(extra[:4])})")
    return state


def _class(name: str) -> type:
    return _BY_NAME[name]


def _describe(value: Any) -> str:
    return value.class_name if isinstance(value, Record) else type(value).__name__


def _ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (torch.Size, tuple, list)) or len(value) > MAX_DIMS or not all(
            type(v) is int and 0 <= v <= MAX_EXTENT for v in value):
        raise MetadataError(f"{where}: expected up to {MAX_DIMS} integers from 0 to {MAX_EXTENT}, found {value!r:.80}")
    return tuple(value)


def _int(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_EXTENT:
        raise MetadataError(f"{where}: expected an integer from 0 to {MAX_EXTENT}, found {value!r:.40}")
    return value


def plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _dtype(properties: Any, where: str) -> torch.dtype:
    if type(properties) is not _class("TensorProperties") or properties.args:
        raise MetadataError(f"{where}.properties: expected TensorProperties, found {_describe(properties)}")
    state = properties.state
    if isinstance(state, tuple) and len(state) == 5:  # torch's __getstate__: (dtype, layout, requires_grad, memory format, pin_memory)
        dtype = state[0]
    else:
        dtype = _state(properties, "TensorProperties", f"{where}.properties").get("dtype")
    if not isinstance(dtype, torch.dtype):
        raise MetadataError(f"{where}.properties.dtype: expected a torch dtype, found {dtype!r:.40}")
    return dtype


def _tensor(key: str, record: Any) -> TensorEntry:
    where = f"tensor {key}"
    state = _state(record, "TensorStorageMetadata", where)
    if set(state) != _FIELDS["TensorStorageMetadata"]:
        raise MetadataError(f"{where}: expected properties, size and chunks, found {sorted(state)}")
    size = _ints(state["size"], f"{where}.size")
    chunks = state["chunks"]
    if not isinstance(chunks, list) or len(chunks) > 1 << 20:
        raise MetadataError(f"{where}.chunks: expected a list, found {_describe(chunks)}")
    parsed = []
    for n, chunk in enumerate(chunks):
        fields = _state(chunk, "ChunkStorageMetadata", f"{where}.chunks[{n}]")
        offsets, sizes = _ints(fields.get("offsets"), f"{where}.chunks[{n}].offsets"), _ints(fields.get("sizes"), f"{where}.chunks[{n}].sizes")
        if len(offsets) != len(size) or len(sizes) != len(size) or any(o + s > d for o, s, d in zip(offsets, sizes, size)):
            raise MetadataError(f"{where}: chunk {n} at {list(offsets)} of size {list(sizes)} lies outside the tensor's size {list(size)}")
        parsed.append(Chunk(offsets, sizes))
    return TensorEntry(_dtype(state["properties"], where), size, tuple(parsed))


def _item(index: Any, info: Any) -> tuple[tuple[str, tuple[int, ...] | None], StoredItem]:
    fields = _state(index, "MetadataIndex", "a storage index")
    fqn = fields.get("fqn")
    if not isinstance(fqn, str):
        raise MetadataError(f"a storage index names {fqn!r:.40}, expected a key")
    offset = fields.get("offset")
    offset = None if offset is None else _ints(offset, f"storage index of {fqn}")
    if fields.get("index") is not None:
        _int(fields["index"], f"storage index of {fqn}")
    where = f"stored item of {fqn}"
    stored = _state(info, "_StorageInfo", where)
    path = stored.get("relative_path")
    if not plain_file_name(path):
        raise MetadataError(f"refused, it names data files outside the checkpoint directory ({str(path)[:80]}, for {fqn})")
    transforms = stored.get("transform_descriptors") or ()
    if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
        raise MetadataError(f"{where}: expected transform names, found {transforms!r:.60}")
    return (fqn, offset), StoredItem(path, _int(stored.get("offset"), f"{where}.offset"), _int(stored.get("length"), f"{where}.length"), tuple(transforms))


def parse_metadata(data: bytes) -> CheckpointMetadata:
    """`.metadata`'s bytes -> CheckpointMetadata. Raises RefusedGlobal, MetadataError, or the unpickler's errors."""
    try:
        check_pickle(data)
    except ValueError as exc:
        raise MetadataError(f"cannot be read (not a valid pickle: {exc}); is the checkpoint truncated?") from None
    root = _MetadataUnpickler(io.BytesIO(data)).load()
    state = _state(root, "Metadata", "the metadata")
    entries, storage = state.get("state_dict_metadata"), state.get("storage_data")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise MetadataError(f"expected state_dict_metadata and storage_data mappings, found {_describe(entries)} and {_describe(storage)}")
    tensors, byte_keys = {}, set()
    for key, entry in entries.items():
        if not isinstance(key, str):
            raise MetadataError(f"a key {key!r:.40}, expected a string")
        if type(entry) is _class("BytesStorageMetadata"):
            _state(entry, "BytesStorageMetadata", f"entry {key}")
            byte_keys.add(key)
        else:
            tensors[key] = _tensor(key, entry)
    items = dict(_item(index, info) for index, info in storage.items())
    return CheckpointMetadata(tensors, frozenset(byte_keys), items)
