"""Small crafted pickles and torch.save files that attack the unpickler's resources rather than run code: each is a
few hundred bytes to a few MB, and each made an unguarded reader crash, hang or allocate without bound.

Built by hand (opcodes) or by pickling shared structures: building them never hashes or walks them, so making them
costs nothing."""

from __future__ import annotations

import io
import pickle
import zipfile

SETITEM_ONE = b"K\x01s."
"""After a key on a dict: the value 1, SETITEM, STOP."""


def shared_lists(depth: int = 12, width: int = 32) -> list:
    """A list holding one list `width` times, `depth` levels deep: ~800 bytes pickled, width^depth items walked."""
    value: list = [0]
    for _ in range(depth):
        value = [value] * width
    return value


def shared_tuples(depth: int = 12, width: int = 32) -> tuple:
    value: tuple = (0,)
    for _ in range(depth):
        value = (value,) * width
    return value


def dict_keyed_by(key_opcodes: bytes) -> bytes:
    """A protocol-2 pickle of {KEY: 1} whose key is built by `key_opcodes`: the unpickler hashes it at SETITEM."""
    return b"\x80\x02}" + key_opcodes + SETITEM_ONE


def tuple_bomb_key() -> bytes:
    """{shared_tuples(): 1}: hashing the key walks 32^12 items (pickle.dumps of the dict itself would hash it)."""
    return dict_keyed_by(pickle.dumps(shared_tuples(), protocol=2)[2:-1])


def deep_tuple_key(depth: int = 200_000) -> bytes:
    """{((((0,),),)...): 1} nested `depth` deep: CPython hashes tuples recursively with no depth check (a C stack
    overflow: SIGSEGV)."""
    return dict_keyed_by(b"K\x00" + b"\x85" * depth)


def global_pickle(module: str, name: str) -> bytes:
    """A pickle that only names `module.name` (GLOBAL) and returns it."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."


def call_pickle(module: str, name: str, argument: bytes) -> bytes:
    """module.name(ARGUMENT) with a pickled argument's opcodes (protocol 2 REDUCE)."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + argument + b"\x85R."


def huge_int(bits: int = 40_000) -> bytes:
    """LONG4 opcodes of a positive integer of about `bits` bits (str() of it raises ValueError)."""
    body = (1 << bits).to_bytes(bits // 8 + 1, "little")
    return b"\x8b" + len(body).to_bytes(4, "little") + body


def many_classes(count: int, module: str = "numpy") -> bytes:
    """A list of `count` distinct classes of `module` (each one a new class object to a reader that builds them)."""
    body = b"".join(b"c" + module.encode() + b"\nC" + str(n).encode() + b"\na" for n in range(count))
    return b"\x80\x02]" + body + b"."


def with_data_pkl(data_pkl: bytes, obj_prefix: str = "archive", storages: dict[str, bytes] | None = None) -> bytes:
    """A torch.save-format zip (stored members) with this data.pkl."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{obj_prefix}/data.pkl", data_pkl)
        z.writestr(f"{obj_prefix}/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"{obj_prefix}/data/{key}", data)
    return out.getvalue()


def in_a_dict(key: str, value_opcodes: bytes) -> bytes:
    """{key: VALUE} (protocol 2), the value given as opcodes (without PROTO and STOP)."""
    encoded = key.encode()
    return b"\x80\x02}X" + len(encoded).to_bytes(4, "little") + encoded + value_opcodes + b"s."


def opcodes(obj) -> bytes:
    """The opcodes pickling `obj` (protocol 2) without PROTO and STOP, to embed in a crafted pickle."""
    return pickle.dumps(obj, protocol=2)[2:-1]
