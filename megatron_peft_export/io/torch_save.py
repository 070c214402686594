"""Reading what ``torch.save`` wrote (its zip format), without torch.load and without running any code of the file.

- `decode`: one tensor from a blob in memory, sharing the blob's memory. torch.distributed.checkpoint stores every
  tensor of a torch_dist checkpoint as such a blob inside a `.distcp` file. ``torch.load`` of a small blob costs
  ~1 ms in unpickler and fake-tensor checks, which dominated the offline export of adapters with hundreds of
  tensors (bench/); this decoder costs tens of microseconds. It accepts only the plain case: a stored
  (uncompressed) zip whose ``data.pkl`` rebuilds one dense tensor from one typed storage, little-endian.
  Anything else raises NotPlainTensor.
- `load_torch_file`: a whole torch.save file on disk (common.pt, legacy checkpoints), tensors left unread.
- `check_pickle`: any pickle's declared lengths, memo indices and what its dict keys and set items would cost to hash,
  checked before an unpickler sees it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import logging
import math
import pickle
import pickletools
import struct
import types
import warnings
from collections import OrderedDict
from typing import Any, NamedTuple

import torch

from ..core.brief import brief, check_tree
from .safe_read import RegularFile

log = logging.getLogger("megatron_peft_export")


class Sealed(type):
    """The class of the classes an unpickler here hands out: none of their attributes can be set.

    What an unpickler's find_class returns is shared by the whole process, and the pickle's BUILD can be given it
    (a GLOBAL) with a slot state, which sets its attributes: on an open class or a Python function that would change
    every later reading (a class's methods, a function's defaults). So find_class returns only built-in objects
    (types, dtypes, built-in methods, a Python function's `__call__` method-wrapper: none has attributes to set) and
    classes of this metaclass."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise TypeError(f"refused, it sets attributes of the class {cls.__name__} (only objects' fields are set)")

    def __delattr__(cls, name: str) -> None:
        raise TypeError(f"refused, it deletes attributes of the class {cls.__name__}")


LAYOUT = {str(v): v for v in torch.__dict__.values() if isinstance(v, torch.layout)}.__getitem__
"""torch.serialization._get_layout as a pickle calls it (a layout's name -> the layout), not torch's own function:
BUILD on that function would set its `cache`, which torch.load reads, for the whole process."""


class NotPlainTensor(ValueError):
    """The blob is not a plain torch.save'd dense tensor this decoder reads."""


class _Rebuilt(NamedTuple):
    storage: tuple[str, torch.dtype, int]
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> _Rebuilt:
    return _Rebuilt(storage, int(offset), tuple(size), tuple(stride))


@functools.cache
def _storage_dtypes() -> dict[str, torch.dtype]:
    """torch's typed storage class names (`FloatStorage`, ...) -> their dtype: how data.pkl names a storage's dtype."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # touching the typed storage classes warns that they are deprecated
        classes = {name: getattr(torch, name) for name in dir(torch) if name.endswith("Storage")}
        return {
            name: cls.dtype for name, cls in classes.items() if isinstance(getattr(cls, "dtype", None), torch.dtype)
        }


class _TensorPickle(pickle.Unpickler):
    """`data.pkl` of a saved tensor: torch's rebuild call, a typed storage reference and OrderedDict, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2.__call__
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _storage_dtypes():
            return _storage_dtypes()[name]
        raise NotPlainTensor(f"data.pkl names {module}.{name}")

    def persistent_load(self, pid: Any) -> tuple[str, torch.dtype, int]:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and type(pid[2]) is str):
            raise NotPlainTensor(f"unexpected storage reference {brief(pid)}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or type(numel) is not int:
            raise NotPlainTensor(f"unexpected storage type or size {brief(dtype)}, {brief(numel)}")
        return key, dtype, numel


_EOCD = struct.Struct("<4s4H2LH")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")


def _members(blob: memoryview, read: list[tuple[int, int]] | None = None) -> dict[str, tuple[int, int]]:
    """Zip member name -> (offset of its data in `blob`, size), for stored (uncompressed) members.

    With `read`, the byte ranges the result depends on are appended to it (CRCs and member data are not read)."""
    # torch writes no zip comment: the end record is last
    if bytes(blob[-_EOCD.size : -_EOCD.size + 4]) == b"PK\x05\x06":
        tail, at = blob, len(blob) - _EOCD.size
    else:
        if read is not None:
            raise NotPlainTensor("the zip end record is not last")
        tail = bytes(blob[max(0, len(blob) - 65557) :])
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _EOCD.size:
            raise NotPlainTensor("no zip end record")
    *_, count, directory_size, directory_offset, _comment = _EOCD.unpack_from(tail, at)
    if directory_offset == 0xFFFFFFFF or directory_offset + directory_size > len(blob):
        raise NotPlainTensor("zip64 or a central directory outside the blob")
    if read is not None:
        read.append((at, at + _EOCD.size))
    members, p = {}, directory_offset
    for _ in range(count):
        fields = _CENTRAL.unpack_from(blob, p)
        if fields[0] != b"PK\x01\x02":
            raise NotPlainTensor("bad central directory entry")
        method, size, name_len, extra_len, comment_len, local = (
            fields[4],
            fields[9],
            fields[10],
            fields[11],
            fields[12],
            fields[16],
        )
        name = bytes(blob[p + _CENTRAL.size : p + _CENTRAL.size + name_len]).decode()
        header = _LOCAL.unpack_from(blob, local)
        if read is not None:  # all but the CRC (bytes 16 to 20) of the central entry; the local header but its CRC
            read += [(p, p + 16), (p + 20, p + _CENTRAL.size + name_len), (local, local + 14), (local + 18, local + 30)]
        p += _CENTRAL.size + name_len + extra_len + comment_len
        if header[0] != b"PK\x03\x04" or method != 0 or size == 0xFFFFFFFF or fields[3] & 1:
            raise NotPlainTensor(f"zip member {name} is compressed, encrypted or zip64")
        start = local + _LOCAL.size + header[9] + header[10]
        if start + size > len(blob):
            raise NotPlainTensor(f"zip member {name} runs past the blob")
        members[name] = (start, size)
    return members


@functools.lru_cache(maxsize=4096)
def _unpickled(pickled: bytes) -> _Rebuilt:
    """A data.pkl's tensor description; cached, as the tensors of one shape and dtype share the same data.pkl bytes."""
    try:
        check_pickle(pickled)
        rebuilt = _TensorPickle(io.BytesIO(pickled)).load()
    except NotPlainTensor:
        raise
    except Exception as exc:
        raise NotPlainTensor(f"data.pkl: {type(exc).__name__}: {exc}") from exc
    if not isinstance(rebuilt, _Rebuilt):
        raise NotPlainTensor(f"data.pkl holds a {type(rebuilt).__name__}, not a tensor")
    return rebuilt


class Layout(NamedTuple):
    """How `decode` reads blobs of one length: where the tensor's bytes are and what it is, and the bytes (positions and
    values) that decision depends on. A blob of that length with the same values at those positions decodes the same
    way (the rest is the tensor's data, CRCs and torch's serialization id)."""

    length: int
    positions: Any
    values: Any
    data_offset: int
    dtype: torch.dtype
    numel: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @property
    def whole(self) -> bool:
        """Whether the tensor is its storage, in order (what `gather` needs)."""
        return self.offset == 0 and math.prod(self.size) == self.numel and self.stride == _contiguous(self.size)


def _contiguous(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _read(blob: memoryview, read: list[tuple[int, int]] | None = None) -> Layout:
    """decode's reading of `blob`; with `read`, the byte ranges it depends on are appended to it."""
    members = _members(blob, read)
    pickled = next((name for name in members if name.endswith("/data.pkl")), None)
    if pickled is None:
        raise NotPlainTensor("no data.pkl")
    prefix = pickled[: -len("data.pkl")]
    order = members.get(prefix + "byteorder")
    if order is not None and bytes(blob[order[0] : order[0] + order[1]]) != b"little":
        raise NotPlainTensor("not little-endian")
    start, size = members[pickled]
    rebuilt = _unpickled(blob[start : start + size].tobytes())
    key, dtype, numel = rebuilt.storage
    data = members.get(f"{prefix}data/{key}")
    if data is None or data[1] != numel * dtype.itemsize:
        raise NotPlainTensor(f"storage {key} missing or of the wrong size")
    needed = rebuilt.offset + sum((n - 1) * s for n, s in zip(rebuilt.size, rebuilt.stride)) + 1
    if 0 not in rebuilt.size and needed > numel:
        raise NotPlainTensor("the tensor reaches past its storage")
    if read is not None:
        read += [(start, start + size)] + ([(order[0], order[0] + order[1])] if order is not None else [])
    return Layout(len(blob), None, None, data[0], dtype, numel, rebuilt.size, rebuilt.stride, rebuilt.offset)


def decode(blob: bytearray) -> torch.Tensor:
    """The tensor in a torch.save blob, sharing `blob`'s memory."""
    return _view(blob, 0, _read(memoryview(blob)))


def _view(buffer: Any, at: int, layout: Layout) -> torch.Tensor:
    if not layout.numel:
        storage = torch.empty(0, dtype=layout.dtype)
    else:
        storage = torch.frombuffer(buffer, dtype=layout.dtype, count=layout.numel, offset=at + layout.data_offset)
    return storage.as_strided(layout.size, layout.stride, layout.offset)


def sorted_distinct(values: Any) -> Any:
    """`np.unique` of a 1-D integer array (its distinct values, sorted), without np.unique's check for a masked
    array, whose first call imports numpy.ma (~10 ms, once per process: an offline export from the command line paid
    it)."""
    import numpy as np

    ordered = np.sort(values)
    if len(ordered) < 2:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def layout_of(blob: memoryview) -> Layout:
    """`decode`'s reading of a blob, with the bytes it depends on (NotPlainTensor as decode raises it, or when the
    blob's zip end record is not last)."""
    import numpy as np

    read: list[tuple[int, int]] = []
    found = _read(blob, read)
    positions = sorted_distinct(np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in read]))
    values = np.frombuffer(blob, dtype=np.uint8)[positions]
    return found._replace(positions=positions, values=values)


def matching(buffer: Any, starts: Any, layout: Layout, rows: int = 1024) -> Any:
    """For blobs of `layout.length` bytes at `starts` (a numpy array) in `buffer`: whether each has the layout's
    values at its positions, i.e. decodes as the layout says. Checked `rows` blobs at a time; blobs evenly spaced (one
    run of a file) through a strided view of them, one slice per run of consecutive positions, with no copy."""
    import numpy as np

    data = np.frombuffer(buffer, dtype=np.uint8)
    if (
        len(starts) > 1
        and layout.positions.size
        and 0 <= starts[0] <= starts[1]
        and starts[-1] + layout.positions[-1] < len(data)
        and (np.diff(starts) == starts[1] - starts[0]).all()
    ):
        return _matching_evenly(data, starts, layout)
    return _matching_gathered(data, starts, layout, rows)


def _matching_gathered(data: Any, starts: Any, layout: Layout, rows: int = 1024) -> Any:
    """`matching` of blobs anywhere: their bytes at the layout's positions gathered, `rows` blobs at a time."""
    import numpy as np

    found = np.empty(len(starts), dtype=bool)
    for n in range(0, len(starts), rows):
        picked = data[starts[n : n + rows, None] + layout.positions[None, :]]
        found[n : n + rows] = (picked == layout.values[None, :]).all(axis=1)
    return found


_WORD_ROWS = 512
"""Blobs compared together by `_matching_evenly` (its temporary: this many rows of words)."""
_GAP_WORDS = 32
"""Runs of words holding positions at most this many words apart are compared by `_matching_evenly` as one run, the
words between them masked out: five array operations per run and block cost more than comparing that many more words
of each blob (a torch.save zip's fixed bytes lie in ~11 runs a few words apart; one run compares them in half the
time)."""


def _matching_evenly(data: Any, starts: Any, layout: Layout) -> Any:
    """`matching` of blobs `starts[1] - starts[0]` bytes apart (a step of 0 or more, every blob's positions inside
    `data`: checked by the caller).

    Compared 8 bytes at a time: each blob's words from its first position on, xor the layout's values, masked to the
    positions, must be all zero, over the runs of words holding positions: in C (`_blob_check`, built with the
    package) when it is there, else on numpy views (`_words_match`). A blob whose last word would run past `data` (by
    up to 7 bytes after its last position) is compared by `_matching_gathered`."""
    import numpy as np

    positions, values = layout.positions, layout.values
    first, step, low = int(starts[0]), int(starts[1] - starts[0]), int(positions[0])
    span = (int(positions[-1]) - low) // 8 * 8 + 8
    expected, mask = np.zeros(span, dtype=np.uint8), np.zeros(span, dtype=np.uint8)
    expected[positions - low], mask[positions - low] = values, 0xFF
    expected, mask = expected.view(np.uint64), mask.view(np.uint64)
    room = len(data) - (first + low + span)  # bytes past the first blob's last word
    fit = 0 if room < 0 else len(starts) if step == 0 else min(len(starts), room // step + 1)
    used = np.flatnonzero(mask)
    check = _blob_check()
    if check is not None and fit:
        cuts = np.flatnonzero(np.diff(used) > 1) + 1  # runs of consecutive words
        runs = np.stack([used[np.concatenate(([0], cuts))], used[np.concatenate((cuts, [len(used)])) - 1] + 1], 1)
        found = np.ones(len(starts), dtype=bool)
        found[:fit] = np.frombuffer(
            check.words_match(data, first + low, step, fit, expected, mask, runs.astype(np.int64)), dtype=bool
        )
    else:
        found = _words_match(data, first + low, step, fit, len(starts), expected, mask, used)
    if fit < len(starts):
        found[fit:] = _matching_gathered(data, starts[fit:], layout)
    return found


def _words_match(data: Any, origin: int, step: int, fit: int, count: int, expected: Any, mask: Any, used: Any) -> Any:
    """`_matching_evenly`'s comparison on numpy views (the reference of `_blob_check.words_match`): `count` answers,
    the first `fit` blobs compared (the rest True, for the caller to compare). Runs of words holding positions (those
    with at most `_GAP_WORDS` words between them joined, those words masked out) are views of the blobs (no copy),
    taken `_WORD_ROWS` blobs at a time."""
    import numpy as np

    found = np.ones(count, dtype=bool)
    cuts = (np.flatnonzero(np.diff(used) > _GAP_WORDS + 1) + 1).tolist()
    for lo, hi in zip([0, *cuts], [*cuts, len(used)]) if fit else ():
        a, b = int(used[lo]), int(used[hi - 1]) + 1
        words = np.ndarray(shape=(fit, b - a), dtype=np.uint64, buffer=data, offset=origin + 8 * a, strides=(step, 8))
        scratch = np.empty((min(fit, _WORD_ROWS), b - a), dtype=np.uint64)
        for n in range(0, fit, _WORD_ROWS):
            block = scratch[: min(fit - n, _WORD_ROWS)]
            np.bitwise_xor(words[n : n + _WORD_ROWS], expected[a:b], out=block)
            block &= mask[a:b]
            found[n : n + len(block)] &= ~block.any(axis=1)
    return found


@functools.cache
def _blob_check() -> Any:
    """The C blob check (`megatron_peft_export._blob_check`, built by `pip install -e .`), or None when it was not
    built (then `_words_match` compares on numpy views)."""
    try:
        return importlib.import_module("megatron_peft_export._blob_check")
    except ImportError:
        return None


def gather(buffer: Any, first: int, count: int, step: int, layout: Layout) -> torch.Tensor:
    """The tensors of `count` blobs of one `layout` (checked by `matching`), `step` bytes apart from byte `first` of
    `buffer`, stacked: [count, *size], copied once out of the buffer (aligned, contiguous)."""
    import numpy as np

    nbytes = layout.numel * layout.dtype.itemsize
    data = np.frombuffer(buffer, dtype=np.uint8)
    rows = np.lib.stride_tricks.as_strided(
        data[first + layout.data_offset :], shape=(count, nbytes), strides=(step, 1), writeable=False
    )
    return torch.from_numpy(np.array(rows, copy=True, order="C")).view(layout.dtype).view(count, *layout.size)


# ---------------------------------------------------------------------------------------------------- any pickle
_OWN_CASE = ("STOP", "LONG_BINPUT", "FRAME")


def _argument_encodings() -> tuple[list[int], dict[int, Any]]:
    """Per opcode byte: the size of a fixed argument (-1: variable, -2: no such opcode), and for the variable ones
    "line" or "lines2" (newline-terminated, one or two lines) or (width, signed): a little-endian length of `width`
    bytes followed by that many bytes (STOP, LONG_BINPUT and FRAME: their own case)."""
    lengths = {-2: (1, False), -3: (4, True), -4: (4, False), -5: (8, False)}
    fixed, variable = [-2] * 256, {}
    for op in pickletools.opcodes:
        code, n = ord(op.code), op.arg.n if op.arg is not None else 0
        if n >= 0 and op.name not in _OWN_CASE:
            fixed[code] = n
        else:
            fixed[code] = -1
            variable[code] = (
                op.name
                if op.name in _OWN_CASE
                else "lines2"
                if op.arg.name == "stringnl_noescape_pair"
                else "line"
                if n == -1
                else lengths[n]
            )
    return fixed, variable


_FIXED, _VARIABLE = _argument_encodings()
_PUT, _GET, _POP, _DUP = ord("p"), ord("g"), 0x30, 0x32
MAX_TUPLE_DEPTH = 100
"""Tuples nested deeper than this are refused (what torch.save and torch.distributed.checkpoint write nests a few)."""
_MAX_INDEX_DIGITS = 18
"""A text memo index (PUT, GET: protocol 0) has at most this many digits (and names at most the pickle's size)."""


def check_pickle(data: bytes) -> None:
    """Refuse, before an unpickler sees it, a pickle whose opcodes declare more than the data holds, whose frames do
    not end where an opcode ends (unpicklers read those differently: see `_walk`), or that builds what hashing cannot
    finish. Raises ValueError. One walk over the opcodes, following the unpickler's stack and memo:
    in C (`_pickle_walk`, built with the package) when it is there, else `walk_pickle` (the reference: the C walk is
    the same algorithm, and tests/io/test_pickle_walk.py pins that both give the same answer on every pickle).

    Lengths: CPython's unpickler sizes buffers from declared lengths (BYTEARRAY8 allocates first, then reads) and
    grows its memo table to twice any index a PUT names (zero-filled: gigabytes for a 4-byte index); here every
    declared length must fit in what follows and every memo index must be below the pickle's size.

    Hashing: the unpickler hashes every dict key and set item as it builds them (SETITEM(S), DICT, ADDITEMS,
    FROZENSET; REDUCE, NEWOBJ(_EX) and BUILD may hash what they are given), and hashing a tuple walks it with no depth
    limit: a tuple nested a million deep crashes the process (a C stack overflow), and a tuple holding one memoized
    tuple 32 times, 12 levels deep (800 bytes), takes 32^12 steps. Why following the stack is sound: an unpickler
    builds objects only from what its stack and memo hold, and the walk holds, for every stack slot and memo entry,
    a bound of what hashing that object walks (steps << 8 | tuple depth). Only tuples are hashed through: a list or
    dict refuses hashing at once, a frozenset's hash is of its items' hashes, already paid when it was built (as
    FROZENSET or a call's argument), the classes the unpicklers build hash by identity; so every other item is one
    step. A tuple is one more step than its items and one deeper than the deepest: exact for the opcodes that build
    tuples (TUPLE, EMPTY_TUPLE, TUPLE1..3). A call's result (REDUCE, NEWOBJ(_EX), OBJ, INST) may be a tuple made of
    what it was given (torch.Size(t) is a tuple; the records the unpicklers return are of bounded size), so it is
    bounded by what it was given; BUILD leaves its object's bound as it was; a GET is the bound stored. An opcode
    that takes items and hashes some (keys, set items, a call's arguments) spends their bounds from a budget of 4x
    the pickle's size plus 64 Ki steps; a tuple deeper than MAX_TUPLE_DEPTH or of more steps than the pickle has
    bytes (only shared tuples make one) is refused. The memo is followed as the unpickler keeps it (MEMOIZE stores
    at the count of distinct indices stored so far; a GET of an index never stored is one step, the unpickler
    refuses it anyway). Not counted here: what a call hashes inside a list it is given (set(list) hashes the list's
    items, counted here as the list's one step); of what our unpicklers call only load_torch_file's set and frozenset
    do that, and they count it themselves (`_FilePickle._hashed_set`).
    """
    walk = _accelerated()
    found = walk(data, _TABLES) if walk is not None else walk_pickle(data)
    if found is not None:
        raise ValueError(_message(*found))


def _message(code: int, at: int, a: int = 0, b: int = 0) -> str:
    """The refusal a walk reports as (code, byte, value, value): the one wording of both walks."""
    return {
        1: lambda: f"unknown pickle opcode {a:#x} at byte {at}",
        2: lambda: f"a memo index past the pickle's size at byte {at}",
        3: lambda: f"an opcode at byte {at} declares {a} bytes, {b} follow",
        4: lambda: f"an unterminated line at byte {at}",
        5: lambda: f"a bad memo index at byte {at}",
        6: lambda: f"an opcode at byte {at} takes more items than the stack holds",
        7: lambda: f"the pickle hashes far more items than it holds (shared tuples), at byte {at}",
        8: lambda: f"a tuple nested {a} deep (at most {MAX_TUPLE_DEPTH}), at byte {at}",
        9: lambda: f"a tuple of shared tuples holding more items than the pickle has bytes, at byte {at}",
        10: lambda: "the pickle ends before its STOP opcode",
        11: lambda: (
            f"the frame of the FRAME at byte {at} ends at byte {a}, inside an opcode that ends at byte {b} "
            "(a frame ends where an opcode ends)"
        ),
        12: lambda: (
            f"a FRAME at byte {at} begins a frame inside the frame that ends at byte {a} (a frame begins "
            "where the one before ends)"
        ),
    }[code]()


class _Refusal(Exception):
    """A refusal found inside the walk's helpers: (code, byte, value, value) as `_message` reads it."""


@functools.cache
def _accelerated() -> Any:
    """The C walk (`megatron_peft_export._pickle_walk`, built by `pip install -e .`), or None when it was not built
    (then check_pickle runs the same walk in Python)."""
    try:
        from .._pickle_walk import walk
    except ImportError as exc:
        log.warning(
            "checking pickles in Python, ~100x slower than the C walk, which was not built (%s): reinstall with a C "
            "compiler (pip install -e . or the wheel) to read large checkpoints' metadata fast",
            exc,
        )
        return None
    return walk


def walk_pickle(data: bytes) -> tuple[int, int, int, int] | None:
    """check_pickle's walk in Python (the reference; see there): None if the pickle passes, else the refusal as
    (code, byte, value, value) (`_message`). ~0.4 us per opcode; the C walk, ~100 times less."""
    try:
        _walk(data)
    except _Refusal as refusal:
        return refusal.args[0]
    return None


def _walk(data: bytes) -> None:
    end, at, fixed, rule = len(data), 0, _FIXED, _RULE
    stack: list[int] = []  # per item: what hashing it walks, as steps << 8 | tuple depth (1 << 8 for all but tuples)
    marks: list[int] = []
    memo: dict[int, int] = {}
    budget = [4 * end + (1 << 16), end + 1024]  # steps hashed in all; steps of one tuple
    # Frames (protocol 4): how an unpickler reads a frame that ends inside an opcode depends on how it reads its input
    # (pickle.loads, or a file that has peek: on past the frame's end; io.BytesIO: the rest of the frame dropped;
    # pickle.py's unpickler refuses it), so such a frame is refused, as pickle.py refuses it and a FRAME that begins
    # inside a frame. What picklers write ends every frame where an opcode ends.
    frame, limit = -1, end  # the current frame's FRAME byte (-1: none) and where it ends (else the data's end)
    while True:
        while at < limit:
            op = data[at]
            n = fixed[op]
            if n >= 0:
                r = rule[op]
                try:
                    if r == 0:  # pushes one item that hashes in one step
                        stack.append(256)
                    elif r == 2:  # MEMOIZE
                        memo[len(memo)] = stack[-1]
                    elif r == 3:  # BINGET, LONG_BINGET
                        stack.append(memo.get(int.from_bytes(data[at + 1 : at + 1 + n], "little"), 256))
                    elif r == 1:  # takes one, leaves one such item
                        stack[-1] = 256
                    elif r == 5:  # MARK
                        marks.append(len(stack))
                    elif r == 11:  # REDUCE, NEWOBJ: the arguments may be hashed; the result may be a tuple of them
                        arguments = stack.pop()
                        budget[0] -= arguments >> 8
                        stack[-1] = arguments
                        if budget[0] < 0:
                            raise _Refusal((7, at, 0, 0))
                    elif r == 12:  # BUILD: the state may be hashed; the object stays what it was
                        if len(stack) < 2:
                            raise IndexError
                        budget[0] -= stack.pop() >> 8
                        if budget[0] < 0:
                            raise _Refusal((7, at, 0, 0))
                    elif r == 13:  # SETITEMS: hashes the keys
                        mark = marks.pop()
                        budget[0] -= sum(stack[mark::2]) >> 8
                        del stack[mark:]
                        if budget[0] < 0:
                            raise _Refusal((7, at, 0, 0))
                    elif r == 14:  # APPENDS
                        del stack[marks.pop() :]
                    elif r == 8:  # EMPTY_TUPLE
                        stack.append(257)
                    elif r == 9:  # TUPLE1
                        stack[-1] = _tuple(stack[-1] + 257, budget, at)
                    elif r == 10:  # TUPLE2
                        second = stack.pop()
                        stack[-1] = _tuple(stack[-1] + second - (min(stack[-1] & 255, second & 255)) + 257, budget, at)
                    elif r == 4:  # BINPUT
                        memo[data[at + 1]] = stack[-1]
                    elif r != 7:  # anything else that touches the stack (nothing: 7): see _step
                        _step(op, at, stack, marks, budget)
                except IndexError:
                    raise _Refusal((6, at, 0, 0)) from None
                at += 1 + n
                continue
            if n == -2:
                raise _Refusal((1, at, op, 0))
            kind, at = _VARIABLE[op], at + 1
            if kind == "STOP":
                return
            if kind == "LONG_BINPUT":
                index = int.from_bytes(data[at : at + 4], "little")
                if index > end:
                    raise _Refusal((2, at - 1, 0, 0))
                if stack:
                    memo[index] = stack[-1]
                at += 4
            elif type(kind) is tuple:
                width, signed = kind
                length = int.from_bytes(data[at : at + width], "little", signed=signed)
                if at + width > end or length < 0 or at + width + length > end:
                    raise _Refusal((3, at - 1, length, max(0, end - at - width)))
                stack.append(256)
                at += width + length
            elif kind == "FRAME":  # the opcodes of its length follow, and it ends where one ends
                at += 8
                if at <= limit:  # else its length crosses the frame it is in (or the data's end): below
                    if frame >= 0 and at != limit:
                        raise _Refusal((12, at - 9, limit, 0))
                    length = int.from_bytes(data[at - 8 : at], "little")
                    if length > end - at:
                        raise _Refusal((3, at - 9, length, end - at))
                    frame, limit = at - 9, at + length
            else:
                line = at
                for _ in range(2 if kind == "lines2" else 1):
                    newline = data.find(b"\n", at)
                    if newline < 0:
                        raise _Refusal((4, at, 0, 0))
                    at = newline + 1
                if op == _PUT or op == _GET:
                    digits = data[line : at - 1].strip()
                    if not (digits.isdigit() and len(digits) <= _MAX_INDEX_DIGITS and int(digits) <= end):
                        raise _Refusal((5, line - 1, 0, 0))
                    if op == _GET:
                        stack.append(memo.get(int(digits), 256))
                    elif stack:
                        memo[int(digits)] = stack[-1]
                else:
                    _step(op, line - 1, stack, marks, budget)
        if frame >= 0 and at > limit:
            raise _Refusal((11, frame, limit, at))
        if at >= end:
            raise _Refusal((10, end, 0, 0))
        frame, limit = -1, end


def _effects() -> dict[int, tuple[bool, int, int]]:
    """Opcode byte -> (whether it takes the items above the mark (and the mark), how many items it takes besides
    (below the mark, for those that take one), how many it leaves: 0 or 1)."""
    effects = {}
    for op in pickletools.opcodes:
        before = op.stack_before
        marked = pickletools.markobject in before
        below = before.index(pickletools.markobject) if marked else len(before)
        effects[ord(op.code)] = (marked, below, len(op.stack_after))
    return effects


_EFFECTS = _effects()
_TUPLES = {ord("t"): -1, 0x29: 0, 0x85: 1, 0x86: 2, 0x87: 3}  # TUPLE, EMPTY_TUPLE, TUPLE1..3: items taken
_CALLS = {ord("o"), ord("i"), 0x92}  # OBJ, INST, NEWOBJ_EX (REDUCE and NEWOBJ: rule 11)
_HASHED_KEYS = {ord(c) for c in "ud"}  # SETITEMS, DICT: every second item from the first is a key
_HASHING = {0x90, 0x91} | {ord(c) for c in "Rb"} | {0x81, 0x92}
"""ADDITEMS, FROZENSET hash every item; REDUCE, BUILD, NEWOBJ, NEWOBJ_EX may hash their arguments' items."""


def _rules() -> list[int]:
    """The walk's cases per opcode byte (see `_walk`); 6: `_step`; 7: nothing on the stack."""
    rules = [6] * 256
    for code, (marked, below, leaves) in _EFFECTS.items():
        if code in _TUPLES or code in _HASHING or code in _HASHED_KEYS or code == ord("s") or marked:
            continue
        if (below, leaves) == (0, 1):
            rules[code] = 0
        elif (below, leaves) == (1, 1):
            rules[code] = 1
        elif (below, leaves) == (0, 0):
            rules[code] = 7
    rules[0x94], rules[0x68], rules[0x6A], rules[0x71], rules[0x28] = 2, 3, 3, 4, 5
    rules[ord("R")] = rules[0x81] = 11
    rules[ord("b")] = 12
    rules[ord("u")], rules[ord("e")], rules[0x29], rules[0x85], rules[0x86] = 13, 14, 8, 9, 10
    rules[_POP] = rules[_DUP] = 6  # POP (of an item or a mark), DUP
    return rules


_RULE = _rules()


def _tables() -> bytes:
    """The walk's tables for the C walk, 8 bytes per opcode byte: the fixed argument's size + 2 (0: no such opcode,
    1: a variable argument), the `_rules` case, the variable argument's kind (1 STOP, 2 LONG_BINPUT, 3 a line,
    4 two lines, 5 to 8 a length of 1 unsigned, 4 signed, 4 unsigned, 8 unsigned bytes, 9 FRAME), and `_step`'s effect:
    marked, below, leaves, what it builds (1 a tuple, 2 a call's result: `_CALLS`), which items it hashes (1 the
    second, 2 every second from the first, 3 all). Python computes them once: both walks read the same facts."""
    kinds = {"STOP": 1, "LONG_BINPUT": 2, "line": 3, "lines2": 4, (1, False): 5, (4, True): 6, (4, False): 7}
    kinds[(8, False)], kinds["FRAME"] = 8, 9
    table = bytearray(256 * 8)
    for code in range(256):
        if code in _TUPLES:
            marked, below, leaves = _TUPLES[code] < 0, max(_TUPLES[code], 0), 1
        else:
            marked, below, leaves = _EFFECTS.get(code, (False, 0, 0))
        hashed = 1 if code == 0x73 else 2 if code in _HASHED_KEYS else 3 if code in _HASHING else 0
        kind = kinds[_VARIABLE[code]] if code in _VARIABLE else 0
        built = 1 if code in _TUPLES else 2 if code in _CALLS else 0
        row = (_FIXED[code] + 2, _RULE[code], kind, marked, below, leaves, built, hashed)
        table[code * 8 : code * 8 + 8] = bytes(int(v) for v in row)
    return bytes(table)


_TABLES = _tables()


def _tuple(item: int, budget: list[int], at: int) -> int:
    """A new tuple's item (steps << 8 | depth), refused when too deep or of more steps than the pickle has bytes."""
    depth = item & 255
    if depth > MAX_TUPLE_DEPTH:
        raise _Refusal((8, at, depth, 0))
    if item >> 8 > budget[1]:
        raise _Refusal((9, at, 0, 0))
    return item


def _step(op: int, at: int, stack: list[int], marks: list[int], budget: list[int]) -> None:
    """An opcode's effect on the walk's stack: what hashing each item walks (steps << 8 | tuple depth). Only
    tuples are hashed through (a list or dict stops a hash at once; the classes the unpicklers build hash by
    identity), so an item is one step, but a tuple: one more than its items' steps, one deeper than the deepest.
    A tuple deeper than MAX_TUPLE_DEPTH or of more steps than the pickle has bytes (only shared tuples make that)
    is refused, and so is hashing more steps in all than a few times the pickle's size."""
    if op == _DUP:
        stack.append(stack[-1] if stack else 256)
        return
    if op == _POP and marks and marks[-1] == len(stack):  # POP of a mark
        marks.pop()
        return
    if op in _TUPLES:
        marked, below, leaves = _TUPLES[op] < 0, max(_TUPLES[op], 0), 1
    else:
        marked, below, leaves = _EFFECTS.get(op, (False, 0, 0))
    taken: list[int] = []
    if marked:
        mark = marks.pop() if marks else 0
        taken, stack[mark:] = stack[mark:], []
    if below > len(stack):
        raise _Refusal((6, at, 0, 0))
    if below:
        dropped, stack[len(stack) - below :] = stack[len(stack) - below :], []
        taken = taken if marked else dropped
    if op in _TUPLES:
        steps, depth = 1 + sum(t >> 8 for t in taken), 1 + max((t & 255 for t in taken), default=0)
        stack.append(_tuple(steps << 8 | min(depth, 255), budget, at))
        return
    result = 256
    if op in _CALLS:  # the result may be a tuple of what the call was given (torch.Size(t) is a tuple)
        given = taken[1:] if op == 0x92 else taken
        steps, depth = max(1, sum(t >> 8 for t in given)), max((t & 255 for t in given), default=0)
        result = _tuple(steps << 8 | min(depth, 255), budget, at)
    hashed = taken[1:2] if op == 0x73 else taken[0::2] if op in _HASHED_KEYS else taken if op in _HASHING else ()
    if hashed:
        budget[0] -= sum(t >> 8 for t in hashed)
        if budget[0] < 0:
            raise _Refusal((7, at, 0, 0))
    if leaves:
        stack.append(result)


# ------------------------------------------------------------------------------------------ torch.save files on disk
# common.pt, modelopt_state/common.pt and legacy model_optim_rng.pt are torch.save zip files. They are read here
# without torch.load: the zip's directory is checked against the file (every member stored uncompressed, inside the
# file, members not overlapping), data.pkl goes through check_pickle and an unpickler that builds only plain data,
# argparse/SimpleNamespace, torch dtypes and sizes, and tensors as StoredTensor records (where the bytes are; nothing
# read). Classes of megatron, modelopt and numpy that such files hold (enums, rng state) become inert Opaque
# objects: the name is kept, nothing of the class is imported or run. Any other class or function is refused.

_MAX_DIMS = 64
_MAX_EXTENT = 1 << 62
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_OPAQUE_MODULES = ("megatron.", "modelopt.", "numpy.", "transformer_engine.")
_OPAQUE_NAMES = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("io", "BytesIO"),
    ("_io", "BytesIO"),
    ("pathlib", "PosixPath"),
    ("pathlib", "Path"),
    ("pathlib", "PurePosixPath"),
    ("signal", "Signals"),
}
_MAX_OPAQUE = 1024
"""Distinct class names one torch.save file may name (each becomes a class of its own)."""


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a class or function this reader does not build."""


class Opaque:
    """An object of a class a checkpoint names that is never built: neither imported nor run, only its name kept."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.qualified_name}, not loaded>"


@functools.lru_cache(maxsize=_MAX_OPAQUE)
def _opaque(module: str, name: str) -> type:
    return Sealed(name, (Opaque,), {"qualified_name": f"{module}.{name}"})


def _sizes(value: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, (tuple, list, torch.Size))
        or len(value) > _MAX_DIMS
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_EXTENT for v in value)
    ):
        raise ValueError(f"{what}: expected up to {_MAX_DIMS} non-negative integers, found {brief(value, 80)}")
    return tuple(value)


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _MAX_EXTENT:
        raise ValueError(f"{what}: expected a non-negative integer, found {brief(value, 40)}")
    return value


