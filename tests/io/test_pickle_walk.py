"""check_pickle's two walks (io/torch_save.py): the C one (megatron_peft_export/_pickle_walk.c, built by
`pip install -e .`) answers exactly as the Python reference on every pickle: what torch and the pickler write,
pickles generated opcode by opcode, mutated ones, every prefix of the hostile corpus. The answer compared is the
refusal itself (code, byte, values), so both refuse the same pickles at the same opcode with the same limits."""

import logging
import os
import pickle
import pickletools
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_peft_export.io import torch_save
from megatron_peft_export.io.torch_save import check_pickle, walk_pickle
from tests.offline.test_dcp_metadata import _with_plans, metadata  # noqa: F401 (a fixture)
from tests.support import hostile_pickles as hp

C_WALK = torch_save._accelerated()


def test_the_c_walk_is_built_where_ci_runs():
    """CI installs with `pip install -e .`, which builds the C walk: missing there is a failure, not a slower run."""
    if C_WALK is None:
        message = "the C walk of check_pickle (megatron_peft_export._pickle_walk) is not built: pip install -e ."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def test_without_the_c_walk_one_warning_says_how_to_get_it(monkeypatch, caplog):
    """A user without a compiler gets a working check that is ~100x slower: the log says so once, and what to do."""
    monkeypatch.setitem(sys.modules, "megatron_peft_export._pickle_walk", None)  # its import raises ImportError
    torch_save._accelerated.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="megatron_peft_export"):
            assert check_pickle(pickle.dumps({"a": [1, 2]})) is None
            assert check_pickle(pickle.dumps([3])) is None
    finally:
        torch_save._accelerated.cache_clear()
    warned = [r.getMessage() for r in caplog.records if "C walk" in r.getMessage()]
    assert len(warned) == 1 and "pip install -e ." in warned[0], warned


def _same(data: bytes):
    """Both walks' answer to `data`, asserted equal; the answer."""
    expected = walk_pickle(data)
    if C_WALK is not None:
        assert C_WALK(data, torch_save._TABLES) == expected, data[:200]
    return expected


def _doubled(times: int) -> bytes:
    return b")\x94" + b"".join(b"0h" + bytes([n]) + b"h" + bytes([n]) + b"\x86\x94" for n in range(times))


def _one_size_as_many_keys(size: bytes = b"ctorch\nSize\n(" + b"K\x01" * 2000 + b"t\x85R") -> bytes:
    """{torch.Size([1] * 2000): 1} with that key 4000 times: torch.Size is a tuple (its hash walks its items), made by
    a call; 24 KB that hash 8 million items (quadratic in the pickle's size)."""
    return b"\x80\x02" + size + b"\x94" + b"0}(" + b"h\x00K\x01" * 4000 + b"u."


def _frame(length: int) -> bytes:
    return b"\x95" + length.to_bytes(8, "little")


