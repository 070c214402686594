"""A torch_dist checkpoint's `.metadata`, read without building any of its classes.

torch itself reads `.metadata` with a plain `pickle.load`. Here the pickle's declared lengths are checked first
(torch_save.check_pickle), and the unpickler knows a fixed list of torch.distributed.checkpoint class names; for
each it builds an inert Record (the fields, or the arguments of an enum, the pickle gives; no code of the class
runs), and anything else it refuses, except torch.Size, dtypes, layouts and OrderedDict. The records are then
checked field by field (exact class names, no unknown attributes, integer sizes, chunks inside the global shape,
plain data file names, non-negative offsets and lengths) and turned into this module's own plain types. Nothing
else of the pickle (the planner's data, Megatron's cached save plans) is used, but all of it is read, as torch reads
it: a part left unread could change what was read before it.

Every key, its kind (tensor or bytes) and every tensor's size are checked when the metadata is parsed; a tensor's
chunks and dtype, and the stored items of a key, are checked and converted when first asked for (an export reads
the adapter's keys only: a large MoE model's metadata has ~10^5 chunks and stored items of other tensors). What is
asked for is refused with the same message either way.
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
import math
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from operator import add, le
from typing import Any, NamedTuple

import torch

from ..core.brief import brief
from ..export import paused_collection
from ..io.torch_save import LAYOUT, Sealed, check_pickle

log = logging.getLogger("megatron_peft_export")
_DCP = "torch.distributed.checkpoint."
_RECORDED = {
    (_DCP + "metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
        "MetadataIndex",
        "StorageMeta",
    )
} | {(_DCP + "filesystem", "_StorageInfo")}
_FIELD_ORDER = {
    "Metadata": (
        "state_dict_metadata",
        "storage_data",
        "planner_data",
        "storage_meta",
        "version",
        "all_local_plans",  # Megatron's
    ),
    "TensorStorageMetadata": ("properties", "size", "chunks"),
    "BytesStorageMetadata": (),
    "ChunkStorageMetadata": ("offsets", "sizes"),
    # torch's __getstate__ gives them as a tuple in this order
    "TensorProperties": ("dtype", "layout", "requires_grad", "memory_format", "pin_memory"),
    "MetadataIndex": ("fqn", "offset", "index"),
    "_StorageInfo": ("relative_path", "offset", "length", "transform_descriptors"),
}
"""The fields each record class may have (the C reader takes them in this order: what it reads first)."""
_FIELDS = {name: set(fields) for name, fields in _FIELD_ORDER.items()}
MAX_DIMS = 64
MAX_EXTENT = 1 << 48
MAX_CHUNK_LIST = 1 << 20
"""Chunks one tensor entry may list."""
C_READER_VALUES = (4, 1 << 20)
"""The C reader converts every key's chunks (and every stored item's offsets) into int64 arrays when it parses, where
the Python path converts a key's when it is read: a chunk list shared by many keys, of one chunk record referenced
many times (2 bytes each), would make gigabytes from a small file. So it declines (and the Python path reads the file,
lazily) past 4 values per byte of the file plus 1 Mi values: real files are far inside (61x256: 48.7 MB, 0.66 M
chunk values and 0.33 M offsets)."""
C_READER_OBJECTS = (1 << 28) - 1
"""The most strings, large ints, records, dicts, lists (each) and tuple items the C reader numbers: its values are 32
bits, a 28-bit number of what they are. Past it, it declines (and the Python path reads the file); 61x256 holds 1.1 M
records and 2.3 M tuple items."""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a class or function outside the allowed ones."""


class MetadataError(ValueError):
    """The metadata is not what torch.distributed.checkpoint writes."""


class Record(metaclass=Sealed):
    """An object of an allowed class as the pickle describes it, nothing of the class built or run: the pickle's
    BUILD puts the fields straight into the record's __dict__ (in C, as fast as torch's own classes load). The
    record classes, like every class the unpickler hands out, are Sealed: the pickle cannot set their attributes."""

    class_name = "?"

    def __repr__(self) -> str:
        return f"{self.class_name}(...)"


class CalledRecord(Record):
    """A record of a class the pickle calls (torch's enums): the arguments are kept, as `__args__`."""

    def __new__(cls, *args: Any, **kwargs: Any) -> CalledRecord:
        record = object.__new__(cls)
        record.__dict__["__args__"] = args
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


