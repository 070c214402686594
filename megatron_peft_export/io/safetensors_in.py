"""Reading a safetensors file that came from someone else, without mapping it into memory.

safetensors' own reader (`safe_open`, `load_file`) maps the file with mmap and reads tensors from the mapping: a
file truncated (or replaced in place) by another process after it was opened makes the next read of a page past its
new end a SIGBUS, which kills the process (a training run's verification, an import in a training script) instead of
raising. Here the header is parsed and checked in Python and every tensor is read with positional reads of the
descriptor `safe_read.open_regular` opened: a file cut while it is read is an error naming it.

The header is checked as safetensors checks it, and more strictly where two readers could disagree about what the
file holds: the 8-byte length inside the file and at most 100 MB (safetensors' own cap); a UTF-8 JSON object of
objects, no key twice (safetensors keeps the last, other readers the first), no NaN or Infinity; `__metadata__`
text to text; each tensor a known dtype, a shape of at most 64 non-negative integers, `data_offsets` two integers
whose difference is the shape's bytes (Python integers: no overflow); the tensors cover the data exactly once,
back to back from its first byte to the file's end.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import ExportError
from .safe_read import RegularFile, open_regular

MAX_HEADER_BYTES = 100_000_000
"""safetensors' own cap on the JSON header."""
MAX_DIMS = 64
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
"""A JSON text, or from a quote to the end of the text when it is not closed (invalid JSON, refused by the parser
after this). The pattern cannot fail once it starts at a quote (the closing quote is optional), so the engine never
backtracks and every byte is looked at once. A pattern that must find the closing quote rescans the rest of the
header from every later quote when there is none: quadratic, hours for a header of escaped quotes."""
_SPACE = str.maketrans("", "", " \t\r\n")
_NUMBERS = str.maketrans("", "", "-0123456789,:")
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The safetensors dtypes read, by their names in the header (the packed 4- and 6-bit floats are not)."""
_SIZES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
_LIMIT = 1 << 63


class Entry(NamedTuple):
    """A tensor's entry, ordered by where its bytes are."""

    start: int
    """Offset of its first byte in the file (not in the data)."""
    end: int
    dtype: str
    shape: tuple[int, ...]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {twice[:80]!r} appears twice")
    return found


def _check_shape_of(text: str) -> int:
    """Refuse, before parsing, what would make Python's parser build far more objects than a header of tensors needs:
    a list holding anything but integers (a header's lists are shapes and offsets), more than one object per 40
    bytes or one text per 12 bytes (a tensor's entry is one object and five texts in at least 45 bytes), beyond a
    slack for small files. Parsing `{},{},...` or `"ab","ab",...` otherwise costs 22x and 13x the header's size in
    memory; what passes costs about 7x (333k tensor entries) and 3x (a list of integers), peak RSS of 47 MB files.
    Returns how many keys its objects hold, duplicates counted."""
    compact = _STRING.sub('""', text).translate(_SPACE)
    skeleton = compact.translate(_NUMBERS)
    if re.search(r"\[[^\]]", skeleton):
        raise ValueError("a list holds something other than integers")
    objects, texts = skeleton.count("{"), skeleton.count('"') // 2
    if objects > len(text) // 40 + 1024 or texts > len(text) // 12 + (1 << 16):
        raise ValueError(
            f"{objects} objects and {texts} texts in {len(text)} bytes, more than a header of tensors holds"
        )
    return compact.count('"":')


def _load(text: str, keys: int) -> Any:
    """The header parsed, refused if any object holds a key twice: parsed once without a hook (fast), and again
    with one that names the key only when the objects hold fewer keys than the text has (or nest deeper than a
    header's, which the entries' checks then refuse)."""
    header = json.loads(text, parse_constant=_refuse_constant)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    if len(header) + sum(len(v) for v in header.values() if type(v) is dict) != keys:
        json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_refuse_constant)
    return header


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 63


