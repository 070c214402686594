"""Crafted `.metadata` pickles against the C reader (megatron_peft_export/_dcp_metadata.c): for every input, the C
reader reads exactly what the Python path (dcp_metadata._parse, the reference) reads, or declines; it never crashes
and never reads something the Python path refuses. The pickles are written opcode by opcode here (memo references to
records being built, BUILD and SETITEMS after the fact, states the writer never gives, odd numbers, odd strings), then
mutated (byte flips, truncations, opcodes inserted, deleted, repeated) from a fixed seed.

Cases that found a bug are kept as named regression tests at the end, marked xfail(strict=True) until fixed."""

from __future__ import annotations

import functools
import io
import pickle
import pickletools
import random
import struct
import time

import pytest
import torch
import torch.distributed.checkpoint.metadata as dcp_meta
from torch.distributed.checkpoint.filesystem import _StorageInfo

from megatron_peft_export.offline import dcp_metadata
from megatron_peft_export.offline.dcp_metadata import MetadataError

C_READER = dcp_metadata._reader()
needs_c = pytest.mark.skipif(C_READER is None, reason="the C reader was not built")

# ------------------------------------------------------------------------------------------------ a pickle writer
_DCP = "torch.distributed.checkpoint."
_MODULE = {
    cls.__name__: cls.__module__
    for cls in (
        dcp_meta.Metadata,
        dcp_meta.TensorStorageMetadata,
        dcp_meta.BytesStorageMetadata,
        dcp_meta.ChunkStorageMetadata,
        dcp_meta.TensorProperties,
        dcp_meta.MetadataIndex,
        dcp_meta._MEM_FORMAT_ENCODING,
        dcp_meta.StorageMeta,
        _StorageInfo,
    )
}
"""Where torch defines each class the pickles name (asked of torch, not of the reader's tables)."""
N, TRUE, FALSE = b"N", b"\x88", b"\x89"