HOSTILE = {
    "shared-tuple key": hp.tuple_bomb_key(),
    "deep key": hp.deep_tuple_key(2000),
    "100 deep": hp.dict_keyed_by(b"K\x00" + b"\x85" * 100),
    "101 deep": hp.dict_keyed_by(b"K\x00" + b"\x85" * 101),
    "101 deep, TUPLE3": hp.dict_keyed_by(b"K\x00" + b"K\x00K\x00\x87" * 101),
    "101 deep, TUPLE": hp.dict_keyed_by(b"(" * 101 + b"K\x00" + b"t" * 101),
    "shared set item": b"\x80\x04\x8f(" + _doubled(20) + b"\x90.",
    "shared frozenset": b"\x80\x04(" + _doubled(20) + b"\x91.",
    "shared call argument": b"\x80\x02cbuiltins\nset\n" + _doubled(20) + b"\x85R.",
    "shared DICT key": b"\x80\x02(" + _doubled(20) + b"K\x01d.",
    "shared PUT/GET key": b"}(tp0\n0"
    + b"".join(b"g%d\ng%d\n\x86p%d\n0" % (n, n, n + 1) for n in range(20))
    + b"g20\nK\x01s.",
    "SETITEM on nothing": b"\x80\x02s.",
    "one torch.Size as many keys": _one_size_as_many_keys(),
    "one torch.Size as many keys, OBJ": _one_size_as_many_keys(b"(ctorch\nSize\n(" + b"K\x01" * 2000 + b"to"),
    "LONG_BINPUT past the size": b"\x80\x02]r\xff\xff\xff\x7f.",
    "PUT past the size": b"]p99999999999\n.",
    "PUT of 19 digits": b"]p0000000000000000001\n.",
    "PUT of a sign": b"]p+1\n.",
    "BYTEARRAY8": b"\x80\x05\x96" + (1 << 40).to_bytes(8, "little") + b".",
    "BINUNICODE8 past int64": b"\x80\x04\x8d" + (1 << 63).to_bytes(8, "little") + b".",
    "BINSTRING negative": b"T\xff\xff\xff\xff.",
    "cut length": pickle.dumps(b"x" * 10)[:-3],
    "no STOP": b"N",
    "unknown opcode": b"\xff.",
    "unterminated line": b"cbuiltins\nset",
    "huge int": hp.in_a_dict("seed", hp.huge_int(4000)),
    "shared lists": hp.in_a_dict("args", hp.opcodes(hp.shared_lists())),
    "many classes": hp.many_classes(50),
    "bytearray call": hp.call_pickle("__builtin__", "bytearray", b"J\x00\x00\x00\x40"),
    "MEMOIZE after PUTs": b"\x80\x04]r\x05\x00\x00\x00]\x94]\x94h\x01h\x05\x86.",
    "POP of a mark": b"(0)\x85.",
    "marked op below the mark": b"K\x01(b.",
    "DUP on nothing": b"2t.",
    "frame ending inside an opcode": b"\x80\x04" + _frame(5) + b"K\x01J\x10\x00\x00\x00.",
    "frame ending at an opcode's end": b"\x80\x04" + _frame(2) + b"K\x01J\x10\x00\x00\x00.",
    "frame longer than the data": b"\x80\x04" + _frame(1 << 40) + b"K\x01.",
    "frame of the whole pickle": b"\x80\x04" + _frame(3) + b"K\x01.",
    "empty frame": b"\x80\x04" + _frame(0) + b"K\x01.",
    "FRAME inside a frame": b"\x80\x04" + _frame(13) + b"K\x01" + _frame(2) + b"K\x01\x86.",
    "FRAME ending a frame": b"\x80\x04" + _frame(11) + b"K\x01" + _frame(3) + b"K\x01\x86.",
    "FRAME crossing a frame's end": b"\x80\x04" + _frame(5) + b"K\x01" + _frame(3) + b"K\x01\x86.",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_both_walks_answer_the_same_on_the_hostile_corpus_and_its_prefixes(name):
    data = HOSTILE[name]
    for cut in sorted({*range(0, len(data), max(1, len(data) // 300)), len(data) - 1, len(data)}):
        _same(data[:cut])


def test_the_hostile_corpus_is_refused_by_both():
    accepted = {"100 deep", "shared lists", "many classes", "bytearray call", "huge int"}
    accepted |= {"MEMOIZE after PUTs", "POP of a mark", "DUP on nothing"}  # the unpickler refuses the last
    accepted |= {"frame ending at an opcode's end", "frame of the whole pickle", "empty frame", "FRAME ending a frame"}
    for name, data in HOSTILE.items():
        assert (_same(data) is None) == (name in accepted), name


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_both_walks_pass_what_the_pickler_and_torch_write(metadata, protocol):  # noqa: F811
    data, _ = _with_plans(metadata, protocol=min(protocol, 2))
    assert _same(data) is None
    assert _same(pickle.dumps(metadata, protocol=protocol)) is None
    assert _same(pickle.dumps({"a": ((2, 3), (64, 1)), "b": frozenset({(1, 2)}), (1, (2,)): 3}, protocol)) is None
    # protocol 4 on: large strings and bytes written between frames, the opcodes around them in frames
    large = {"a": b"x" * (1 << 17), "b": "y" * (1 << 17), "c": list(range(20000)), "d": bytearray(1 << 17)}
    assert _same(pickle.dumps(large, protocol)) is None
    assert _same(pickle._dumps(large, protocol)) is None  # the pure-Python pickler frames as the C one


def test_a_frame_is_refused_where_the_pure_python_unpickler_refuses_it():
    """pickle.py's unpickler reads frames strictly (an opcode crossing a frame's end, a FRAME inside a frame), the C
    one reads on: the walks refuse what pickle.py refuses, so every unpickler reads the same or nothing."""
    for name, data in HOSTILE.items():
        if name.startswith(("frame", "FRAME", "empty frame")) and name != "frame longer than the data":
            try:
                pickle._loads(data)
            except pickle.UnpicklingError:
                assert _same(data) is not None, name
            else:
                assert _same(data) is None, name


_ATOMS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=5), st.binary(max_size=5))
_HASHABLE = st.recursive(
    _ATOMS, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=12
)
_OBJECTS = st.recursive(
    _HASHABLE,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner, inner)
        | st.dictionaries(_HASHABLE, inner, max_size=4)
        | st.sets(_HASHABLE, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_OBJECTS, st.integers(0, pickle.HIGHEST_PROTOCOL), st.booleans())
def test_both_walks_pass_every_pickled_object(obj, protocol, shared):
    """What the pickler writes of plain data (tuple keys, frozensets, the same object twice through the memo)."""
    obj = [obj, obj] if shared else obj
    assert _same(pickle.dumps(obj, protocol=protocol)) is None


def _argument(op) -> st.SearchStrategy:
    """Bytes for opcode `op`'s argument: mostly well formed, sometimes not."""
    arg = op.arg
    if arg is None:
        return st.just(b"")
    if op.name in ("BINGET", "BINPUT"):
        return st.integers(0, 6).map(lambda n: bytes([n]))
    if op.name in ("LONG_BINGET", "LONG_BINPUT"):
        return st.integers(0, 6).map(lambda n: n.to_bytes(4, "little")) | st.binary(min_size=4, max_size=4)
    if op.name in ("PUT", "GET"):
        return st.sampled_from([b"0\n", b"1\n", b" 2 \n", b"3\r\n", b"x\n", b"-1\n", b"99999999\n", b"\n", b"0" * 20])
    if arg.n >= 0:
        return st.binary(min_size=arg.n, max_size=arg.n)
    if arg.name == "stringnl_noescape_pair":
        return st.sampled_from([b"builtins\nset\n", b"a\n", b"x\ny\n", b""])
    if arg.n == pickletools.UP_TO_NEWLINE:
        return st.sampled_from([b"1\n", b"abc\n", b"", b"'x'\n", b"1.5\n"])
    width = {
        pickletools.TAKEN_FROM_ARGUMENT1: 1,
        pickletools.TAKEN_FROM_ARGUMENT4: 4,
        pickletools.TAKEN_FROM_ARGUMENT4U: 4,
        pickletools.TAKEN_FROM_ARGUMENT8U: 8,
    }[arg.n]
    return st.builds(
        lambda n, body, lie: ((n + lie) % (1 << 8 * width)).to_bytes(width, "little") + body,
        st.integers(0, 6),
        st.binary(max_size=6),
        st.sampled_from([0, 0, 0, 1, 3, -1, -5, 1 << 40]),
    )


_STACK_OPS = [op for op in pickletools.opcodes if op.name != "STOP"]


def _token() -> st.SearchStrategy:
    hot = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "MEMOIZE", "BINGET", "BINPUT", "MARK", "SETITEM"}
    hot |= {"SETITEMS", "EMPTY_DICT", "DICT", "FROZENSET", "ADDITEMS", "EMPTY_SET", "REDUCE", "BUILD", "DUP", "POP"}
    hot |= {"BININT1", "NONE", "APPENDS", "EMPTY_LIST", "GET", "PUT", "LONG_BINGET", "NEWOBJ", "POP_MARK"}
    ops = _STACK_OPS + [op for op in _STACK_OPS if op.name in hot] * 6
    return st.sampled_from(ops).flatmap(lambda op: _argument(op).map(lambda arg: op.code.encode("latin1") + arg))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 12), st.lists(_token(), max_size=60), st.booleans(), st.binary(max_size=2))