class StateRecord(Record):
    """A record of a class whose state the pickle gives as one value (TensorProperties: a tuple), kept as
    `__state__`."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["__state__"] = state


_CALLED = {"_MEM_FORMAT_ENCODING"}
_RECORD_TYPES = {
    key: Sealed(
        key[1],
        (CalledRecord if key[1] in _CALLED else StateRecord if key[1] == "TensorProperties" else Record,),
        {"class_name": key[1]},
    )
    for key in _RECORDED
}
_BY_NAME = {name: cls for (_, name), cls in _RECORD_TYPES.items()}


class Dropped(metaclass=Sealed):
    """An object of Megatron's cached save plans (the planner's classes): the pickle builds and sets it like any
    other, but nothing of it is kept (every one is this one instance, its state discarded), as nothing of it is
    used. It holds no record, so it cannot change one."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Dropped:
        return _DROPPED

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_DROPPED = object.__new__(Dropped)
_PLANNER = {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RECORD_TYPES:
            return _RECORD_TYPES[(module, name)]
        if module == _DCP + "planner" and name in _PLANNER:
            return Dropped
        if module == "torch" and (
            name == "Size" or isinstance(torch.__dict__.get(name), (torch.dtype, torch.layout, torch.memory_format))
        ):
            return torch.__dict__[name]  # never getattr: torch's module __getattr__ imports and calls
        if (module, name) == ("torch.serialization", "_get_layout"):
            return LAYOUT
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise RefusedGlobal(f"{module}.{name} is not allowed in checkpoint metadata")


class StoredItem(NamedTuple):
    """Where one stored item is: a byte range of a data file in the checkpoint directory."""

    relative_path: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


class Chunk(NamedTuple):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


class TensorEntry(NamedTuple):
    """A tensor of the checkpoint: its dtype, global size and the chunks it is stored in."""

    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * self.dtype.itemsize


class Converted(Mapping):
    """A mapping whose values are checked and converted from the pickle's records when first read, then kept.
    Membership, iteration and length need no conversion; a value that fails its checks raises MetadataError each
    time it is asked for."""

    def __init__(self, raw: Mapping, convert: Callable[[Any, Any], Any]) -> None:
        self._raw, self._convert, self._done = raw, convert, {}

    def __getitem__(self, key: Any) -> Any:
        done = self._done.get(key, _MISSING)
        if done is _MISSING:
            done = self._done[key] = self._convert(key, self._raw[key])
        return done

    def __setitem__(self, key: Any, value: Any) -> None:
        """Replace a converted value (tests simulating what a crafted file would say)."""
        if key not in self._raw:
            raise KeyError(key)
        self._done[key] = value

    def forget(self, keys: Iterable) -> None:
        """Drop the converted values of `keys` (converted again if asked for): for a caller that keeps them in another
        form."""
        for key in keys:
            self._done.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._raw

    def __iter__(self) -> Iterator:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


_MISSING = object()


@dataclass(frozen=True)
class CheckpointMetadata:
    tensors: Mapping[str, TensorEntry]
    """Converted when first read (Converted)."""
    sizes: dict[str, tuple[int, ...]]
    """Every tensor's global size, checked when parsed."""
    byte_keys: frozenset[str]
    """Entries torch stores as pickled bytes (BytesStorageMetadata): never read here."""
    items: Mapping[tuple[str, tuple[int, ...] | None], StoredItem]
    """(key, chunk offsets) -> stored item; offsets None for a byte entry. A key's items are converted when one of
    them is first read (StoredItems)."""

    def forget_items(self, keys: Iterable[str]) -> None:
        """Drop the converted stored items of `keys`, for a caller that keeps them in another form (read again if asked
        for; a plain mapping given as `items`, as tests simulate a crafted file, keeps its own)."""
        if isinstance(self.items, StoredItems):
            self.items.forget(keys)


# The checks below run over every entry of a large model's metadata (hundreds of thousands of records): each
# builds its message only when it fails, and the callers add where (the key, the chunk) when they re-raise.


def _state(record: Any, cls: type) -> dict[str, Any]:
    if type(record) is not cls:
        raise MetadataError(f"expected a {cls.class_name}, found {_describe(record)}")
    state = record.__dict__
    if not state.keys() <= _FIELDS[cls.class_name]:
        extra = sorted(k if type(k) is str else brief(k, 40) for k in state.keys() - _FIELDS[cls.class_name])
        raise MetadataError(f"a {cls.class_name} with attributes it does not have ({', '.join(extra[:4])})")
    return state


def _describe(value: Any) -> str:
    return value.class_name if isinstance(value, Record) else type(value).__name__


def _ints(value: Any) -> tuple[int, ...]:
    if type(value) is torch.Size:  # holds ints only
        if len(value) <= MAX_DIMS and (not value or (min(value) >= 0 and max(value) <= MAX_EXTENT)):
            return tuple(value)
    elif (
        type(value) in (tuple, list)
        and len(value) <= MAX_DIMS
        and all(type(v) is int and 0 <= v <= MAX_EXTENT for v in value)
    ):
        return tuple(value)
    raise MetadataError(f"expected up to {MAX_DIMS} integers from 0 to {MAX_EXTENT}, found {brief(value, 80)}")


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_EXTENT:
        raise MetadataError(f"{what}: expected an integer from 0 to {MAX_EXTENT}, found {brief(value, 40)}")
    return value


def plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


_TENSOR, _BYTES, _CHUNK, _PROPERTIES = (
    _BY_NAME[n] for n in ("TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties")
)
_INDEX, _INFO, _METADATA = _BY_NAME["MetadataIndex"], _BY_NAME["_StorageInfo"], _BY_NAME["Metadata"]


_PROPERTIES_FIELDS = _FIELD_ORDER["TensorProperties"]


def _dtype(properties: Any) -> torch.dtype:
    if type(properties) is not _PROPERTIES or properties.__dict__.keys() != {"__state__"}:
        raise MetadataError(f"properties: expected TensorProperties, found {_describe(properties)}")
    state = properties.__state__
    # torch's __getstate__: the fields as a tuple, in _FIELD_ORDER's order
    if type(state) is tuple and len(state) == len(_PROPERTIES_FIELDS):
        dtype = state[_PROPERTIES_FIELDS.index("dtype")]
    elif type(state) is dict and state.keys() <= _FIELDS["TensorProperties"]:
        dtype = state.get("dtype")
    else:
        raise MetadataError(f"properties: expected TensorProperties' fields, found {_describe(state)}")
    if not isinstance(dtype, torch.dtype):
        raise MetadataError(f"properties.dtype: expected a torch dtype, found {brief(dtype, 40)}")
    return dtype


def _size(record: Any) -> tuple[int, ...]:
    """A TensorStorageMetadata's fields and size checked: its size."""
    state = _state(record, _TENSOR)
    if len(state) != 3:
        raise MetadataError(f"expected properties, size and chunks, found {sorted(state)}")
    try:
        return _ints(state["size"])
    except MetadataError as exc:
        raise MetadataError(f"size: {exc}") from None


def _tensor(record: Any) -> TensorEntry:
    size = _size(record)
    state = record.__dict__
    chunks = state["chunks"]
    if type(chunks) is not list or len(chunks) > MAX_CHUNK_LIST:
        raise MetadataError(f"chunks: expected a list, found {_describe(chunks)}")
    parsed = []
    for n, chunk in enumerate(chunks):
        try:
            fields = _state(chunk, _CHUNK)
            offsets, sizes = _ints(fields.get("offsets")), _ints(fields.get("sizes"))
        except MetadataError as exc:
            raise MetadataError(f"chunks[{n}]: {exc}") from None
        if len(offsets) != len(size) or len(sizes) != len(size) or not all(map(le, map(add, offsets, sizes), size)):
            raise MetadataError(
                f"chunk {n} at {list(offsets)} of size {list(sizes)} lies outside the tensor's size {list(size)}"
            )
        parsed.append(Chunk(offsets, sizes))
    return TensorEntry(_dtype(state["properties"]), size, tuple(parsed))


def _item(index: Any, info: Any) -> tuple[tuple[str, tuple[int, ...] | None], StoredItem]:
    fields = _state(index, _INDEX)
    fqn = fields.get("fqn")
    if type(fqn) is not str:
        raise MetadataError(f"a storage index names {brief(fqn, 40)}, expected a key")
    try:
        offset = fields.get("offset")
        offset = None if offset is None else _ints(offset)
        if fields.get("index") is not None:
            _int(fields["index"], "index")
        stored = _state(info, _INFO)
        path = stored.get("relative_path")
        if not plain_file_name(path):
            named = path[:80] if type(path) is str else brief(path, 80)
            raise MetadataError(f"refused, it names data files outside the checkpoint directory ({named}, for {fqn})")
        transforms = stored.get("transform_descriptors") or ()
        if type(transforms) not in (list, tuple) or not all(type(t) is str for t in transforms):
            raise MetadataError(f"expected transform names, found {brief(transforms, 60)}")
        item = StoredItem(
            path, _int(stored.get("offset"), "offset"), _int(stored.get("length"), "length"), tuple(transforms)
        )
    except MetadataError as exc:
        raise exc if str(exc).startswith("refused") else MetadataError(f"stored item of {fqn}: {exc}") from None
    return (fqn, offset), item


def _items(pairs: list[tuple[Any, Any]], names: set[str]) -> dict[tuple[int, ...] | None, StoredItem]:
    """`_item` of one key's entries of storage_data (chunk offsets -> stored item, the last one given for equal
    offsets, as torch's dict keeps); the common case (plain fields, a data file name of `names`, already checked) is
    checked inline, anything else goes through `_item`, which accepts or refuses it with its reason."""
    items = {}
    index_fields, info_fields = _FIELDS["MetadataIndex"], _FIELDS["_StorageInfo"]
    for index, info in pairs:
        if type(index) is _INDEX and type(info) is _INFO:
            fields, stored = index.__dict__, info.__dict__
            fqn, offsets, path = fields.get("fqn"), fields.get("offset"), stored.get("relative_path")
            start, length, position = stored.get("offset"), stored.get("length"), fields.get("index")
            if (
                fields.keys() <= index_fields
                and stored.keys() <= info_fields
                and type(fqn) is str
                and (offsets is None or type(offsets) is torch.Size)
                and type(path) is str
                and path in names
                and type(start) is int
                and type(length) is int
                and 0 <= start <= MAX_EXTENT
                and 0 <= length <= MAX_EXTENT
                and (position is None or (type(position) is int and 0 <= position <= MAX_EXTENT))
                and not stored.get("transform_descriptors")
            ):
                items[None if offsets is None else _ints(offsets)] = StoredItem(path, start, length)
                continue
        key, item = _item(index, info)
        items[key[1]] = item
    return items


class StoredItems(Mapping):
    """storage_data as (key, chunk offsets) -> StoredItem: its entries grouped by key when parsed, a key's group
    converted (to chunk offsets -> StoredItem) when one of its items is first read: `_groups` of the records, or
    `_compact_groups` of the C reader's arrays."""

    def __init__(self, keys: Converted) -> None:
        self._keys, self._done = keys, keys._done

    def __getitem__(self, key: tuple[str, tuple[int, ...] | None]) -> StoredItem:
        fqn, offsets = key
        if fqn not in self._keys:
            raise KeyError(key)
        return self._keys[fqn][offsets]

    def get(self, key: tuple[str, tuple[int, ...] | None], default: Any = None) -> Any:
        """As Mapping.get (a key's items refused raise, as when read), one lookup once its items are converted."""
        fqn, offsets = key
        group = self._group(fqn)
        return default if group is None else group.get(offsets, default)

    def get_many(self, fqn: str, offsets: list[tuple[int, ...] | None]) -> list[StoredItem | None]:
        """`[self.get((fqn, o)) for o in offsets]`, the key's group looked up once (an MoE expert tensor has hundreds
        of chunks)."""
        group = self._group(fqn)
        return [None] * len(offsets) if group is None else list(map(group.get, offsets))

    def _group(self, fqn: str) -> Mapping | None:
        """A key's items by offsets (converted when first asked for: refused items raise then), None for a key with
        none."""
        group = self._done.get(fqn)
        if group is None:
            if fqn not in self._keys:
                return None
            group = self._keys[fqn]
        return group

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the converted items of these keys (`Converted.forget`)."""
        self._keys.forget(keys)

    def __iter__(self) -> Iterator[tuple[str, tuple[int, ...] | None]]:
        return ((fqn, offsets) for fqn in self._keys for offsets in self._keys[fqn])

    def __len__(self) -> int:
        return sum(len(self._keys[fqn]) for fqn in self._keys)


def _groups(storage: dict) -> Converted:
    """storage_data's records grouped by key, each group converted by `_items` when first read.

    When parsed, every entry's index must name a key and every data file name must be plain (refused then, as a
    hostile file is refused whatever key it is stored for): the first entry naming each file is checked whole by
    `_item`."""
    groups: dict[str, list[tuple[Any, Any]]] = {}
    names: set[str] = set()
    for index, info in storage.items():
        fqn = index.__dict__.get("fqn") if type(index) is _INDEX else None
        path = info.__dict__.get("relative_path") if type(info) is _INFO else None
        if type(fqn) is not str or type(path) is not str or path not in names:
            _, item = _item(index, info)  # refuses it, saying why
            names.add(item.relative_path)
        group = groups.get(fqn)
        if group is None:
            groups[fqn] = [(index, info)]
        else:
            group.append((index, info))
    return Converted(groups, lambda key, pairs: _items(pairs, names))


def _checked(data: bytes) -> None:
    """The whole pickle checked (torch_save.check_pickle) before either reader reads it."""
    try:
        check_pickle(data)
    except ValueError as exc:
        raise MetadataError(f"cannot be read (not a valid pickle: {exc}); is the checkpoint truncated?") from None


def _unpickle(data: bytes) -> Any:
    """The metadata's records: the whole pickle checked (_checked), then read by the restricted unpickler,
    Megatron's cached save plans (`all_local_plans`) included.

    The plans are never used, but they are read all the same: a pickle can change what was read before (a memo
    reference to a record, then BUILD or SETITEMS on it; the same field set again), so only the whole pickle is
    what torch reads."""
    _checked(data)
    return _MetadataUnpickler(io.BytesIO(data)).load()


def _sections(root: Any) -> tuple[dict, dict]:
    """The metadata's state_dict_metadata and storage_data mappings."""
    try:
        state = _state(root, _METADATA)
    except MetadataError as exc:
        raise MetadataError(f"the metadata: {exc}") from None
    entries, storage = state.get("state_dict_metadata"), state.get("storage_data")
    if type(entries) is not dict or type(storage) is not dict:
        raise MetadataError(
            f"expected state_dict_metadata and storage_data mappings, found {_describe(entries)} and "
            f"{_describe(storage)}"
        )
    return entries, storage