def s(text: str | bytes) -> bytes:
    """A string (bytes: taken as the encoded string, whatever they are)."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    if len(data) < 256:
        return b"\x8c" + bytes([len(data)]) + data
    return b"X" + struct.pack("<I", len(data)) + data


def i(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    width = (n.bit_length() + 8) // 8
    return b"\x8a" + bytes([width]) + n.to_bytes(width, "little", signed=True)


def put(n: int) -> bytes:
    return b"q" + bytes([n]) if n < 256 else b"r" + struct.pack("<I", n)


def get(n: int) -> bytes:
    return b"h" + bytes([n]) if n < 256 else b"j" + struct.pack("<I", n)


def glob(module: str, name: str) -> bytes:
    return s(module) + s(name) + b"\x93"


def cls(name: str) -> bytes:
    return glob(_MODULE[name], name)


def new(name: str) -> bytes:
    return cls(name) + b")\x81"


def tup(*items: bytes) -> bytes:
    if not items:
        return b")"
    if len(items) <= 3:
        return b"".join(items) + bytes([0x84 + len(items)])
    return b"(" + b"".join(items) + b"t"


def size(*dims: int) -> bytes:
    return glob("torch", "Size") + tup(tup(*map(i, dims))) + b"R"


def dct(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u" if pairs else b"}"


def lst(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e" if items else b"]"


def rec(name: str, *fields: tuple[str, bytes]) -> bytes:
    return new(name) + dct(*[(s(k), v) for k, v in fields]) + b"b"


def dtype(name: str = "float32") -> bytes:
    return glob("torch", name)


def props_state(dt: bytes | None = None) -> bytes:
    """TensorProperties' state as torch's __getstate__ gives it (a 5-tuple)."""
    encoding = glob(_MODULE["_MEM_FORMAT_ENCODING"], "_MEM_FORMAT_ENCODING") + tup(i(1)) + b"R"
    return tup(dt or dtype(), glob("torch", "strided"), FALSE, encoding, FALSE)


def props(state: bytes | None = None) -> bytes:
    return new("TensorProperties") + (props_state() if state is None else state) + b"b"


def chunk(offsets, sizes) -> bytes:
    return rec("ChunkStorageMetadata", ("offsets", size(*offsets)), ("sizes", size(*sizes)))


def tensor(shape, chunks: list[bytes] | None = None, properties: bytes | None = None) -> bytes:
    if chunks is None:
        chunks = [chunk([0] * len(shape), shape)]
    return rec(
        "TensorStorageMetadata",
        ("properties", properties or props()),
        ("size", size(*shape)),
        ("chunks", lst(*chunks)),
    )


def index(fqn: str | bytes, offsets=None, number: bytes = N) -> bytes:
    name = s(fqn) if isinstance(fqn, str) else fqn
    return rec("MetadataIndex", ("fqn", name), ("offset", N if offsets is None else size(*offsets)), ("index", number))


def info(path: str | bytes = "__0_0.distcp", offset: int | bytes = 0, length: int | bytes = 32, **more) -> bytes:
    fields = [
        ("relative_path", s(path) if isinstance(path, str) else path),
        ("offset", i(offset) if isinstance(offset, int) else offset),
        ("length", i(length) if isinstance(length, int) else length),
    ]
    return rec("_StorageInfo", *fields, *more.items())


def metadata(entries: bytes, storage: bytes, *more: tuple[str, bytes], after: bytes = b"", proto: int = 4) -> bytes:
    """A Metadata; `after`: opcodes run after its fields are on the stack, before they are set (as Megatron's plans)."""
    fields = b"".join(s(k) + v for k, v in (("state_dict_metadata", entries), ("storage_data", storage), *more))
    return b"\x80" + bytes([proto]) + new("Metadata") + b"}(" + fields + after + b"ub."


def plain(entries: bytes | None = None, storage: bytes | None = None, **kw) -> bytes:
    """Two keys (a tensor a, bytes blob) and their stored items, each piece replaceable."""
    if entries is None:
        entries = dct((s("a"), tensor([4, 2])), (s("blob"), rec("BytesStorageMetadata")))
    if storage is None:
        storage = dct((index("a", [0, 0]), info(offset=0, length=32)), (index("blob"), info(offset=32, length=10)))
    return metadata(entries, storage, **kw)


# ------------------------------------------------------------------------------------------------ the comparison
def _facts(parsed) -> list:
    """Everything a CheckpointMetadata says, each lazily read value read (a refusal on reading is a fact too)."""
    facts = [list(parsed.sizes.items()), sorted(parsed.byte_keys), list(parsed.tensors)]
    for key in parsed.tensors:
        try:
            facts.append((key, parsed.tensors[key]))
        except MetadataError as exc:
            facts.append((key, "refused", str(exc)))
    try:
        facts.append(list(parsed.items.items()))
    except MetadataError as exc:
        facts.append(("items refused", str(exc)))
    return facts


def _python(data: bytes):
    try:
        return _facts(dcp_metadata._parse(data))
    except Exception as exc:  # the reference's refusal, whatever it is
        return type(exc).__name__, str(exc)


def compare(data: bytes) -> str:
    """ "refused" (check_pickle), "declined" (the C reader), or "read" (then its facts are the Python path's)."""
    try:
        dcp_metadata._checked(data)
    except MetadataError:
        return "refused"
    parsed = dcp_metadata._read_compact(data)
    if parsed is None:
        return "declined"
    facts, reference = _facts(parsed), _python(data)
    assert facts == reference, f"the C reader read {facts}\nthe Python path: {reference}"
    return "read"


def declined_why(data: bytes) -> str | None:
    tables, _ = dcp_metadata._reader_tables()
    found = C_READER.read(data, tables)
    return found if type(found) is str else None


# ------------------------------------------------------------------------------------------------ crafted cases
_MEMO_ENTRIES, _MEMO_STORAGE, _MEMO_A, _MEMO_X = 200, 201, 202, 203


def _entries_memoized(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}" + put(_MEMO_ENTRIES) + b"(" + b"".join(k + v for k, v in pairs) + b"u"


def _storage_memoized(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}" + put(_MEMO_STORAGE) + b"(" + b"".join(k + v for k, v in pairs) + b"u"


_STORAGE_A = dct((index("a", [0, 0]), info()))
_ENTRIES_A = dct((s("a"), tensor([4, 2])))


def _with_a(entry_a: bytes, storage: bytes = _STORAGE_A, **kw) -> bytes:
    return metadata(dct((s("a"), entry_a)), storage, **kw)


def _chunk_memo(offsets, sizes, memo: int) -> bytes:
    return (
        new("ChunkStorageMetadata") + put(memo) + dct((s("offsets"), size(*offsets)), (s("sizes"), size(*sizes))) + b"b"
    )


def _index_memo(memo: int, fqn: str = "a", offsets=(0, 0)) -> bytes:
    return new("MetadataIndex") + put(memo) + dct((s("fqn"), s(fqn)), (s("offset"), size(*offsets))) + b"b"


_INFO_STATE = dct((s("relative_path"), s("f")), (s("offset"), i(1)), (s("length"), i(2)))
"""The state of the crafted cases' own stored item (file f, offset 1, length 2), set by BUILD."""


def _info_memo(memo: int) -> bytes:
    """A _StorageInfo memoized before its state is set (a later `get(memo)` can change it)."""
    return new("_StorageInfo") + put(memo) + _INFO_STATE + b"b"


def _sized_tensor(size_args: bytes) -> bytes:
    """A tensor without chunks whose size is torch.Size called with the pickled arguments `size_args`."""
    return rec(
        "TensorStorageMetadata",
        ("properties", props()),
        ("size", glob("torch", "Size") + size_args + b"R"),
        ("chunks", b"]"),
    )


def _metadata_memo(fields: bytes) -> bytes:
    """A Metadata memoized as _MEMO_X before its state dict (`fields`: its keys and values, and any opcodes among
    them) is set: the opcodes in `fields` can reach it."""
    return b"\x80\x04" + new("Metadata") + put(_MEMO_X) + b"}(" + fields + b"ub."


def _mem_format(args: bytes, op: bytes = b"R") -> bytes:
    return glob(_MODULE["_MEM_FORMAT_ENCODING"], "_MEM_FORMAT_ENCODING") + args + op


CASES = {
    # --- reference shapes
    "plain": lambda: plain(),
    "plain proto 2": lambda: plain(proto=2),
    "plain proto 5": lambda: plain(proto=5),
    "text GLOBAL opcodes": lambda: plain().replace(
        cls("TensorStorageMetadata"), b"c" + _MODULE["TensorStorageMetadata"].encode() + b"\nTensorStorageMetadata\n"
    ),
    "zero-dim tensor": lambda: _with_a(tensor([]), dct((index("a", []), info()))),
    "no chunks": lambda: _with_a(tensor([4, 2], chunks=[])),
    "many chunks": lambda: _with_a(
        tensor([4, 2], chunks=[chunk([r, 0], [1, 2]) for r in range(4)]),
        dct(*[(index("a", [r, 0]), info(offset=8 * r, length=8)) for r in range(4)]),
    ),
    "items of a key not in the entries": lambda: _with_a(tensor([4, 2]), dct((index("zz", [0]), info()))),
    "an item offsets None and an item offsets ()": lambda: _with_a(
        tensor([]), dct((index("a", []), info()), (index("a"), info(offset=7)))
    ),
    "index number": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0], i(3)), info()))),
    "largest offset and length": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), info(offset=1 << 48, length=1 << 48)))
    ),
    # --- duplicate keys, set again, last wins
    "duplicate entry keys": lambda: metadata(dct((s("a"), tensor([4, 2])), (s("a"), tensor([8]))), _STORAGE_A),
    "duplicate key, bytes then tensor": lambda: metadata(
        dct((s("a"), rec("BytesStorageMetadata")), (s("a"), tensor([4, 2]))), _STORAGE_A
    ),
    "same key in two encodings": lambda: metadata(
        dct(
            (s("a"), tensor([4, 2])),
            (b"X\x01\x00\x00\x00a", tensor([3])),
            (b"\x8d" + struct.pack("<Q", 1) + b"a", tensor([2])),
        ),
        _STORAGE_A,
    ),
    "entries key set again after the plans": lambda: metadata(
        _entries_memoized((s("a"), tensor([4, 2]))), _STORAGE_A, after=get(_MEMO_ENTRIES) + s("a") + tensor([9]) + b"s0"
    ),
    "a key added after the plans": lambda: metadata(
        _entries_memoized((s("a"), tensor([4, 2]))),
        _STORAGE_A,
        after=get(_MEMO_ENTRIES) + s("b") + rec("BytesStorageMetadata") + b"s0",
    ),
    "entries dict's SETITEMS of nothing": lambda: metadata(
        _entries_memoized((s("a"), tensor([4, 2]))), _STORAGE_A, after=get(_MEMO_ENTRIES) + b"(u0"
    ),
    "entries key NFC and NFD": lambda: metadata(
        dct((s("\u00e9"), tensor([4, 2])), (s("e\u0301"), tensor([3]))), dct((index("\u00e9", [0, 0]), info()))
    ),
    "keys a and a-NUL": lambda: metadata(dct((s("a"), tensor([4, 2])), (s("a\0"), tensor([3]))), _STORAGE_A),
    "a surrogate key": lambda: metadata(dct((s("\udc80"), tensor([4, 2]))), _STORAGE_A),
    "an overlong NUL key": lambda: metadata(dct((s(b"\xc0\x80"), tensor([4, 2]))), _STORAGE_A),
    "a key past U+10FFFF": lambda: metadata(dct((s(b"\xf4\x90\x80\x80"), tensor([4, 2]))), _STORAGE_A),
    "a key cut mid character": lambda: metadata(dct((s(b"a\xe2\x82"), tensor([4, 2]))), _STORAGE_A),
    "a 4-byte character key": lambda: metadata(
        dct((s("\U0001f600"), tensor([4, 2]))), dct((index("\U0001f600", [0, 0]), info()))
    ),
    "an int key": lambda: metadata(dct((i(1), tensor([4, 2]))), _STORAGE_A),
    "a tuple key": lambda: metadata(dct((tup(s("a")), tensor([4, 2]))), _STORAGE_A),
    "a None key in planner data": lambda: plain().replace(b"ub.", s("planner_data") + dct((N, i(1))) + b"ub."),
    # --- records: built twice, not built, built as another, shared
    "chunk built twice": lambda: _with_a(
        tensor([4, 2], chunks=[chunk([0, 0], [4, 2]) + dct((s("sizes"), size(2, 2))) + b"b"])
    ),
    "chunk built with None": lambda: _with_a(tensor([4, 2], chunks=[chunk([0, 0], [4, 2]) + N + b"b"])),
    "chunk built with an empty dict": lambda: _with_a(tensor([4, 2], chunks=[chunk([0, 0], [4, 2]) + b"}b"])),
    "chunk never built": lambda: _with_a(tensor([4, 2], chunks=[new("ChunkStorageMetadata")])),
    "chunk built with a tuple": lambda: _with_a(
        tensor([4, 2], chunks=[new("ChunkStorageMetadata") + tup(size(0, 0), size(4, 2)) + b"b"])
    ),
    "chunk with slot state": lambda: _with_a(
        tensor(
            [4, 2],
            chunks=[
                new("ChunkStorageMetadata") + tup(N, dct((s("offsets"), size(0, 0)), (s("sizes"), size(4, 2)))) + b"b"
            ],
        )
    ),
    "chunk with state and slot state": lambda: _with_a(
        tensor(
            [4, 2],
            chunks=[
                new("ChunkStorageMetadata") + tup(dct((s("offsets"), size(0, 0))), dct((s("sizes"), size(4, 2)))) + b"b"
            ],
        )
    ),
    "chunk changed after the plans": lambda: _with_a(
        tensor([4, 2], chunks=[_chunk_memo([0, 0], [4, 2], _MEMO_X)]),
        after=get(_MEMO_X) + dct((s("offsets"), size(1, 0))) + b"b0",
    ),
    "chunk changed to lie outside after the plans": lambda: _with_a(
        tensor([4, 2], chunks=[_chunk_memo([0, 0], [4, 2], _MEMO_X)]),
        after=get(_MEMO_X) + dct((s("sizes"), size(5, 2))) + b"b0",
    ),
    "a chunk list appended to after the plans": lambda: _with_a(
        rec(
            "TensorStorageMetadata",
            ("properties", props()),
            ("size", size(4, 2)),
            ("chunks", b"]" + put(_MEMO_X) + chunk([0, 0], [4, 2]) + b"a"),
        ),
        after=get(_MEMO_X) + chunk([0, 0], [2, 2]) + b"a0",
    ),
    "a chunk list holding itself": lambda: _with_a(
        rec(
            "TensorStorageMetadata",
            ("properties", props()),
            ("size", size(4, 2)),
            ("chunks", b"]" + put(_MEMO_X) + get(_MEMO_X) + b"a"),
        )
    ),
    "a chunk list shared by two tensors": lambda: metadata(
        dct(
            (
                s("a"),
                rec(
                    "TensorStorageMetadata",
                    ("properties", props()),
                    ("size", size(4, 2)),
                    ("chunks", lst(chunk([0, 0], [4, 2])) + put(_MEMO_X)),
                ),
            ),
            (
                s("b"),
                rec("TensorStorageMetadata", ("properties", props()), ("size", size(4, 2)), ("chunks", get(_MEMO_X))),
            ),
        ),
        _STORAGE_A,
    ),
    "one tensor record under two keys": lambda: metadata(
        dct((s("a"), tensor([4, 2]) + put(_MEMO_X)), (s("b"), get(_MEMO_X))), _STORAGE_A
    ),
    "a chunk in place of a tensor": lambda: _with_a(chunk([0, 0], [4, 2])),
    "a tensor in place of a chunk": lambda: _with_a(tensor([4, 2], chunks=[tensor([4, 2])])),
    "an index in place of an info": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), index("a", [0, 0])))),
    "an info in place of an index": lambda: _with_a(tensor([4, 2]), dct((info(), info()))),
    "a tensor as the root": lambda: b"\x80\x04" + tensor([4, 2]) + b".",
    "a dict as the root": lambda: (
        b"\x80\x04" + dct((s("state_dict_metadata"), _ENTRIES_A), (s("storage_data"), _STORAGE_A)) + b"."
    ),
    "Metadata built twice": lambda: plain()[:-1] + dct((s("state_dict_metadata"), dct((s("z"), tensor([3]))))) + b"b.",
    "Metadata built with a tuple": lambda: b"\x80\x04" + new("Metadata") + tup(_ENTRIES_A, _STORAGE_A) + b"b.",
    "Metadata never built": lambda: b"\x80\x04" + new("Metadata") + b".",
    "Metadata with version and planner data": lambda: plain().replace(
        b"ub.",
        s("version") + s("1.0.0") + s("planner_data") + dct((s("x"), lst(i(1), N))) + s("storage_meta") + N + b"ub.",
    ),
    "Metadata with an unknown field": lambda: plain().replace(b"ub.", s("other") + N + b"ub."),
    "Metadata with a __dict__ field": lambda: plain().replace(b"ub.", s("__dict__") + dct() + b"ub."),
    "Metadata with a __class__ field": lambda: plain().replace(
        b"ub.", s("__class__") + cls("TensorStorageMetadata") + b"ub."
    ),
    "a chunk with a __dict__ field": lambda: _with_a(
        tensor(
            [4, 2],
            chunks=[rec("ChunkStorageMetadata", ("offsets", size(0, 0)), ("sizes", size(4, 2)), ("__dict__", dct()))],
        )
    ),
    "a bytes entry with a field": lambda: metadata(
        dct((s("a"), rec("BytesStorageMetadata", ("size", size(1))))), _STORAGE_A
    ),
    "a bytes entry built with None": lambda: metadata(
        dct((s("a"), new("BytesStorageMetadata") + N + b"b")), _STORAGE_A
    ),
    "a bytes entry never built": lambda: metadata(dct((s("a"), new("BytesStorageMetadata"))), _STORAGE_A),
    "a record made by REDUCE": lambda: metadata(dct((s("a"), cls("BytesStorageMetadata") + b")R")), _STORAGE_A),
    "a record class given arguments": lambda: metadata(
        dct((s("a"), cls("BytesStorageMetadata") + tup(i(1)) + b"R")), _STORAGE_A
    ),
    "a record class as an entry": lambda: metadata(dct((s("a"), cls("BytesStorageMetadata"))), _STORAGE_A),
    "BUILD on a record class": lambda: metadata(dct((s("a"), cls("BytesStorageMetadata") + N + b"b")), _STORAGE_A),
    "BUILD on a dict": lambda: plain().replace(b"ub.", s("planner_data") + b"}Nb" + b"ub."),
    "BUILD on a dtype": lambda: plain().replace(b"ub.", s("planner_data") + dtype() + N + b"b" + b"ub."),
    "StorageMeta with anything": lambda: plain().replace(
        b"ub.", s("storage_meta") + rec("StorageMeta", ("x", i(1)), ("y", tup(i(1), s("z")))) + b"ub."
    ),
    # --- TensorProperties
    "properties as a dict": lambda: _with_a(tensor([4, 2], properties=props(dct((s("dtype"), dtype("float16")))))),
    "properties as a full dict": lambda: _with_a(
        tensor(
            [4, 2],
            properties=props(
                dct(
                    (s("dtype"), dtype("bfloat16")),
                    (s("layout"), glob("torch", "strided")),
                    (s("requires_grad"), FALSE),
                    (s("memory_format"), N),
                    (s("pin_memory"), FALSE),
                )
            ),
        )
    ),
    "properties as an empty dict": lambda: _with_a(tensor([4, 2], properties=props(b"}"))),
    "properties dict with another key": lambda: _with_a(
        tensor([4, 2], properties=props(dct((s("dtype"), dtype()), (s("other"), i(1)))))
    ),
    "properties dict with an int key": lambda: _with_a(
        tensor([4, 2], properties=props(dct((s("dtype"), dtype()), (i(1), i(1)))))
    ),
    "properties as 4 fields": lambda: _with_a(
        tensor([4, 2], properties=props(tup(dtype(), glob("torch", "strided"), FALSE, FALSE)))
    ),
    "properties as 6 fields": lambda: _with_a(tensor([4, 2], properties=props(tup(dtype(), N, N, N, N, N)))),
    "properties as a list": lambda: _with_a(tensor([4, 2], properties=props(lst(dtype(), N, N, N, N)))),
    "properties as None": lambda: _with_a(tensor([4, 2], properties=props(N))),
    "properties never built": lambda: _with_a(tensor([4, 2], properties=new("TensorProperties"))),
    "properties built twice": lambda: _with_a(
        tensor([4, 2], properties=props() + dct((s("dtype"), dtype("int8"))) + b"b")
    ),
    "properties dict changed after": lambda: _with_a(
        tensor([4, 2], properties=new("TensorProperties") + b"}" + put(_MEMO_X) + b"(" + s("dtype") + dtype() + b"ub"),
        after=get(_MEMO_X) + s("dtype") + dtype("float64") + b"s0",
    ),
    "properties with slot state": lambda: _with_a(tensor([4, 2], properties=props(tup(N, dct((s("dtype"), dtype())))))),
    "properties dtype a layout": lambda: _with_a(
        tensor([4, 2], properties=props(props_state(glob("torch", "strided"))))
    ),
    "properties dtype a memory format": lambda: _with_a(
        tensor([4, 2], properties=props(props_state(glob("torch", "channels_last"))))
    ),
    "properties dtype a name": lambda: _with_a(tensor([4, 2], properties=props(props_state(s("float32"))))),
    "properties dtype torch.Size": lambda: _with_a(
        tensor([4, 2], properties=props(props_state(glob("torch", "Size"))))
    ),
    "properties dtype an alias": lambda: _with_a(tensor([4, 2], properties=props(props_state(dtype("half"))))),
    "properties dtype by _get_layout": lambda: _with_a(
        tensor(
            [4, 2],
            properties=props(props_state(glob("torch.serialization", "_get_layout") + tup(s("torch.strided")) + b"R")),
        )
    ),
    "_get_layout of an unknown layout": lambda: _with_a(
        tensor(
            [4, 2],
            properties=props(
                tup(dtype(), glob("torch.serialization", "_get_layout") + tup(s("torch.nope")) + b"R", N, N, N)
            ),
        )
    ),
    "_get_layout of a known layout": lambda: _with_a(
        tensor(
            [4, 2],
            properties=props(
                tup(dtype(), glob("torch.serialization", "_get_layout") + tup(s("torch.sparse_coo")) + b"R", N, N, N)
            ),
        )
    ),
    "a properties record in place of a tensor": lambda: _with_a(props()),
    "memory format enum of no arguments": lambda: _with_a(
        tensor([4, 2], properties=props(tup(dtype(), N, N, _mem_format(b")"), N)))
    ),
    "memory format enum of two arguments": lambda: _with_a(
        tensor([4, 2], properties=props(tup(dtype(), N, N, _mem_format(tup(i(1), s("x"))), N)))
    ),
    "memory format enum by NEWOBJ": lambda: _with_a(
        tensor([4, 2], properties=props(tup(dtype(), N, N, _mem_format(tup(i(1)), b"\x81"), N)))
    ),
    "memory format enum built": lambda: _with_a(
        tensor(
            [4, 2], properties=props(tup(dtype(), N, N, _mem_format(tup(i(1))) + dct((s("__args__"), i(2))) + b"b", N))
        )
    ),
    "memory format enum as an entry": lambda: metadata(dct((s("a"), _mem_format(tup(i(1))))), _STORAGE_A),
    # --- torch.Size
    "size of floats": lambda: _with_a(_sized_tensor(tup(tup(b"G" + struct.pack(">d", 4.0), i(2))))),
    "size of bools": lambda: _with_a(_sized_tensor(tup(tup(TRUE, i(2))))),
    "size of a string": lambda: _with_a(_sized_tensor(tup(tup(s("4"))))),
    "size of a list": lambda: _with_a(
        rec(
            "TensorStorageMetadata",
            ("properties", props()),
            ("size", glob("torch", "Size") + tup(lst(i(4), i(2))) + b"R"),
            ("chunks", b"]"),
        )
    ),
    "size of two arguments": lambda: _with_a(_sized_tensor(tup(tup(i(4)), tup(i(2))))),
    "size of nothing": lambda: _with_a(
        rec("TensorStorageMetadata", ("properties", props()), ("size", glob("torch", "Size") + b")R"), ("chunks", b"]"))
    ),
    "size by NEWOBJ": lambda: _with_a(
        rec(
            "TensorStorageMetadata",
            ("properties", props()),
            ("size", glob("torch", "Size") + tup(tup(i(4), i(2))) + b"\x81"),
            ("chunks", b"]"),
        )
    ),
    "size negative": lambda: _with_a(tensor([4, 2], chunks=[]).replace(size(4, 2), size(-4, 2))),
    "size past the limit": lambda: _with_a(tensor([(1 << 48) + 1], chunks=[])),
    "size at the limit": lambda: _with_a(tensor([1 << 48], chunks=[])),
    "size of 64 dimensions": lambda: _with_a(tensor([1] * 64)),
    "size of 65 dimensions": lambda: _with_a(tensor([1] * 65)),
    "size a plain tuple": lambda: _with_a(
        rec("TensorStorageMetadata", ("properties", props()), ("size", tup(i(4), i(2))), ("chunks", b"]"))
    ),
    "size a list": lambda: _with_a(
        rec("TensorStorageMetadata", ("properties", props()), ("size", lst(i(4), i(2))), ("chunks", b"]"))
    ),
    "size of a huge int": lambda: _with_a(tensor([(1 << 62)], chunks=[])),
    "size of a 9-byte int": lambda: _with_a(_sized_tensor(tup(tup(b"\x8a\x09" + (4).to_bytes(9, "little"))))),
    "size of a LONG1 zero": lambda: _with_a(_sized_tensor(tup(tup(b"\x8a\x00")))),
    "size of a LONG1 negative zero width 8": lambda: _with_a(
        _sized_tensor(tup(tup(b"\x8a\x08" + b"\x00" * 7 + b"\x80")))
    ),
    "size of a BININT -1": lambda: _with_a(_sized_tensor(tup(tup(b"J\xff\xff\xff\xff")))),
    "chunk offsets a plain tuple": lambda: _with_a(
        tensor([4, 2], chunks=[rec("ChunkStorageMetadata", ("offsets", tup(i(0), i(0))), ("sizes", size(4, 2)))])
    ),
    "chunk of fewer dimensions": lambda: _with_a(tensor([4, 2], chunks=[chunk([0], [4])])),
    "chunk without sizes": lambda: _with_a(
        tensor([4, 2], chunks=[rec("ChunkStorageMetadata", ("offsets", size(0, 0)))])
    ),
    "chunk at the edge": lambda: _with_a(tensor([4, 2], chunks=[chunk([3, 1], [1, 1])])),
    "chunk one past the edge": lambda: _with_a(tensor([4, 2], chunks=[chunk([3, 1], [1, 2])])),
    "tensor without chunks": lambda: _with_a(
        rec("TensorStorageMetadata", ("properties", props()), ("size", size(4, 2)))
    ),
    "tensor with chunks a tuple": lambda: _with_a(
        rec(
            "TensorStorageMetadata",
            ("properties", props()),
            ("size", size(4, 2)),
            ("chunks", tup(chunk([0, 0], [4, 2]))),
        )
    ),
    "tensor with an extra field": lambda: _with_a(
        rec("TensorStorageMetadata", ("properties", props()), ("size", size(4, 2)), ("chunks", b"]"), ("x", N))
    ),
    # --- storage_data
    "storage keyed by a string": lambda: _with_a(tensor([4, 2]), dct((s("a"), info()))),
    "storage keyed by a tuple": lambda: _with_a(tensor([4, 2]), dct((tup(s("a"), size(0, 0)), info()))),
    "storage keyed by a planner object": lambda: _with_a(
        tensor([4, 2]), dct((glob(_DCP + "planner", "WriteItem") + b")\x81", info()))
    ),
    "one index record as two keys": lambda: _with_a(
        tensor([4, 2]), dct((_index_memo(_MEMO_X), info(offset=1)), (get(_MEMO_X), info(offset=2)))
    ),
    "two index records, equal fields": lambda: _with_a(
        tensor([4, 2]),
        dct(
            (index("a", [0, 0]), info(offset=1)), (index("blob"), info(offset=5)), (index("a", [0, 0]), info(offset=2))
        ),
    ),
    "index fqn changed after it was a key": lambda: _with_a(
        tensor([4, 2]),
        dct((_index_memo(_MEMO_X, "b"), info(offset=1)), (index("a", [0, 0]), info(offset=2))),
        after=get(_MEMO_X) + dct((s("fqn"), s("a"))) + b"b0",
    ),
    "index offsets changed after it was a key": lambda: _with_a(
        tensor([4, 2]),
        dct((_index_memo(_MEMO_X, "a", (0, 0)), info(offset=1)), (index("a", [1, 0]), info(offset=2))),
        after=get(_MEMO_X) + dct((s("offset"), size(1, 0))) + b"b0",
    ),
    "index built after it was a key": lambda: _with_a(
        tensor([4, 2]),
        dct((new("MetadataIndex") + put(_MEMO_X), info())),
        after=get(_MEMO_X) + dct((s("fqn"), s("a")), (s("offset"), size(0, 0))) + b"b0",
    ),
    "an item replaced after the plans": lambda: _with_a(
        tensor([4, 2]),
        b"}" + put(_MEMO_STORAGE) + b"(" + _index_memo(_MEMO_X) + info(offset=1) + index("b") + info(offset=9) + b"u",
        after=get(_MEMO_STORAGE) + get(_MEMO_X) + info(offset=3) + b"s0",
    ),
    "an info changed after the plans": lambda: _with_a(
        tensor([4, 2]),
        dct((index("a", [0, 0]), _info_memo(_MEMO_X))),
        after=get(_MEMO_X) + dct((s("relative_path"), s("g"))) + b"b0",
    ),
    "an info path changed to leave the directory after the plans": lambda: _with_a(
        tensor([4, 2]),
        dct((index("a", [0, 0]), _info_memo(_MEMO_X))),
        after=get(_MEMO_X) + dct((s("relative_path"), s("../f"))) + b"b0",
    ),
    "an info's state dict changed after its BUILD": lambda: _with_a(
        tensor([4, 2]),
        dct(
            (
                index("a", [0, 0]),
                new("_StorageInfo")
                + b"}"
                + put(_MEMO_X)
                + b"("
                + s("relative_path")
                + s("f")
                + s("offset")
                + i(1)
                + s("length")
                + i(2)
                + b"ub",
            )
        ),
        after=get(_MEMO_X) + s("offset") + i(77) + b"s0",
    ),
    "one state dict for two infos": lambda: _with_a(
        tensor([4, 2], chunks=[chunk([0, 0], [2, 2]), chunk([2, 0], [2, 2])]),
        dct(
            (
                index("a", [0, 0]),
                new("_StorageInfo") + _INFO_STATE + put(_MEMO_X) + b"b",
            ),
            (index("a", [2, 0]), new("_StorageInfo") + get(_MEMO_X) + b"b"),
        ),
    ),
    "one state dict for two infos, one built again": lambda: _with_a(
        tensor([4, 2], chunks=[chunk([0, 0], [2, 2]), chunk([2, 0], [2, 2])]),
        dct(
            (
                index("a", [0, 0]),
                new("_StorageInfo") + _INFO_STATE + put(_MEMO_X) + b"b" + dct((s("offset"), i(5))) + b"b",
            ),
            (index("a", [2, 0]), new("_StorageInfo") + get(_MEMO_X) + b"b"),
        ),
    ),
    "a state dict BUILT into the record while being filled": lambda: _with_a(
        tensor([4, 2]),
        dct(
            (
                index("a", [0, 0]),
                new("_StorageInfo")
                + put(_MEMO_X)
                + b"}"
                + put(_MEMO_A)
                + b"("
                + s("relative_path")
                + s("f")
                + get(_MEMO_X)
                + get(_MEMO_A)
                + b"b0"
                + s("offset")
                + i(1)
                + s("length")
                + i(2)
                + b"u0"
                + get(_MEMO_X),
            )
        ),
    ),
    "a record's own state dict holding it": lambda: _with_a(
        tensor([4, 2]),
        dct(
            (
                index("a", [0, 0]),
                new("_StorageInfo")
                + put(_MEMO_X)
                + dct(
                    (s("relative_path"), s("f")),
                    (s("offset"), i(1)),
                    (s("length"), i(2)),
                    (s("transform_descriptors"), get(_MEMO_X)),
                )
                + b"b",
            )
        ),
    ),
    "entries dict holding itself": lambda: metadata(
        b"}" + put(_MEMO_ENTRIES) + b"(" + s("a") + tensor([4, 2]) + s("me") + get(_MEMO_ENTRIES) + b"u", _STORAGE_A
    ),
    "Metadata holding itself": lambda: _metadata_memo(
        s("state_dict_metadata") + _ENTRIES_A + s("storage_data") + _STORAGE_A + s("planner_data") + get(_MEMO_X)
    ),
    "transforms list of names": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), info(transform_descriptors=lst(s("zstd")))))
    ),
    "transforms empty list": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), info(transform_descriptors=b"]")))
    ),
    "transforms empty tuple": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), info(transform_descriptors=b")")))
    ),
    "transforms None": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(transform_descriptors=N)))),
    "transforms empty string": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), info(transform_descriptors=s(""))))
    ),
    "transforms zero": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(transform_descriptors=i(0))))),
    "transforms False": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(transform_descriptors=FALSE)))),
    "transforms empty dict": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), info(transform_descriptors=b"}")))
    ),
    "transforms a string": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), info(transform_descriptors=s("zstd"))))
    ),
    "transforms list appended after": lambda: _with_a(
        tensor([4, 2]),
        dct((index("a", [0, 0]), info(transform_descriptors=b"]" + put(_MEMO_X)))),
        after=get(_MEMO_X) + s("zstd") + b"a0",
    ),
    "index number True": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0], TRUE), info()))),
    "index number -1": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0], i(-1)), info()))),
    "index number past the limit": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0], i((1 << 48) + 1)), info()))),
    "index offsets a tuple": lambda: _with_a(
        tensor([4, 2]), dct((rec("MetadataIndex", ("fqn", s("a")), ("offset", tup(i(0), i(0)))), info()))
    ),
    "index without offsets": lambda: _with_a(tensor([4, 2]), dct((rec("MetadataIndex", ("fqn", s("a"))), info()))),
    "index without fqn": lambda: _with_a(tensor([4, 2]), dct((rec("MetadataIndex", ("offset", size(0, 0))), info()))),
    "index fqn an int": lambda: _with_a(tensor([4, 2]), dct((index(i(1), [0, 0]), info()))),
    "index with an extra field": lambda: _with_a(
        tensor([4, 2]), dct((rec("MetadataIndex", ("fqn", s("a")), ("x", N)), info()))
    ),
    "info offset negative": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(offset=-1)))),
    "info offset True": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(offset=TRUE)))),
    "info offset past the limit": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), info(offset=(1 << 48) + 1)))
    ),
    "info offset 2^63-1": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(offset=(1 << 63) - 1)))),
    "info offset -2^63": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(offset=-(1 << 63))))),
    "info length a float": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), info(length=b"G" + struct.pack(">d", 32.0))))
    ),
    "info without length": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), rec("_StorageInfo", ("relative_path", s("f")), ("offset", i(0)))))
    ),
    "info path with a slash": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(path="d/f")))),
    "info path ..": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(path="..")))),
    "info path .": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(path=".")))),
    "info path empty": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(path="")))),
    "info path with NUL": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(path="f\0")))),
    "info path with a backslash": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(path="a\\b")))),
    "info path None": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(path=N)))),
    "info path of another key bad": lambda: _with_a(
        tensor([4, 2]), dct((index("a", [0, 0]), info()), (index("zz"), info(path="../x")))
    ),
    "info path a surrogate": lambda: _with_a(tensor([4, 2]), dct((index("a", [0, 0]), info(path="\udcff")))),
    "storage an OrderedDict": lambda: _with_a(
        tensor([4, 2]), glob("collections", "OrderedDict") + b")R" + b"(" + index("a", [0, 0]) + info() + b"u"
    ),
    "storage a list": lambda: _with_a(tensor([4, 2]), lst(index("a", [0, 0]), info())),
    # --- the machine: marks, memo, stack
    "MEMOIZE after a BINPUT far away": lambda: plain().replace(
        b"ub.", s("planner_data") + N + put(7) + N + b"\x94" + b"0" + get(1) + b"ub."
    ),
    "a GET of an index never stored": lambda: plain().replace(b"ub.", s("planner_data") + get(9) + b"ub."),
    "LONG_BINPUT at 2^32-1": lambda: plain().replace(b"ub.", s("planner_data") + N + put((1 << 32) - 1) + b"ub."),
    "LONG_BINPUT past the memo": lambda: plain().replace(b"ub.", s("planner_data") + N + put(70000) + b"ub."),
    "a memo slot stored twice": lambda: plain().replace(
        b"ub.", s("planner_data") + N + put(5) + b"0" + i(3) + put(5) + b"\x94" + b"ub."
    ),
    "POP of a mark": lambda: plain().replace(b"ub.", s("planner_data") + N + b"(0" + b"ub."),
    "POP_MARK": lambda: plain().replace(b"ub.", s("planner_data") + N + b"(" + i(1) + i(2) + b"1" + b"ub."),
    "DUP chain": lambda: plain().replace(b"ub.", s("planner_data") + N + b"2" * 100 + b"0" * 100 + b"ub."),
    "a MARK left open": lambda: plain()[:-1] + b"(.",
    "a MARK left open under the root": lambda: b"(" + plain()[2:],
    "SETITEMS of an odd count": lambda: plain().replace(b"ub.", s("planner_data") + b"}(" + i(1) + b"u" + b"ub."),
    "SETITEM on a list": lambda: plain().replace(b"ub.", s("planner_data") + b"]" + s("k") + i(1) + b"s" + b"ub."),
    "APPEND on a dict": lambda: plain().replace(b"ub.", s("planner_data") + b"}" + i(1) + b"a" + b"ub."),
    "APPENDS of nothing": lambda: plain().replace(b"ub.", s("planner_data") + b"](e" + b"ub."),
    "SETITEMS below a mark": lambda: plain().replace(
        b"ub.", s("planner_data") + b"}(" + s("k") + b"(" + i(1) + b"u" + b"ub."
    ),
    "TUPLE3 across a mark": lambda: plain().replace(
        b"ub.", s("planner_data") + i(1) + b"(" + i(2) + i(3) + b"\x87" + b"ub."
    ),
    "PROTO in the middle": lambda: plain().replace(b"ub.", s("planner_data") + b"\x80\x02N" + b"ub."),
    "PROTO 6": lambda: plain().replace(b"ub.", s("planner_data") + b"\x80\x06N" + b"ub."),
    "STOP with more after": lambda: plain() + b"garbage",
    "no STOP": lambda: plain()[:-1],
    "STOP on an empty stack": lambda: b"\x80\x04.",
    "a float and bytes in planner data": lambda: plain().replace(
        b"ub.", s("planner_data") + tup(b"G" + b"\0" * 8, b"C\x01x") + b"ub."
    ),
    "BINUNICODE8": lambda: plain().replace(s("a"), b"\x8d" + struct.pack("<Q", 1) + b"a"),
    "a FRAME covering all": lambda: b"\x80\x04\x95" + struct.pack("<Q", len(plain()) - 2) + plain()[2:],
    "a FRAME past the end": lambda: b"\x80\x04\x95" + struct.pack("<Q", len(plain())) + plain()[2:],
    "a FRAME of 2^64-1": lambda: b"\x80\x04\x95" + b"\xff" * 8 + plain()[2:],
    "large entries, keys set again in other encodings": lambda: metadata(
        b"}" + put(_MEMO_ENTRIES) + b"(" + b"".join(s(f"k{n}") + tensor([n + 1]) for n in range(12)) + b"u",
        _STORAGE_A,
        after=get(_MEMO_ENTRIES)
        + b"("
        + b"".join(b"X" + struct.pack("<I", len(f"k{n}")) + f"k{n}".encode() + tensor([n + 2]) for n in range(0, 12, 3))
        + b"u0",
    ),
    "large entries grown one key at a time": lambda: metadata(
        b"}" + put(_MEMO_ENTRIES),
        _STORAGE_A,
        after=b"".join(get(_MEMO_ENTRIES) + s(f"k{n % 40}") + tensor([n + 1]) + b"s0" for n in range(100)),
    ),
    "large storage, an index set again": lambda: _with_a(
        tensor([40, 2], chunks=[chunk([r, 0], [1, 2]) for r in range(40)]),
        b"}"
        + put(_MEMO_STORAGE)
        + b"("
        + b"".join(
            (_index_memo(_MEMO_X, "a", (r, 0)) if r == 7 else index("a", [r, 0])) + info(offset=r) for r in range(40)
        )
        + b"u",
        after=get(_MEMO_STORAGE) + get(_MEMO_X) + info(offset=99) + b"s0",
    ),
    "a record built with a large dict, then built again": lambda: plain().replace(
        b"ub.",
        s("storage_meta")
        + new("StorageMeta")
        + dct(*[(s(f"f{n}"), i(n)) for n in range(20)])
        + b"b"
        + dct(*[(s(f"f{n}"), i(n + 1)) for n in range(10, 30)])
        + b"b"
        + b"ub.",
    ),
    "Metadata built from inside its own state": lambda: _metadata_memo(
        s("state_dict_metadata")
        + get(_MEMO_X)
        + dct((s("state_dict_metadata"), dct((s("z"), tensor([3])))), (s("storage_data"), b"}"))
        + b"b0"
        + _ENTRIES_A
        + s("storage_data")
        + _STORAGE_A
    ),
    "Metadata built from inside, its later field kept": lambda: _metadata_memo(
        s("state_dict_metadata")
        + _ENTRIES_A
        + s("storage_data")
        + _STORAGE_A
        + get(_MEMO_X)
        + dct((s("planner_data"), N), (s("storage_data"), dct((index("a", [0, 0]), info(offset=5)))))
        + b"b0"
    ),
    "planner objects built, called, appended": lambda: plain().replace(
        b"ub.",
        s("all_local_plans")
        + lst(
            glob(_DCP + "planner", "SavePlan")
            + tup(
                lst(
                    glob(_DCP + "planner", "WriteItem")
                    + tup(i(1), s("x"))
                    + b"\x81"
                    + dct((s("index"), index("a")))
                    + b"b"
                )
            )
            + b"R"
            + tup(N, dct((s("x"), i(1))))
            + b"b"
        )
        + b"ub.",
    ),
    "a planner object as an entry": lambda: metadata(
        dct((s("a"), glob(_DCP + "planner", "WriteItem") + b")\x81")), _STORAGE_A
    ),
    "a refused global": lambda: plain().replace(b"ub.", s("planner_data") + glob("builtins", "eval") + b"ub."),
    "a global with a dotted name": lambda: plain().replace(
        b"ub.", s("planner_data") + glob("torch", "Size.__new__") + b"ub."
    ),
    "STACK_GLOBAL of non-strings": lambda: plain().replace(
        b"ub.", s("planner_data") + i(1) + s("Size") + b"\x93" + b"ub."
    ),
}