class Member(NamedTuple):
    """A stored (uncompressed) zip member: its local header's offset, its size, and where the next member begins."""

    name: str
    local: int
    size: int
    limit: int


class Storage(NamedTuple):
    member: Member
    dtype: torch.dtype
    nbytes: int


class StoredTensor(NamedTuple):
    """A tensor of a torch.save file, not read: the storage it views (a zip member) and how it views it."""

    storage: Storage
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.size)

    def span(self) -> tuple[int, int]:
        """The byte range of its storage the tensor covers: [start, end)."""
        if 0 in self.size:
            return 0, 0
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        return self.offset * self.dtype.itemsize, (last + 1) * self.dtype.itemsize

    def read(self, f: RegularFile) -> torch.Tensor:
        """The tensor's values: only the bytes it covers are read, into memory of its own."""
        first, end = self.span()
        if end == 0:
            return torch.empty(self.size, dtype=self.dtype)
        data = member_start(f, self.storage.member) + first
        f.check_range(data, end - first, f"tensor data ({self.storage.member.name})")
        buffer = bytearray(end - first)
        f.readinto(buffer, data)
        return torch.frombuffer(buffer, dtype=self.dtype).as_strided(self.size, self.stride, 0)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> StoredTensor:
    if not isinstance(storage, Storage):
        raise ValueError(f"a tensor over {type(storage).__name__}, not a stored storage")
    dtype = dtype or storage.dtype
    if not isinstance(dtype, torch.dtype) or storage.nbytes % dtype.itemsize:
        raise ValueError(f"a tensor of {brief(dtype, 40)} over a storage of {storage.nbytes} bytes")
    tensor = StoredTensor(
        storage, dtype, _count(offset, "storage offset"), _sizes(size, "size"), _sizes(stride, "stride")
    )
    if len(tensor.size) != len(tensor.stride) or tensor.span()[1] > storage.nbytes:
        raise ValueError(
            f"a tensor of size {list(tensor.size)} and stride {list(tensor.stride)} reaches past its storage of "
            f"{storage.nbytes} bytes"
        )
    return tensor


