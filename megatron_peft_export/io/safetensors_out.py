"""Writing a safetensors file by offset: the header computed from names, dtypes and shapes alone, each tensor's bytes
written at its offset straight from its memory.

The file is byte-identical to ``safetensors.torch.save_file`` of the same tensors and metadata (tests compare them):
tensors in safetensors' order (by dtype, as its Rust enum ranks them, the widest first, then by name), the JSON
header without spaces and padded with spaces to a multiple of 8 bytes. Unlike save_file, nothing is serialized into
a second buffer: `allocate` gives empty tensors that are views of one flat buffer laid out as the payload, so filling
them fills the payload and the write is one system call; tensors from anywhere else are written with vectored writes
of many tensors each. File names are the caller's: this module takes a path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from itertools import accumulate, chain, groupby, islice, repeat
from json.encoder import encode_basestring
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..core.plan import AdapterPlan

DTYPE_NAMES = {
    torch.int64: "I64",
    torch.float64: "F64",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""The dtypes written, in safetensors' payload order (its Rust enum, highest first)."""
_RANK = {dtype: n for n, dtype in enumerate(DTYPE_NAMES)}
_IOV_MAX = 1024
"""Buffers per vectored write (Linux's IOV_MAX)."""


def _groups(entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[tuple[torch.dtype, list[str]]]:
    """The keys in payload order, by dtype: dtypes in `DTYPE_NAMES` order, names sorted within each."""
    dtypes = set(map(itemgetter(0), entries.values()))
    unknown = sorted(str(dtype) for dtype in dtypes if dtype not in _RANK)
    if unknown:
        raise ValueError(f"safetensors cannot hold {', '.join(unknown[:3])}; expected one of {list(DTYPE_NAMES)}")
    if len(dtypes) == 1:  # an export's usual case: one sort of every name
        return [(next(iter(dtypes)), sorted(entries))]
    by_dtype: dict[torch.dtype, list[str]] = {dtype: [] for dtype in dtypes}
    for key, (dtype, _) in entries.items():
        by_dtype[dtype].append(key)
    return [(dtype, sorted(by_dtype[dtype])) for dtype in sorted(dtypes, key=_RANK.__getitem__)]


class _Layout(NamedTuple):
    """A payload's layout: `where` (key -> (start, end) of its bytes, in payload order), each dtype's (start, end),
    and per dtype its keys in order, their shapes and their offsets (`offsets[i]`, `offsets[i + 1]`: key i's bytes),
    from which the header is formatted without a lookup per tensor."""

    where: dict[str, tuple[int, int]]
    bounds: dict[torch.dtype, tuple[int, int]]
    runs: list[tuple[torch.dtype, list[str], list[tuple[int, ...]], list[int]]]
    shapes: Mapping[str, tuple[int, ...]] | None = None
    """key -> shape of the entries, in their order, when the caller has them so (`allocate_plan_payload`: the plan's,
    which nothing changes): `Payload.shapes` copies it instead of a pass over the entries."""


def _layout(
    entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> _Layout:
    """The payload's layout: dtypes in `DTYPE_NAMES` order, names sorted within each, tensors back to back. `shapes`:
    `_Layout.shapes`."""
    found: dict[str, tuple[int, int]] = {}
    bounds: dict[torch.dtype, tuple[int, int]] = {}
    runs = []
    at = 0
    for dtype, keys in _groups(entries):
        ordered = list(map(itemgetter(1), map(entries.__getitem__, keys)))
        sizes = {shape: math.prod(shape) * dtype.itemsize for shape in set(ordered)}  # a few among 10^5 tensors
        if len(set(sizes.values())) == 1:  # every tensor of one size (an MoE adapter's lora_A and lora_B often)
            size = next(iter(sizes.values()))
            ends = list(range(at, at + size * len(keys) + 1, size)) if size else [at] * (len(keys) + 1)
        else:
            ends = list(accumulate(map(sizes.__getitem__, ordered), initial=at))
        found.update(zip(keys, zip(ends, islice(ends, 1, None))))
        bounds[dtype] = (at, ends[-1])
        runs.append((dtype, keys, ordered, ends))
        at = ends[-1]
    return _Layout(found, bounds, runs, shapes)


def spans(entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, tuple[int, int]]:
    """key -> (start, end) of its bytes in the payload, in payload order, for tensors given as key -> (dtype, shape)."""
    return _layout(entries).where


def header(
    entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    where: dict[str, tuple[int, int]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The file's first bytes: the header's length (8 bytes, little-endian), then the JSON header padded to 8.

    The JSON is what ``json.dumps(..., separators=(",", ":"), ensure_ascii=False)`` gives for the header's mapping,
    entries in `where`'s order."""
    runs = []
    for dtype, keys in groupby(where, key=lambda key: entries[key][0]):
        keys = list(keys)
        offsets = list(map(where.__getitem__, keys))
        starts, ends = map(str, map(itemgetter(0), offsets)), map(str, map(itemgetter(1), offsets))
        runs.append((dtype, keys, [entries[key][1] for key in keys], starts, ends))
    return b"".join(_header(runs, metadata))


_ESCAPED = '"\\' + "".join(map(chr, range(0x20)))
"""The ASCII characters json's `encode_basestring` escapes (the others below 0x80 it writes as they are)."""


def _header(
    runs: Iterable[tuple[torch.dtype, list[str], list[tuple[int, ...]], Iterable[str], Iterable[str]]],
    metadata: Mapping[str, str] | None,
) -> tuple[bytes, bytes, bytes]:
    """`header` of runs of tensors of one dtype (its keys, shapes, and starts and ends as text), each tensor's entry
    as pieces joined once: no dict and no formatting per tensor (MoE adapters have 10^5 tensors of a few distinct
    dtypes and shapes, whose text is formatted once each). Keys are escaped by json's own string encoder, unless
    none of them has a character it escapes (each looked for in the keys joined, in one fast scan of the text).

    As its three parts: the length, the JSON and the padding, for the writer to write one after the other rather
    than copy the JSON (~13 MB at 10^5 tensors) into one buffer with them."""
    pieces = (
        ["{", '"__metadata__":', json.dumps(dict(metadata), separators=(",", ":"), ensure_ascii=False), ',"']
        if metadata
        else ["{", '"']
    )
    for dtype, keys, shapes, starts, ends in runs:
        middles = {
            shape: f'":{{"dtype":"{DTYPE_NAMES[dtype]}","shape":[{",".join(map(str, map(int, shape)))}],'
            '"data_offsets":['
            for shape in set(shapes)
        }
        text = "".join(keys)
        plain = text.isascii() and not any(map(text.__contains__, _ESCAPED))
        pieces += chain.from_iterable(
            zip(
                keys if plain else map(itemgetter(slice(1, -1)), map(encode_basestring, keys)),
                map(middles.__getitem__, shapes),
                starts,
                repeat(","),
                ends,
                repeat(']},"'),
            )
        )
    pieces[-1] = pieces[-1][:-2] + "}"  # no comma nor quote after the last entry
    text = "".join(pieces).encode()
    padding = b" " * (-len(text) % 8)
    return (len(text) + len(padding)).to_bytes(8, "little"), text, padding


def _layout_header(layout: _Layout, metadata: Mapping[str, str] | None) -> tuple[bytes, bytes, bytes]:
    """`header` of a payload's layout: each key's start is the previous one's end."""
    runs = []
    for dtype, keys, shapes, ends in layout.runs:
        offsets = list(map(str, ends))
        runs.append((dtype, keys, shapes, offsets[:-1], islice(offsets, 1, None)))
    return _header(runs, metadata)


class Payload(Mapping[str, torch.Tensor]):
    """Empty tensors (key -> dtype, shape, in the order given) that are views of one flat buffer laid out as a
    safetensors payload, each made when first asked for (an offline MoE export fills 10^5 of them through the buffer
    and never needs most views). `save_file` writes it from `entries`, `where` and the buffer: the header from names,
    dtypes and shapes, the payload with one system call."""

    def __init__(
        self, entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], layout: _Layout | None = None
    ) -> None:
        """`layout`: the `layout` of an earlier payload of these very `entries` (that payload's own dict), reused with
        them, or made for them by this module (`allocate_plan_payload`, whose dict they are): neither changes."""
        self.entries = dict(entries) if layout is None else entries
        self.layout = _layout(self.entries) if layout is None else layout
        self.where, self._bounds = self.layout.where, self.layout.bounds
        """key -> (start, end) of its bytes in `flat`, in payload order."""
        self.flat = torch.empty(max((end for _, end in self._bounds.values()), default=0), dtype=torch.uint8)
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # the buffer as each dtype
        self._strides: dict[tuple[int, ...], tuple[int, ...]] = {}  # per shape (a few among 10^5 tensors)
        self._views: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        view = self._views.get(key)
        if view is None:
            dtype, shape = self.entries[key]
            start, end = self.where[key]
            if end == start:
                view = torch.empty(shape, dtype=dtype)
            else:
                typed = self._typed.get(dtype)
                if typed is None:
                    flat = self.flat
                    typed = self._typed[dtype] = flat[
                        start : start + (len(flat) - start) // dtype.itemsize * dtype.itemsize
                    ].view(dtype)  # any tensor's start is aligned to its dtype: dtypes are laid out widest first
                strides = self._strides.get(shape)
                if strides is None:
                    strides = self._strides[shape] = _strides(shape)
                view = typed.as_strided(shape, strides, start // dtype.itemsize)  # offset in the storage
            self._views[key] = view
        return view

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def buffer(self) -> memoryview:
        """The payload as a writable memoryview: bytes written into it are the tensors' values."""
        return memoryview(self.flat.numpy())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.layout.shapes is not None:
            return dict(self.layout.shapes)
        return {key: shape for key, (_, shape) in self.entries.items()}

    def parts(self) -> list[torch.Tensor]:
        """The payload's part of each dtype as one 1-D tensor of that dtype (the tensors of a dtype lie back to
        back), in payload order."""
        return [self.flat[lo:hi].view(dtype) for dtype, (lo, hi) in self._bounds.items() if hi > lo]


def allocate(entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> Payload:
    """Empty tensors (key -> dtype, shape) that are views of one flat buffer laid out as a safetensors payload: once
    filled, `save_file` writes them with one system call."""
    return Payload(entries)


def allocate_payload(
    entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
) -> tuple[Payload, memoryview, dict[str, tuple[int, int]]]:
    """`allocate`, with the flat buffer as a writable memoryview and each tensor's (start, end) byte span in it:
    bytes written into the buffer are the tensors' values."""
    payload = Payload(entries)
    return payload, payload.buffer(), payload.where


def shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """key -> shape of tensors (of a `Payload` without making its views)."""
    if isinstance(tensors, Payload):
        return tensors.shapes()
    return {key: tuple(t.shape) for key, t in tensors.items()}


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def allocate_plan(plan: AdapterPlan, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`allocate` for a plan's HF tensors, each in its source dtype unless `dtype` overrides it."""
    return allocate_plan_payload(plan, dtype)[0]


def allocate_plan_payload(
    plan: AdapterPlan, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], memoryview, dict[str, tuple[int, int]]]:
    """`allocate_payload` for a plan's HF tensors (as `allocate_plan`). Of one dtype (the usual plan), the tensors of
    a shape share one (dtype, shape) entry: a few distinct ones, not a tuple made per tensor (10^5 of them)."""
    names = set(plan.dtypes.values())
    dtypes = {name: dtype or getattr(torch, name) for name in names}
    shapes = plan.shapes
    if len(names) == 1:
        one = dtypes[next(iter(names))]
        pairs = {shape: (one, shape) for shape in set(shapes.values())}
        entries = dict(zip(shapes, map(pairs.__getitem__, shapes.values())))
    else:
        keys = shapes.keys()
        entries = dict(zip(keys, zip(map(dtypes.__getitem__, map(plan.dtypes.__getitem__, keys)), shapes.values())))
    payload = Payload(entries, _layout(entries, shapes))
    return payload, payload.buffer(), payload.where


def _payload(tensors: Mapping[str, torch.Tensor], where: dict[str, tuple[int, int]]) -> memoryview | None:
    """The whole payload as one buffer when the tensors are views of one in payload order (as `allocate` gives)."""
    base = None
    for key, (start, end) in where.items():
        if end == start:
            continue
        tensor = tensors[key]
        if base is None:
            base = tensor.data_ptr() - start
            storage = tensor.untyped_storage()
            offset = base - storage.data_ptr()
        if tensor.data_ptr() != base + start or not tensor.is_contiguous() or tensor.device.type != "cpu":
            return None
    if base is None:
        return memoryview(b"")
    size = max(end for _, end in where.values())
    if offset < 0 or offset + size > storage.nbytes():
        return None
    flat = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (size,))
    return memoryview(flat.numpy())


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    """os.pwritev that finishes: a short write (a signal, a large request) continues where it stopped."""
    while buffers:
        written = os.pwritev(fd, buffers, offset)
        offset += written
        while buffers and written >= len(buffers[0]):
            written -= len(buffers[0])
            buffers = buffers[1:]
        if buffers and written:
            buffers = [buffers[0][written:], *buffers[1:]]
        buffers = [b for b in buffers if len(b)]


def save_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` as a safetensors file at `path` (created or truncated; not fsynced: the caller decides); called
    as ``safetensors.torch.save_file`` is. A `Payload` is written from its buffer, without making its views."""
    if isinstance(tensors, Payload):
        layout = tensors.layout
        payload: memoryview | None = tensors.buffer()
    else:
        layout = _layout({key: (t.dtype, tuple(t.shape)) for key, t in tensors.items()})
        payload = _payload(tensors, layout.where)
    where = layout.where
    head = list(map(memoryview, _layout_header(layout, metadata)))
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if payload is not None:
            _write_all(fd, [*head, payload], 0)
            return
        _write_all(fd, head, 0)
        at = start = sum(map(len, head))
        batch = []
        for key, (begin, end) in where.items():
            if end == begin:
                continue
            batch.append(_bytes_of(tensors[key]))
            at += end - begin
            if len(batch) == _IOV_MAX:
                _write_all(fd, batch, start)
                batch, start = [], at
        _write_all(fd, batch, start)
    finally:
        os.close(fd)


SEGMENT_BATCH_BYTES = 2**20
"""`copy_segments` copies segments of one length this many bytes at a time (its temporary)."""
LONG_SEGMENT = 2**16
"""Segments of at least this many bytes are copied one by one (a copy's own time is then most of it)."""


def copy_segments(payload: memoryview, buffer: Any, starts: Any, dsts: Any, lengths: Any) -> None:
    """`payload[d : d + m] = buffer[s : s + m]` for each segment (s, d, m), every one inside both (checked by the
    caller): bytes written into a payload by offset, out of the offline reader's read buffer or another rank's
    transfer.

    Short segments (an MoE adapter's chunks and shards are 10^5 of a few dozen bytes each) are copied per length, as
    items of a void dtype that wide on views of both buffers with a step of one byte: one gather and one scatter per
    batch of SEGMENT_BATCH_BYTES, not a slice assignment each."""
    import numpy as np

    from .torch_save import sorted_distinct

    out = np.frombuffer(payload, dtype=np.uint8)
    long = lengths >= LONG_SEGMENT
    if long.any():
        for s, d, m in zip(starts[long].tolist(), dsts[long].tolist(), lengths[long].tolist()):
            out[d : d + m] = buffer[s : s + m]
        short = ~long & (lengths > 0)
        starts, dsts, lengths = starts[short], dsts[short], lengths[short]
    found = sorted_distinct(lengths).tolist()
    for m in found:
        if m == 0:
            continue
        src_at, dst_at = (starts, dsts) if len(found) == 1 else (starts[lengths == m], dsts[lengths == m])
        item = np.dtype((np.void, m))
        source = np.ndarray(shape=(len(buffer) - m + 1,), dtype=item, buffer=buffer, strides=(1,))
        target = np.ndarray(shape=(len(out) - m + 1,), dtype=item, buffer=out, strides=(1,))
        step = max(1, SEGMENT_BATCH_BYTES // m)
        for n in range(0, len(src_at), step):
            target[dst_at[n : n + step]] = source[src_at[n : n + step]]