def parse_metadata(data: bytes) -> CheckpointMetadata:
    """`.metadata`'s bytes -> CheckpointMetadata. Raises RefusedGlobal, MetadataError, or the unpickler's errors.

    The pickle is checked (_checked), then read by the C reader (`_dcp_metadata`, built with the package) when it is
    there and reads it, else by the restricted unpickler and the checks here (the reference: the C reader reads only
    what those accept, the same facts, and declines anything else)."""
    with paused_collection():
        _checked(data)
        parsed = _read_compact(data)
        if parsed is None:
            parsed = _parse_records(_MetadataUnpickler(io.BytesIO(data)).load())
        return parsed


def _parse(data: bytes) -> CheckpointMetadata:
    """The reference: the pickle checked and read by the restricted unpickler and the checks here."""
    return _parse_records(_unpickle(data))


def _parse_records(root: Any) -> CheckpointMetadata:
    entries, storage = _sections(root)
    tensors, sizes, byte_keys = {}, {}, set()
    for key, entry in entries.items():
        if type(key) is not str:
            raise MetadataError(f"a key {brief(key, 40)}, expected a string")
        try:
            if type(entry) is _BYTES:
                _state(entry, _BYTES)
                byte_keys.add(key)
            else:
                sizes[key] = _size(entry)
                tensors[key] = entry
        except MetadataError as exc:
            raise MetadataError(f"{'entry' if type(entry) is _BYTES else 'tensor'} {key}: {exc}") from None
    return CheckpointMetadata(
        Converted(tensors, _converted_tensor), sizes, frozenset(byte_keys), StoredItems(_groups(storage))
    )