@needs_c
@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_metadata_is_read_as_the_python_path_reads_it_or_declined(case):
    compare(CASES[case]())


@needs_c
def test_what_the_c_reader_reads_of_the_crafted_cases():
    """The cases torch's own layouts give (and a few unusual valid ones) are read by the C reader, not declined: the
    comparisons above compare facts there, not only refusals."""
    read = {name for name, make in CASES.items() if compare(make()) == "read"}
    expected = {
        "plain",
        "plain proto 2",
        "plain proto 5",
        "text GLOBAL opcodes",
        "zero-dim tensor",
        "no chunks",
        "many chunks",
        "items of a key not in the entries",
        "an item offsets None and an item offsets ()",
        "duplicate entry keys",
        "duplicate key, bytes then tensor",
        "same key in two encodings",
        "entries key set again after the plans",
        "a key added after the plans",
        "chunk built twice",
        "index fqn changed after it was a key",
        "index built after it was a key",
        "an item replaced after the plans",
        "an info changed after the plans",
        "one state dict for two infos",
        "one state dict for two infos, one built again",
        "properties as a dict",
        "properties dict changed after",
        "one index record as two keys",
        "two index records, equal fields",
        "large entries, keys set again in other encodings",
        "large entries grown one key at a time",
        "large storage, an index set again",
        "Metadata built from inside its own state",
        "Metadata built from inside, its later field kept",
    }
    assert expected <= read, sorted(expected - read)


