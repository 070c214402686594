"""Decode one tensor written by ``torch.save`` (the zip format) from bytes in memory, without copying it.

torch.distributed.checkpoint stores every tensor of a torch_dist checkpoint as such a blob inside a `.distcp`
file. ``torch.load`` of a small blob costs ~1 ms in unpickler and fake-tensor checks, which dominated the offline
export of adapters with hundreds of tensors (bench/); this decoder costs tens of microseconds. It accepts only
the plain case: a stored (uncompressed) zip whose ``data.pkl`` rebuilds one dense tensor from one typed storage,
little-endian. Anything else raises NotPlainTensor, and the caller lets torch read the item.
"""

from __future__ import annotations

import functools
import io
import pickle
import struct
import warnings
from collections import OrderedDict
from typing import Any, NamedTuple

import torch


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
        return {name: cls.dtype for name, cls in classes.items() if isinstance(getattr(cls, "dtype", None), torch.dtype)}


class _TensorPickle(pickle.Unpickler):
    """`data.pkl` of a saved tensor: torch's rebuild call, a typed storage reference and OrderedDict, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _storage_dtypes():
            return _storage_dtypes()[name]
        raise NotPlainTensor(f"data.pkl names {module}.{name}")

    def persistent_load(self, pid: Any) -> tuple[str, torch.dtype, int]:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise NotPlainTensor(f"unexpected storage reference {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise NotPlainTensor(f"unexpected storage type {dtype!r}")
        return str(key), dtype, int(numel)


_EOCD = struct.Struct("<4s4H2LH")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")


def _members(blob: memoryview) -> dict[str, tuple[int, int]]:
    """Zip member name -> (offset of its data in `blob`, size), for stored (uncompressed) members."""
    if bytes(blob[-_EOCD.size: -_EOCD.size + 4]) == b"PK\x05\x06":  # torch writes no zip comment: the end record is last
        tail, at = blob, len(blob) - _EOCD.size
    else:
        tail = bytes(blob[max(0, len(blob) - 65557):])
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _EOCD.size:
            raise NotPlainTensor("no zip end record")
    *_, count, directory_size, directory_offset, _comment = _EOCD.unpack_from(tail, at)
    if directory_offset == 0xFFFFFFFF or directory_offset + directory_size > len(blob):
        raise NotPlainTensor("zip64 or a central directory outside the blob")
    members, p = {}, directory_offset
    for _ in range(count):
        fields = _CENTRAL.unpack_from(blob, p)
        if fields[0] != b"PK\x01\x02":
            raise NotPlainTensor("bad central directory entry")
        method, size, name_len, extra_len, comment_len, local = fields[4], fields[9], fields[10], fields[11], fields[12], fields[16]
        name = bytes(blob[p + _CENTRAL.size: p + _CENTRAL.size + name_len]).decode()
        p += _CENTRAL.size + name_len + extra_len + comment_len
        header = _LOCAL.unpack_from(blob, local)
        if header[0] != b"PK\x03\x04" or method != 0 or size == 0xFFFFFFFF:
            raise NotPlainTensor(f"zip member {name} is compressed or zip64")
        start = local + _LOCAL.size + header[9] + header[10]
        if start + size > len(blob):
            raise NotPlainTensor(f"zip member {name} runs past the blob")
        members[name] = (start, size)
    return members


@functools.lru_cache(maxsize=4096)
def _unpickled(pickled: bytes) -> _Rebuilt:
    """A data.pkl's tensor description; cached, as the tensors of one shape and dtype share the same data.pkl bytes."""
    try:
        rebuilt = _TensorPickle(io.BytesIO(pickled)).load()
    except NotPlainTensor:
        raise
    except Exception as exc:
        raise NotPlainTensor(f"data.pkl: {type(exc).__name__}: {exc}") from exc
    if not isinstance(rebuilt, _Rebuilt):
        raise NotPlainTensor(f"data.pkl holds a {type(rebuilt).__name__}, not a tensor")
    return rebuilt


def decode(blob: bytearray) -> torch.Tensor:
    """The tensor in a torch.save blob, sharing `blob`'s memory."""
    view = memoryview(blob)
    members = _members(view)
    pickled = next((name for name in members if name.endswith("/data.pkl")), None)
    if pickled is None:
        raise NotPlainTensor("no data.pkl")
    prefix = pickled[: -len("data.pkl")]
    order = members.get(prefix + "byteorder")
    if order is not None and bytes(view[order[0]: order[0] + order[1]]) != b"little":
        raise NotPlainTensor("not little-endian")
    start, size = members[pickled]
    rebuilt = _unpickled(view[start: start + size].tobytes())
    key, dtype, numel = rebuilt.storage
    data = members.get(f"{prefix}data/{key}")
    if data is None or data[1] != numel * dtype.itemsize:
        raise NotPlainTensor(f"storage {key} missing or of the wrong size")
    storage = torch.frombuffer(blob, dtype=dtype, count=numel, offset=data[0]) if numel else torch.empty(0, dtype=dtype)
    needed = rebuilt.offset + sum((n - 1) * s for n, s in zip(rebuilt.size, rebuilt.stride)) + 1
    if 0 not in rebuilt.size and needed > numel:
        raise NotPlainTensor("the tensor reaches past its storage")
    return storage.as_strided(rebuilt.size, rebuilt.stride, rebuilt.offset)