def _converted_tensor(key: str, record: Any) -> TensorEntry:
    try:
        return _tensor(record)
    except MetadataError as exc:
        raise MetadataError(f"tensor {key}: {exc}") from None


# ----------------------------------------------------------------------------------------------------- the C reader
# megatron_peft_export/_dcp_metadata.c reads the whole pickle as the unpickler above does into a compact graph and
# gives back arrays of what CheckpointMetadata holds; it reads only pickles every check here accepts (every key's
# chunks and stored items included) and declines anything else, and then the Python path reads it. Its facts are
# the tables below, derived from find_class and the field lists.

_READ_KINDS = (
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "MetadataIndex",
    "_StorageInfo",
)
"""The record classes the C reader reads fields of, in the order it knows them; the others follow."""
_BEHAVIOURS = ("plain", "state", "called")
"""How a record class takes its state (a BUILD's dict, __setstate__, call arguments), numbered as the C reader's B_."""
_GLOBAL_KINDS = ("record", "dropped", "size", "dtype", "opaque", "get_layout", "other")
"""What an allowed global is, numbered as the C reader's G_ (opaque: a layout or memory format, never called; other:
a class it does not model, declined when called)."""


@functools.cache
def _reader() -> Any:
    """The C reader's module (`megatron_peft_export._dcp_metadata`, built by `pip install -e .`), or None when it was
    not built (then the Python path reads every metadata)."""
    try:
        reader = importlib.import_module("megatron_peft_export._dcp_metadata")
    except ImportError as exc:
        log.warning(
            "reading checkpoint metadata in Python, ~3x the time and memory of the C reader, which was not "
            "built (%s): reinstall with a C compiler (pip install -e . or the wheel) to read large checkpoints fast",
            exc,
        )
        return None
    return reader