def _rebuild_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> StoredTensor:
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
) -> StoredTensor:
    return _tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None) -> Any:
    return data


def _codecs_encode(text: Any, encoding: Any = "latin1") -> bytes:  # how protocol 2 pickles bytes
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode of {type(text).__name__} as {brief(encoding, 20)}")
    return text.encode("latin1")


def _bytearray(value: Any = b"", encoding: Any = None) -> bytearray:
    """bytearray of the bytes or text the pickle holds; never of a number (bytearray(10**12) zero-fills 1 TB)."""
    if type(value) in (bytes, bytearray) and encoding is None:
        return bytearray(value)
    if type(value) is str and encoding in ("latin1", "latin-1"):
        return bytearray(value, "latin1")
    raise ValueError(f"bytearray of {type(value).__name__}; expected the bytes it holds")


def _size(value: Any = ()) -> torch.Size:
    return torch.Size(_sizes(value, "torch.Size"))


class _Namespace(metaclass=Sealed):
    """argparse.Namespace as the pickle builds it (NEWOBJ with no arguments): a plain argparse.Namespace, from a class
    whose attributes cannot be set (BUILD on argparse.Namespace itself would change the class for the process)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> argparse.Namespace:
        if args or kwargs:
            raise TypeError("argparse.Namespace is built with no arguments")
        return object.__new__(argparse.Namespace)


_BUILTINS = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex, "bytearray": _bytearray.__call__}
_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2.__call__,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3.__call__,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter.__call__,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter.__call__,
    ("collections", "OrderedDict"): OrderedDict,
    ("argparse", "Namespace"): _Namespace,
    ("types", "SimpleNamespace"): types.SimpleNamespace,
    ("_codecs", "encode"): _codecs_encode.__call__,
    ("torch", "Size"): _size.__call__,
    ("torch.serialization", "_get_layout"): LAYOUT,
    ("torch.storage", "UntypedStorage"): torch.uint8,
    ("torch", "UntypedStorage"): torch.uint8,
}


class _FilePickle(pickle.Unpickler):
    """data.pkl of a torch.save file: see the section comment."""

    def __init__(self, data: bytes, members: dict[str, Member], prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._members, self._prefix, self._storages = members, prefix, {}
        self._opaque_names: set[tuple[str, str]] = set()
        self._hash_budget = 4 * len(data) + (1 << 16)

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol 2's name for builtins
            module = "builtins"
        found = _FUNCTIONS.get((module, name))
        if found is not None:
            return found
        if module == "builtins" and name in ("set", "frozenset"):
            return functools.partial(self._hashed_set, _BUILTINS[name]).__call__
        if module == "builtins" and name in _BUILTINS:
            return _BUILTINS[name]
        if module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype):  # never getattr: torch's
            return torch.__dict__[name]  # module __getattr__ imports modules and calls functions
        if module == "torch" and name in _storage_dtypes():
            return _storage_dtypes()[name]
        if (module, name) in _OPAQUE_NAMES or module == "numpy" or module.startswith(_OPAQUE_MODULES):
            self._opaque_names.add((module, name))
            if len(self._opaque_names) > _MAX_OPAQUE:
                raise ValueError(f"more than {_MAX_OPAQUE} class names")
            return _opaque(module, name)
        raise RefusedGlobal(f"{module[:80]}.{name[:80]}")

    def _hashed_set(self, kind: type, items: Any = ()) -> Any:
        """set(items) or frozenset(items), as torch.save's protocol 2 writes a set (a call given a list), after
        counting what hashing the items walks (tuples through, shared ones each time) against one budget per file:
        check_pickle counts the list as one step, and a list holding one shared tuple of a pickle's size many times
        would hash for hours."""
        budget, pending = self._hash_budget, list(items) if type(items) in (list, tuple) else None
        if pending is None:
            raise ValueError(f"{kind.__name__} of {type(items).__name__}; expected a list")
        while pending:
            item = pending.pop()
            budget -= 1
            if budget < 0:
                raise ValueError(f"a {kind.__name__} whose items hash far more than the pickle holds (shared tuples)")
            if isinstance(item, tuple):
                pending.extend(item)
        self._hash_budget = budget
        return kind(items)

    def persistent_load(self, pid: Any) -> Storage:
        if not (
            type(pid) is tuple
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], torch.dtype)
            and type(pid[2]) is str
        ):
            raise ValueError(f"unexpected storage reference {brief(pid, 80)}")
        _, dtype, key, _location, numel = pid
        member = self._members.get(f"{self._prefix}data/{key}")
        nbytes = _count(numel, "storage size") * dtype.itemsize
        if member is None or member.size < nbytes:
            raise ValueError(
                f"storage {brief(key, 40)} of {nbytes} bytes is "
                f"{'missing' if member is None else f'a member of {member.size} bytes'}"
            )
        return self._storages.setdefault(key, Storage(member, dtype, nbytes))


MAX_ZIP_DIRECTORY = 64 << 20
"""The zip directory is read whole (torch.save writes ~100 bytes per tensor)."""


def zip_members(f: RegularFile) -> dict[str, Member]:
    """The members of a zip file, checked against the file: stored (not compressed), inside it, not overlapping."""
    tail_size = min(f.size, _EOCD.size + 0xFFFF)
    tail = f.read(f.size - tail_size, tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise ValueError(
            "no zip end record (a torch.save file is a zip archive; files in torch's pre-1.6 format are not read)"
        )
    _, _, _, _, count, directory_size, directory_offset, _ = _EOCD.unpack_from(tail, at)
    locator = f.size - tail_size + at - _ZIP64_LOCATOR.size
    if 0xFFFF == count or 0xFFFFFFFF in (directory_size, directory_offset):
        if locator < 0:
            raise ValueError("a zip64 end record is missing")
        signature, _, end64, _ = _ZIP64_LOCATOR.unpack(f.read(locator, _ZIP64_LOCATOR.size))
        record = (
            f.read(end64, _ZIP64_END.size) if signature == b"PK\x06\x07" and end64 + _ZIP64_END.size <= f.size else b""
        )
        if len(record) != _ZIP64_END.size or record[:4] != b"PK\x06\x06":
            raise ValueError("a zip64 end record is missing")
        *_, count, directory_size, directory_offset = _ZIP64_END.unpack(record)
    if directory_size > MAX_ZIP_DIRECTORY:
        raise ValueError(f"a zip directory of {directory_size} bytes; expected at most {MAX_ZIP_DIRECTORY}")
    if directory_offset + directory_size > f.size or count * _CENTRAL.size > directory_size:
        raise ValueError(
            f"the zip directory ({count} members, {directory_size} bytes at {directory_offset}) lies outside the "
            f"file of {f.size} bytes"
        )
    directory, p, found = f.read(directory_offset, directory_size), 0, []
    for _ in range(count):
        if p + _CENTRAL.size > len(directory) or directory[p : p + 4] != b"PK\x01\x02":
            raise ValueError("a bad zip directory entry")
        fields = _CENTRAL.unpack_from(directory, p)
        flags, method, compressed, size, name_len, extra_len, comment_len, local = (
            fields[3],
            fields[4],
            fields[8],
            fields[9],
            fields[10],
            fields[11],
            fields[12],
            fields[16],
        )
        name = directory[p + _CENTRAL.size : p + _CENTRAL.size + name_len].decode("utf-8")
        extra = directory[p + _CENTRAL.size + name_len : p + _CENTRAL.size + name_len + extra_len]
        p += _CENTRAL.size + name_len + extra_len + comment_len
        wide = [v == 0xFFFFFFFF for v in (size, compressed, local)]
        if any(wide):  # zip64: the real values, in this order, in the extra field with header id 1
            values, q = [], 0
            while q + 4 <= len(extra):
                header, length = struct.unpack_from("<2H", extra, q)
                if header == 1:
                    values = list(struct.unpack_from(f"<{min(length // 8, 3)}Q", extra, q + 4))
                    break
                q += 4 + length
            size, compressed, local = (
                values.pop(0) if wide[i] and values else v for i, v in enumerate((size, compressed, local))
            )
        if method != 0 or compressed != size:
            raise ValueError(f"zip member {name} is compressed")
        if flags & 1:
            raise ValueError(f"zip member {name} is encrypted")
        found.append((local, size, name))
    found.sort()
    members = {}
    for n, (local, size, name) in enumerate(found):
        limit = found[n + 1][0] if n + 1 < len(found) else directory_offset
        if local + _LOCAL.size + size > limit or name in members:
            raise ValueError(f"zip member {name} overlaps another or the zip directory")
        members[name] = Member(name, local, size, limit)
    return members


def member_start(f: RegularFile, member: Member) -> int:
    """Where a member's data begins, from its local header; the data must end before the next member."""
    header = _LOCAL.unpack(f.read(member.local, _LOCAL.size))
    start = member.local + _LOCAL.size + header[9] + header[10]
    if header[0] != b"PK\x03\x04" or start + member.size > member.limit:
        raise ValueError(f"zip member {member.name} has a bad local header")
    return start