class SafetensorsFile:
    """An open safetensors file whose header was checked: `entries` (key -> Entry, in the header's order),
    `metadata`, and `tensor(key, rows)` read from the descriptor."""

    def __init__(self, file: RegularFile, error: type[ExportError]) -> None:
        self.file, self._error = file, error
        self.metadata: dict[str, str] = {}
        self.entries: dict[str, Entry] = {}
        self._parse()

    def _fail(self, problem: str) -> ExportError:
        return self._error(f"{self.file.path}: not a valid safetensors file ({problem}); is it truncated or corrupt?")

    def _parse(self) -> None:
        size = self.file.size
        if size < 8:
            raise self._fail(f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", self.file.read(0, 8))
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise self._fail(
                f"the header claims {length} bytes, the file has {size - 8} after the length and at most "
                f"{MAX_HEADER_BYTES} are read"
            )
        raw = self.file.read(8, length)
        try:
            text = raw.decode("utf-8")
            if not text.lstrip(" ").startswith("{"):
                raise ValueError("the header is not a JSON object")
            header = _load(text, _check_shape_of(text))
        except RecursionError:
            raise self._fail("the header is nested too deeply") from None
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise self._fail(f"header: {' '.join(str(exc).split())[:160]}") from None
        self._read_metadata(header.pop("__metadata__", None))
        for key, info in header.items():
            self.entries[key] = self._entry(key, info, 8 + length)
        self._check_coverage(8 + length, size)

    def _read_metadata(self, metadata: Any) -> None:
        if metadata is None:
            return
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ is not a mapping of text to text")
        self.metadata = metadata

    def _entry(self, key: str, info: Any, base: int) -> Entry:
        try:  # the common case in few steps (headers of MoE adapters hold 10^5 entries); any doubt: _explain
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if type(shape) is list and type(start) is int and type(end) is int and len(shape) <= MAX_DIMS:
                dims = [*shape, start, end]  # integers: the text's lists hold nothing else (_check_shape_of)
                numel = math.prod(shape)
                if (
                    min(dims) >= 0
                    and max(dims) < _LIMIT
                    and numel * _SIZES[dtype] == end - start
                    and (0 < numel < _LIMIT or math.prod(n or 1 for n in shape) < _LIMIT)
                ):
                    return Entry(base + start, base + end, dtype, tuple(shape))
        except (TypeError, KeyError, ValueError):
            pass
        raise self._explain(f"tensor {key[:80]!r}", info)

    def _explain(self, name: str, info: Any) -> ExportError:
        """What is wrong with a tensor's entry that `_entry` refused."""
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            return self._fail(f"{name} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            return self._fail(f"{name} has dtype {str(dtype)[:20]!r}; expected one of {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_count(n) for n in shape)):
            return self._fail(
                f"{name} has shape {str(shape)[:60]}; expected at most {MAX_DIMS} integers from 0 to 2^63-1"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
            return self._fail(f"{name} has data_offsets {str(offsets)[:60]}; expected two integers from 0 to 2^63-1")
        if math.prod(n or 1 for n in shape) >= _LIMIT:
            return self._fail(f"{name} has shape {shape[:8]}, whose dimensions multiply past 2^63")
        nbytes = math.prod(shape) * _SIZES[dtype]
        return self._fail(
            f"{name} of shape {shape[:8]} and dtype {dtype} needs {nbytes} bytes, its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}"
        )

    def _check_coverage(self, base: int, size: int) -> None:
        """The tensors lie back to back from the data's first byte to the file's end: no gap, overlap or excess."""
        at = base
        for entry, key in sorted((entry, key) for key, entry in self.entries.items()):
            if entry.start != at:
                raise self._fail(
                    f"tensor {key[:80]!r} starts at data byte {entry.start - base}, expected {at - base} "
                    "(tensors must cover the data once, back to back)"
                )
            at = entry.end
        if at != size:
            raise self._fail(f"the tensors end at file byte {at}, the file at {size}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def tensor(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor `key` (only `rows` of its first dimension, a step-1 slice, when given), read from the file."""
        entry = self.entries[key]
        dtype = DTYPES[entry.dtype]
        shape, start = list(entry.shape), entry.start
        if rows is not None and shape:
            first, last, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("rows must be a slice of step 1")
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            shape[0], start = max(0, last - first), start + first * row_bytes
        value = torch.empty(shape, dtype=dtype)
        nbytes = value.numel() * value.element_size()
        self.file.check_range(start, nbytes, f"tensor {key[:80]!r}")
        if nbytes:
            self.file.readinto(value.view(-1).view(torch.uint8).numpy(), start)
        return value

    def get_slice(self, key: str, index: tuple[Any, ...]) -> torch.Tensor:
        """`tensor(key)[index]`, reading only the rows the index's first entry selects when the rest take all."""
        if index and isinstance(index[0], slice) and index[0].step in (None, 1):
            if all(part == slice(None) for part in index[1:]):
                return self.tensor(key, index[0])
        return self.tensor(key)[index]


@contextlib.contextmanager
def open_safetensors(
    path: str | Path,
    *,
    within: str | Path | None = None,
    error: type[ExportError] = ExportError,
    what: str = "a safetensors file",
) -> Iterator[SafetensorsFile]:
    """A safetensors file opened with `safe_read.open_regular` (a regular file, inside `within`) and its header
    checked; tensors are read from the descriptor, never through a memory map."""
    with open_regular(path, within=within, error=error, what=what) as file:
        try:
            yield SafetensorsFile(file, error)
        except OSError as exc:
            raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