@functools.cache
def _reader_tables() -> tuple[tuple, tuple[torch.dtype, ...]]:
    """The C reader's tables (see _dcp_metadata.c's load_tables; they end with the dtypes by number, which it puts in
    its result) and those dtypes. The allowed globals are those find_class gives (every name it could allow is asked),
    each said what it is."""
    kinds = _READ_KINDS + tuple(sorted(set(_BY_NAME) - set(_READ_KINDS)))
    behaviours = tuple(
        _BEHAVIOURS.index(
            "called"
            if issubclass(_BY_NAME[k], CalledRecord)
            else "state"
            if issubclass(_BY_NAME[k], StateRecord)
            else "plain"
        )
        for k in kinds
    )
    fields = tuple(tuple(name.encode() for name in _FIELD_ORDER.get(k, ())) for k in kinds)
    candidates = [
        *sorted(_RECORDED),
        *((_DCP + "planner", name) for name in sorted(_PLANNER)),
        *(("torch", name) for name in list(torch.__dict__) if type(name) is str),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    ]
    unpickler = _MetadataUnpickler(io.BytesIO(b""))
    found_globals, dtypes = [], []
    for module, name in candidates:
        try:
            found = unpickler.find_class(module, name)
        except RefusedGlobal:
            continue
        arg = 0
        if isinstance(found, type) and issubclass(found, Record):
            kind, arg = "record", kinds.index(found.class_name)
        elif found is Dropped:
            kind = "dropped"
        elif found is torch.Size:
            kind = "size"
        elif isinstance(found, torch.dtype):
            kind, arg = "dtype", len(dtypes)
            dtypes.append(found)
        elif isinstance(found, (torch.layout, torch.memory_format)):
            kind = "opaque"
        elif found is LAYOUT:
            kind = "get_layout"
        else:
            kind = "other"  # OrderedDict
        found_globals.append((module.encode(), name.encode(), _GLOBAL_KINDS.index(kind), arg))
    limits = (
        MAX_DIMS,
        MAX_EXTENT,
        MAX_CHUNK_LIST,
        pickle.HIGHEST_PROTOCOL,
        len(_PROPERTIES_FIELDS),
        _PROPERTIES_FIELDS.index("dtype"),
        *C_READER_VALUES,
        C_READER_OBJECTS,
    )
    layouts = tuple(name.encode() for name in LAYOUT.__self__)
    dtypes = tuple(dtypes)
    return (tuple(found_globals), behaviours, fields, layouts, limits, dtypes), dtypes


def _read_compact(data: bytes) -> CheckpointMetadata | None:
    """The C reader's CheckpointMetadata of an already checked pickle, or None when it declines (or is not built)."""
    reader = _reader()
    if reader is None:
        return None
    found = reader.read(data, _reader_tables()[0])
    if type(found) is str:
        log.debug("checkpoint metadata read in Python: the C reader declined it (%s)", found)
        return None
    sizes, raw, byte_keys, groups, chunks, items, offsets, paths = found
    if not all(plain_file_name(path) for path in paths):
        return None  # the Python path refuses it, saying why

    def tensor(key: str, row: tuple) -> TensorEntry:
        dtype, size, first, count = row
        return TensorEntry(dtype, size, reader.chunks(chunks, first, count, len(size), Chunk))

    def stored(fqn: str, span: tuple[int, int]) -> dict:
        return reader.items(items, offsets, *span, paths, StoredItem)

    return CheckpointMetadata(
        Converted(raw, tensor),
        sizes,
        byte_keys,
        StoredItems(Converted(groups, stored)),
    )