# ------------------------------------------------------------------------------------------------ mutations
def _seeds() -> list[bytes]:
    """Small pickles: the crafted ones the C reader reads, and torch's own .metadata, unframed (mutations inside a
    frame are FRAME lies, tested on their own below)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    shape = torch.Size([4, 2])
    torch_written = Metadata(
        state_dict_metadata={
            "a": TensorStorageMetadata(
                TensorProperties(dtype=torch.bfloat16), shape, [ChunkStorageMetadata(torch.Size([0, 0]), shape)]
            )
        },
        storage_data={MetadataIndex("a", torch.Size([0, 0])): _StorageInfo("__0_0.distcp", 0, 16)},
    )
    seeds = [_unframed(pickle.dumps(torch_written, protocol=p)) for p in (2, 4, 5)]
    return seeds + [_memoized(_unframed(CASES[name]())) for name in sorted(CASES) if compare(CASES[name]()) == "read"]


_MADE = {
    "NEWOBJ",
    "REDUCE",
    "EMPTY_DICT",
    "EMPTY_LIST",
    "TUPLE1",
    "TUPLE2",
    "TUPLE",
    "SHORT_BINUNICODE",
    "STACK_GLOBAL",
}


def _memoized(data: bytes) -> bytes:
    """Each object the pickle makes memoized (MEMOIZE after it), as pickle.dumps does: for memo references."""
    ops = list(pickletools.genops(data))
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    return b"".join(data[pos:end] + (b"\x94" if op.name in _MADE else b"") for (op, _, pos), end in zip(ops, ends))


def _unframed(data: bytes) -> bytes:
    ops = list(pickletools.genops(data))
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    return b"".join(data[pos:end] for (op, _, pos), end in zip(ops, ends) if op.name != "FRAME")


_GADGETS = [
    b"2",
    b"0",
    b"(",
    b"1",
    b"N",
    b"b",
    b"s",
    b"u",
    b"a",
    b"e",
    b"t",
    b"R",
    b"\x81",
    b"\x85",
    b"\x86",
    b"\x87",
    b"\x94",
    b"}",
    b"]",
    b")",
    b"Nb",
    b"}b",
    b"\x88",
    b"J\xff\xff\xff\xff",
    b"\x8a\x08" + b"\xff" * 7 + b"\x7f",
    s("offset"),
    s("fqn"),
    s("sizes"),
    s("dtype"),
    s("a"),
    s("\udcff"),
    size(1, 0),
    size(),
    dtype("float16"),
    new("ChunkStorageMetadata"),
    new("MetadataIndex"),
]


_KEYS = [s(k) for k in ("offset", "offsets", "sizes", "fqn", "dtype", "relative_path", "length", "index", "a", "x")]
_VALUES = [
    N,
    i(0),
    i(1),
    i(7),
    i(-1),
    s("a"),
    s("f"),
    size(0, 0),
    size(1, 0),
    size(2, 2),
    size(),
    dtype("float16"),
    b"]",
    b"}",
]


def _memo_ref(rng: random.Random, memo: list[int]) -> bytes:
    return get(rng.choice(memo)) if rng.random() < 0.7 else put(rng.choice(memo + [len(memo), 255]))


def _balanced(rng: random.Random, memo: list[int]) -> bytes:
    """Opcodes that leave the stack as it was: a memoized object changed after the fact (BUILD, SETITEM, APPEND on
    it), or a value pushed and popped."""
    target = get(rng.choice(memo))
    key, value, other = rng.choice(_KEYS), rng.choice(_VALUES + [get(rng.choice(memo))]), rng.choice(_VALUES)
    return rng.choice(
        [
            target + b"}(" + key + value + b"ub0",
            target + key + value + b"s0",
            target + b"(" + key + value + rng.choice(_KEYS) + other + b"u0",
            target + value + b"a0",
            target + b"Nb0",
            target + dct((key, value)) + b"b0",
            target + b"0",
            value + b"0",
            target + put(rng.choice(memo)) + b"0",
        ]
    )


def _mutate(rng: random.Random, data: bytes) -> bytes:
    if len(data) < 4:
        return data + b"."
    kind = rng.choice([0, 1, 2, 3, 3, 4, 4, 5, 5, 6, 7, 7, 8])
    if kind == 0:  # byte changes
        mutated = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 3])):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        return bytes(mutated)
    if kind == 1:
        return data[: rng.randrange(1, len(data))]
    if kind == 2:  # a range repeated elsewhere
        at, src = rng.randrange(len(data)), rng.randrange(len(data))
        return data[:at] + data[src : src + rng.randrange(1, 48)] + data[at:]
    try:
        ops = list(pickletools.genops(data))
    except Exception:
        return data[: rng.randrange(1, len(data))]
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    n = rng.randrange(len(ops))
    memo: list[int] = []  # the memo indices stored before opcode n (MEMOIZE: at the count of those stored)
    for op, arg, _ in ops[:n]:
        if op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo.append(arg if op.name != "MEMOIZE" else len(set(memo)))
    memo = memo or [0]
    start, end = ops[n][2], ends[n]
    if kind <= 6:  # opcodes inserted: memo references (GET, PUT), stack and container opcodes, values
        inserted = b"".join(
            _balanced(rng, memo)
            if rng.random() < 0.5
            else _memo_ref(rng, memo)
            if rng.random() < 0.4
            else rng.choice(_GADGETS)
            for _ in range(rng.choice([1, 1, 2, 3, 5]))
        )
        return data[:start] + inserted + data[start:]
    if kind == 7:  # an opcode deleted or repeated
        return data[:start] + data[end:] if rng.random() < 0.5 else data[:end] + data[start:end] + data[end:]
    m = rng.randrange(len(ops))  # an opcode replaced by another of the pickle
    return data[:start] + data[ops[m][2] : ends[m]] + data[end:]


@needs_c
def test_mutated_pickles_are_read_as_the_python_path_reads_them_or_declined():
    """Deterministic mutations of the seeds (about 3,000 pickles): no crash, no fact other than the Python path's.
    Pickles the C reader read are added to the seeds, so mutations go deeper."""
    rng = random.Random(20261207)
    seeds = _seeds()
    outcomes = {"refused": 0, "declined": 0, "read": 0}
    for _ in range(3000):
        data = rng.choice(seeds)
        for _ in range(rng.choice([1, 1, 2, 3])):
            data = _mutate(rng, data)
        if b"\x95" in data:  # possibly a FRAME: see test_a_frame_lie_reads_as_torch_reads_it
            continue
        outcome = compare(data)
        outcomes[outcome] += 1
        if outcome == "read" and len(seeds) < 300:
            seeds.append(data)
    assert outcomes["read"] >= 150 and outcomes["declined"] >= 150, outcomes


# ------------------------------------------------------------------------------------------------ bugs found
def _frame_lie() -> tuple[bytes, int, int]:
    """A FRAME that ends 3 bytes into a BININT (the stored item's offset): read contiguously (pickle.loads, and
    pickle.load of a file, as torch reads `.metadata`) the offset is 16 and `N0` follows; read from io.BytesIO (no
    peek: CPython's unpickler reads what an opcode lacks past the frame and drops the rest of the frame) it is
    0x304e0000. Returns the pickle and the two offsets."""
    stored = new("_StorageInfo") + dct(
        (s("relative_path"), s("f.distcp")), (s("offset"), b"J\x10\x00\x00\x00N0"), (s("length"), i(32))
    )
    body = _with_a(tensor([4, 2]), b"}(" + index("a", [0, 0]) + stored + b"bu")
    cut = body.index(b"J\x10\x00\x00\x00N0") + 3
    return b"\x80\x04\x95" + struct.pack("<Q", cut - 2) + body[2:], 16, 0x304E0000


def _stored_offset(data: bytes, c: bool):
    """What parse_metadata reads as a's stored item offset with the C reader on or forced off (or its refusal)."""
    reader = dcp_metadata._reader
    try:
        if not c:
            dcp_metadata._reader = lambda: None
        return dcp_metadata.parse_metadata(data).items[("a", (0, 0))].offset
    except Exception as exc:
        return type(exc).__name__
    finally:
        dcp_metadata._reader = reader


@needs_c
def test_a_frame_lie_the_two_unpicklers_read_differently():
    """The premise of the FRAME tests below: torch's own reading and the Python path's io.BytesIO read differ."""
    data, contiguous, dropped = _frame_lie()
    assert pickle.loads(data).storage_data.popitem()[1].offset == contiguous
    with io.BufferedReader(io.BytesIO(data)) as file:  # a file as torch opens it (has peek)
        assert pickle.load(file).storage_data.popitem()[1].offset == contiguous
    assert pickle.load(io.BytesIO(data)).storage_data.popitem()[1].offset == dropped


@needs_c
def test_a_frame_lie_reads_the_same_with_the_c_reader_on_and_off():
    data, _, _ = _frame_lie()
    assert _stored_offset(data, c=True) == _stored_offset(data, c=False) == "MetadataError"  # check_pickle refuses


@needs_c
def test_a_frame_lie_is_declined_or_read_as_the_python_path_reads_it():
    data, _, _ = _frame_lie()
    assert compare(data) == "refused"


def _shared_chunks(chunks: int, entries: int, ndim: int = 64) -> bytes:
    """`entries` keys all of one tensor record, whose chunk list holds one chunk record `chunks` times (a memo
    reference each: 2 bytes): a few hundred KB."""
    shape = [1] * ndim
    listed = b"](" + _chunk_memo([0] * ndim, shape, 250) + get(250) * (chunks - 1) + b"e"
    entry = rec("TensorStorageMetadata", ("properties", props()), ("size", size(*shape)), ("chunks", listed)) + put(251)
    keys = b"".join(s(f"k{n}") + get(251) for n in range(entries - 1))
    return metadata(b"}(" + s("a") + entry + keys + b"u", dct((index("a", [0] * ndim), info())))


def _peak_growth_mb(parse) -> int | None:
    """Peak RSS growth (MB) while `parse()` runs: the peak reset through /proc/self/clear_refs (Linux), then read
    (VmHWM); None where that is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _vm("VmRSS")
        parse()
        return (_vm("VmHWM") - before) // 1024
    except OSError:
        return None


def _vm(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


@needs_c
def test_a_small_metadata_does_not_take_hundreds_of_megabytes_to_parse():
    data = _shared_chunks(20000, 8)
    assert len(data) < 50_000
    dcp_metadata._checked(data)
    python = _peak_growth_mb(lambda: dcp_metadata._parse(data))
    if python is None:
        pytest.skip("no /proc/self/clear_refs")
    assert python < 32
    c = _peak_growth_mb(lambda: dcp_metadata._read_compact(data))
    assert c < 64, f"{len(data)} bytes of .metadata: +{c} MB peak RSS with the C reader, +{python} MB without"
    assert "chunk and offset values" in C_READER.read(data, dcp_metadata._reader_tables()[0])  # declined, saying why


def _long_key_set_again(length: int, times: int, copy: bool = False) -> bytes:
    """A dict of more than 8 entries (hashed), then one long string memoized and set as a key `times` times (a
    2-byte memo reference, a value and SETITEM each); with `copy`, an equal string (another span of the file) set
    first, so that every set compares the two."""
    small = b"".join(s(f"x{n}") + N for n in range(9))
    first = s("k" * length) + N + b"s" if copy else b""
    planner = b"}(" + small + b"u" + first + s("k" * length) + put(250) + N + b"s" + (get(250) + N + b"s") * times
    return plain().replace(b"ub.", s("planner_data") + planner + b"ub.")


def _cpu_of_both(data: bytes) -> tuple[float, float]:
    """CPU seconds (process_time, not wall clock) the Python path and the C reader take to read `data`, asserting
    the C reader reads it (not declines) as the Python path does."""
    dcp_metadata._checked(data)
    tables, _ = dcp_metadata._reader_tables()
    start = time.process_time()
    python = _python(data)
    python_cpu = time.process_time() - start
    start = time.process_time()
    assert type(C_READER.read(data, tables)) is tuple  # read, not declined
    c_cpu = time.process_time() - start
    assert python[0] == [("a", (4, 2))]
    assert compare(data) == "read"
    return python_cpu, c_cpu


@needs_c
@pytest.mark.parametrize("copy", [False, True])
def test_a_long_key_used_many_times_takes_time_linear_in_the_file(copy):
    """A string longer than the C reader's SHORT_STR is hashed once and compared by its first equal span (before: its
    bytes hashed at every dict_set, 20,000 x 200 KB: seconds of CPU for a 280 KB file; the Python path caches a
    str's hash and reads it in ms). CPU time, with a 10x margin over the Python path (and 0.1 s at least)."""
    python_cpu, c_cpu = _cpu_of_both(_long_key_set_again(200_000, 20_000, copy))
    assert c_cpu < max(0.1, 10 * python_cpu), f"C reader {c_cpu:.3f} s of CPU, the Python path {python_cpu:.3f} s"


# ------------------------------------------------------------------------------------------------ generated
class _Generator:
    """Random metadata pickles, mostly of the right shape: objects memoized (BINPUT), fields sometimes given odd
    values, records sometimes shared (memo references to objects of earlier entries and items), and memoized objects
    changed after the fact (BUILD, SETITEM, APPEND) before the Metadata's state is set."""

    def __init__(self, rng: random.Random):
        self.rng, self.kinds, self.placed = rng, [], []
        self.odds = rng.choice([0, 0, 0.02, 0.05])  # how often a field is given an odd value

    def keep(self, data: bytes, kind: str) -> bytes:
        """`data` (one object pushed) memoized."""
        self.kinds.append(kind)
        return data + put(len(self.kinds) - 1)

    def place(self, data: bytes) -> bytes:
        """`data`: opcodes now in the pickle; the memo indices they store can be referred to after them."""
        self.placed += [arg for op, arg, _ in pickletools.genops(data + b".") if op.name == "BINPUT"]
        return data

    def ref(self, kind: str | None = None) -> bytes | None:
        found = [n for n in self.placed if kind is None or self.kinds[n] == kind]
        return get(self.rng.choice(found)) if found else None

    def maybe(self, good, kind: str) -> bytes:
        """`good()`, or (sometimes) a memoized object of the same kind, or an odd value."""
        r = self.rng.random()
        if r < 0.06 and (shared := self.ref(kind)) is not None:
            return shared
        if r > 1 - self.odds:
            return self.odd()
        return good()

    def odd(self) -> bytes:
        rng = self.rng
        options = [
            N,
            TRUE,
            i(rng.choice([0, 1, -1, 1 << 48, (1 << 48) + 1, 1 << 60])),
            s(rng.choice(["a", "b", "", "..", "x/y", "\udc80", "offsets"])),
            size(*[rng.randrange(5) for _ in range(rng.randrange(3))]),
            tup(i(1), i(2)),
            b"]",
            b"}",
            dtype(rng.choice(["float16", "int64"])),
            glob("torch", "strided"),
            new(rng.choice(list(_MODULE))),
        ]
        if (any_ref := self.ref()) is not None:
            options.append(any_ref)
        return rng.choice(options)

    def record(self, name: str, fields: list[tuple[str, bytes]]) -> bytes:
        """A record, its state a memoized dict (sometimes a field left out, or one it does not have, or no BUILD)."""
        rng = self.rng
        fields = [f for f in fields if rng.random() > self.odds]
        if rng.random() < self.odds:
            fields.append((rng.choice(["x", "fqn", "sizes", "__dict__"]), self.odd()))
        made = self.keep(new(name), name)
        if rng.random() < self.odds:
            return made
        return made + self.keep(dct(*[(s(k), v) for k, v in fields]), "dict") + b"b"

    def size(self, dims: list[int]) -> bytes:
        return self.maybe(lambda: self.keep(size(*dims), "size"), "size")

    def chunks(self, shape: list[int]) -> bytes:
        rng = self.rng
        listed = self.keep(b"]", "list")
        chunks = []
        for _ in range(rng.randrange(3)):
            offsets = [rng.randrange(d + 1) for d in shape]
            sizes = [rng.randrange(d - o + 1) + (rng.random() < self.odds) for d, o in zip(shape, offsets)]
            fields = [("offsets", self.size(offsets)), ("sizes", self.size(sizes))]
            chunks.append(
                self.maybe(functools.partial(self.record, "ChunkStorageMetadata", fields), "ChunkStorageMetadata")
            )
        return listed + (b"(" + b"".join(chunks) + b"e" if chunks else b"")

    def properties(self) -> bytes:
        rng = self.rng
        state = rng.choice([props_state(dtype(rng.choice(["float32", "bfloat16"]))), dct((s("dtype"), dtype()))])
        if rng.random() < self.odds:
            state = self.odd()
        return self.keep(new("TensorProperties"), "TensorProperties") + state + b"b"

    def tensor(self, shape: list[int]) -> bytes:
        fields = [
            ("properties", self.maybe(self.properties, "TensorProperties")),
            ("size", self.size(shape)),
            ("chunks", self.maybe(lambda: self.chunks(shape), "list")),
        ]
        return self.maybe(lambda: self.record("TensorStorageMetadata", fields), "TensorStorageMetadata")

    def item(self, key: str, shape: list[int]) -> bytes:
        rng = self.rng
        offsets = None if rng.random() < 0.2 else [rng.randrange(d + 1) for d in shape]
        index_fields = [
            ("fqn", self.maybe(lambda: s(key), "str")),
            ("offset", N if offsets is None else self.size(offsets)),
            ("index", self.maybe(lambda: N, "int")),
        ]
        index_ = self.place(self.maybe(lambda: self.record("MetadataIndex", index_fields), "MetadataIndex"))
        info_fields = [
            ("relative_path", self.maybe(lambda: s(rng.choice(["__0_0.distcp", "__1_0.distcp"])), "str")),
            ("offset", self.maybe(lambda: i(rng.randrange(1 << 20)), "int")),
            ("length", self.maybe(lambda: i(rng.randrange(1 << 20)), "int")),
        ]
        if rng.random() < 0.2:
            info_fields.append(("transform_descriptors", self.maybe(lambda: rng.choice([N, b"]", b")"]), "list")))
        return index_ + self.place(self.maybe(lambda: self.record("_StorageInfo", info_fields), "_StorageInfo"))

    def change(self) -> bytes:
        """A memoized object changed after the fact (the stack as it was after)."""
        rng = self.rng
        records = [n for n in self.placed if self.kinds[n] in _MODULE]
        n = rng.choice(records if records and rng.random() < 0.8 else self.placed)
        kind, target = self.kinds[n], get(n)
        if kind == "dict" or rng.random() < 0.1:
            key = rng.choice(["offset", "offsets", "sizes", "fqn", "dtype", "relative_path", "length", "a"])
            return target + s(key) + self.odd() + b"s0"
        if kind == "list":
            return target + self.odd() + b"a0"
        field = rng.choice(["offset", "offsets", "sizes", "fqn", "length", "index", "relative_path", "chunks"])
        value = rng.choice([self.odd(), i(rng.randrange(4)), size(rng.randrange(4), rng.randrange(4)), s("b")])
        return target + dct((s(field), value)) + b"b0"

    def metadata(self) -> bytes:
        rng = self.rng
        shapes = {key: [rng.randrange(1, 5) for _ in range(rng.randrange(3))] for key in rng.sample("abcd", 3)}
        entries = b""
        for key, shape in shapes.items():
            entry = self.record("BytesStorageMetadata", []) if rng.random() < 0.2 else self.tensor(shape)
            entries += self.place(s(key) + entry)
            if rng.random() < 0.05:
                entries += s(key) + (self.ref() or N)  # a key set again
        storage = b"".join(self.item(key, shape) for key, shape in shapes.items() for _ in range(rng.randrange(1, 3)))
        entries = self.place(self.keep(b"}", "dict")) + b"(" + entries + b"u"
        storage = self.place(self.keep(b"}", "dict")) + b"(" + storage + b"u"
        changes = b"".join(self.change() for _ in range(rng.choice([0, 0, 1, 2, 4])))
        return metadata(entries, storage, after=changes)


@needs_c
def test_generated_pickles_are_read_as_the_python_path_reads_them_or_declined():
    rng = random.Random(7)
    outcomes = {"refused": 0, "declined": 0, "read": 0}
    for _ in range(1500):
        outcomes[compare(_Generator(rng).metadata())] += 1
    assert outcomes["read"] >= 150 and outcomes["declined"] >= 150, outcomes


def _long_fqn_many_items(length: int, items: int) -> bytes:
    """`items` stored items, each its own MetadataIndex record (NEWOBJ, BUILD) of one memoized state dict whose fqn
    is one long string: ~9 bytes per item."""
    state = dct((s("fqn"), s("k" * length)), (s("offset"), N)) + put(240)
    first = cls("MetadataIndex") + put(241) + b")\x81" + state + b"b" + info() + put(242)
    more = (get(241) + b")\x81" + get(240) + b"b" + get(242)) * (items - 1)
    return _with_a(tensor([4, 2]), b"}(" + first + more + b"u")


@needs_c
def test_stored_items_sharing_a_long_key_take_time_linear_in_the_file():
    """extract's maps of fqns and paths hash a long string once (before: every stored item's fqn bytes, 20,000 x
    200 KB: seconds of CPU; the Python path groups them in ms). CPU time, 10x margin over the Python path."""
    python_cpu, c_cpu = _cpu_of_both(_long_fqn_many_items(200_000, 20_000))
    assert c_cpu < max(0.1, 10 * python_cpu), f"C reader {c_cpu:.3f} s of CPU, the Python path {python_cpu:.3f} s"