def test_both_walks_answer_the_same_on_generated_opcodes(items, tokens, stop, tail):
    """Opcodes after `items` small integers on the stack (so that fewer stop at an empty stack)."""
    _same(b"K\x01" * items + b"".join(tokens) + (b"." if stop else tail))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _OBJECTS, st.integers(0, pickle.HIGHEST_PROTOCOL), st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=3)))
)
def test_both_walks_answer_the_same_on_mutated_pickles(obj, protocol, edits):
    data = bytearray(pickle.dumps([obj, obj], protocol=protocol))
    for at, replacement in edits:
        at %= len(data) + 1
        data[at : at + len(replacement)] = replacement
    _same(bytes(data))


def test_check_pickle_refuses_the_corpus_in_words_through_either_walk(walk):
    for data, message in [
        (hp.tuple_bomb_key(), "a tuple of shared tuples holding more items than the pickle has bytes, at byte"),
        (hp.deep_tuple_key(), "a tuple nested 101 deep (at most 100), at byte 105"),
        (HOSTILE["BYTEARRAY8"], "an opcode at byte 2 declares 1099511627776 bytes, 1 follow"),
        (HOSTILE["BINUNICODE8 past int64"], f"an opcode at byte 2 declares {1 << 63} bytes, 1 follow"),
        (HOSTILE["BINSTRING negative"], "an opcode at byte 0 declares -1 bytes, 1 follow"),
        (HOSTILE["shared set item"], "a tuple of shared tuples"),
        (HOSTILE["one torch.Size as many keys"], "the pickle hashes far more items than it holds"),
        (b"\x80\x02s.", "an opcode at byte 2 takes more items than the stack holds"),
        (HOSTILE["PUT of 19 digits"], "a bad memo index at byte 1"),
        (HOSTILE["unknown opcode"], "unknown pickle opcode 0xff at byte 0"),
        (b"N", "the pickle ends before its STOP opcode"),
        (
            HOSTILE["frame ending inside an opcode"],
            "the frame of the FRAME at byte 2 ends at byte 16, inside an opcode that ends at byte 18 (a frame ends "
            "where an opcode ends)",
        ),
        (
            HOSTILE["FRAME inside a frame"],
            "a FRAME at byte 13 begins a frame inside the frame that ends at byte 24 (a frame begins where the one "
            "before ends)",
        ),
        (HOSTILE["frame longer than the data"], "an opcode at byte 2 declares 1099511627776 bytes, 3 follow"),
    ]:
        with pytest.raises(ValueError) as refused:
            check_pickle(data)
        assert message in str(refused.value)