MAX_DATA_PKL = 256 << 20
"""data.pkl of any torch.save file read (a legacy checkpoint's names and tensor records are a few MB)."""


def load_torch_file(f: RegularFile) -> Any:
    """The object a torch.save zip file holds, tensors as StoredTensor records (read them with `.read(f)`).

    Raises RefusedGlobal for a class or function it does not build, ValueError (and struct.error,
    UnicodeDecodeError, pickle.UnpicklingError) for anything malformed."""
    members = zip_members(f)
    pickled = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickled) != 1:
        raise ValueError(f"expected one <name>/data.pkl in the archive, found {sorted(members)[:6]}")
    prefix = pickled[0][: -len("data.pkl")]
    order = members.get(prefix + "byteorder")
    if order is not None and f.read(member_start(f, order), order.size) != b"little":
        raise ValueError("not little-endian")
    data_pkl = members[pickled[0]]
    if data_pkl.size > MAX_DATA_PKL:
        raise ValueError(f"data.pkl of {data_pkl.size} bytes; expected at most {MAX_DATA_PKL}")
    data = f.read(member_start(f, data_pkl), data_pkl.size)
    check_pickle(data)
    found = _FilePickle(data, members, prefix).load()
    check_tree(found, 4 * len(data) + (1 << 16))
    return found
