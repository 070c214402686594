""".metadata read by the C reader (megatron_peft_export/_dcp_metadata.c) against the Python path (the reference): on
files torch and Megatron's layout write it reads the same facts; on anything else (hostile edits, byte flips,
truncations, objects changed after the fact) it reads the same facts or declines, so that parse_metadata's result or
refusal is the same with the reader on and forced off."""

import dataclasses
import io
import logging
import os
import pickle
import random
import sys

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from megatron_peft_export.offline import dcp_metadata
from megatron_peft_export.offline.dcp_metadata import parse_metadata
from tests.offline.test_dcp_metadata import (
    _after_plans,
    _bool_offset,
    _bytes_with_fields,
    _extra,
    _get,
    _huge_length,
    _index,
    _index_fqn,
    _negative,
    _outside,
    _retype,
    _size_not_int,
    _with_plans,
    torch_written,
)

C_READER = dcp_metadata._reader()


def test_the_c_reader_is_built_where_ci_runs():
    """CI installs with `pip install -e .`, which builds the C reader: missing there is a failure, not a slower run."""
    if C_READER is None:
        message = "the C reader of .metadata (megatron_peft_export._dcp_metadata) is not built: pip install -e ."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


needs_c = pytest.mark.skipif(C_READER is None, reason="the C reader was not built")


@pytest.fixture
def written(tmp_path):
    """A .metadata as torch.distributed.checkpoint writes it (bytes), and what torch reads of it."""
    data = torch_written(tmp_path)
    return data, pickle.loads(data)  # the test's own file


def _c(data: bytes):
    """The C reader's CheckpointMetadata, or None when it declines."""
    dcp_metadata._checked(data)
    return dcp_metadata._read_compact(data)


def _facts(parsed):
    """Everything a CheckpointMetadata says, each lazily read value read (a refusal on reading is a fact too)."""
    facts = [list(parsed.sizes.items()), sorted(parsed.byte_keys), list(parsed.tensors)]
    for key in parsed.tensors:
        try:
            facts.append((key, parsed.tensors[key]))
        except dcp_metadata.MetadataError as exc:
            facts.append((key, "refused", str(exc)))
    try:
        facts.append(list(parsed.items.items()))
    except dcp_metadata.MetadataError as exc:
        facts.append(("items refused", str(exc)))
    return facts


def _outcome(data: bytes, monkeypatch, c: bool):
    """parse_metadata's facts, or its refusal (type and message), with the C reader on or forced off."""
    with monkeypatch.context() as patch:
        if not c:
            patch.setattr(dcp_metadata, "_reader", lambda: None)
        try:
            return _facts(parse_metadata(data))
        except Exception as exc:  # whatever the Python path raises, the C reader's path raises the same
            return type(exc), str(exc)


def _same(data: bytes, monkeypatch) -> bool:
    """Same outcome with the C reader on and off; whether the C reader read it (not declined)."""
    on, off = _outcome(data, monkeypatch, True), _outcome(data, monkeypatch, False)
    assert on == off
    try:
        return _c(data) is not None
    except dcp_metadata.MetadataError:
        return False


def _check_types(parsed):
    for entry in parsed.tensors.values():
        assert type(entry) is dcp_metadata.TensorEntry and all(type(c) is dcp_metadata.Chunk for c in entry.chunks)
        assert all(type(v) is int for c in entry.chunks for v in (*c.offsets, *c.sizes))
    for key, item in parsed.items.items():
        assert type(item) is dcp_metadata.StoredItem and (key[1] is None or type(key[1]) is tuple)


@needs_c
def test_the_file_torch_writes_is_read_by_the_c_reader_as_torch_reads_it(written, monkeypatch):
    data, metadata = written
    parsed = _c(data)
    assert parsed is not None
    _check_types(parsed)
    tensors = {k: v for k, v in metadata.state_dict_metadata.items() if not isinstance(v, BytesStorageMetadata)}
    assert list(parsed.tensors) == list(tensors) and parsed.byte_keys == {"blob.not"}
    for key, entry in tensors.items():  # expected values from torch's own reading
        got = parsed.tensors[key]
        assert got.dtype == entry.properties.dtype and got.size == tuple(entry.size)
        assert [(c.offsets, c.sizes) for c in got.chunks] == [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
    assert len(parsed.items) == len(metadata.storage_data)
    for index, info in metadata.storage_data.items():
        item = parsed.items[(index.fqn, None if index.offset is None else tuple(index.offset))]
        assert (item.relative_path, item.offset, item.length) == (info.relative_path, info.offset, info.length)
    assert _same(data, monkeypatch)


@needs_c
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_megatrons_layout_is_read_by_the_c_reader(written, monkeypatch, protocol):
    """The metadata with Megatron's cached save plans (its layout of `.metadata`), at every pickle protocol from 2."""
    data, _ = _with_plans(written[1], protocol)
    assert _same(data, monkeypatch)
    assert _same(pickle.dumps(written[1], protocol=protocol), monkeypatch)


_EDITS = [
    *[_extra(t) for t in ("metadata", "tensor", "chunk", "item")],
    _retype,
    _bytes_with_fields,
    _outside,
    _negative,
    _bool_offset,
    _huge_length,
    _index("x"),
    _index(-1),
    _size_not_int,
    _index_fqn,
]


def _size_as_list(metadata):
    metadata.state_dict_metadata["a"].size = [8, 16]


def _offsets_as_tuple(metadata):
    metadata.state_dict_metadata["a"].chunks[0].offsets = (0, 0)


def _transforms(value):
    def edit(metadata):
        next(v for k, v in metadata.storage_data.items() if k.fqn == "a").transform_descriptors = value

    return edit


def _path(value):
    def edit(metadata):
        next(v for k, v in metadata.storage_data.items() if k.fqn == "b").relative_path = value

    return edit


def _dtype_as_name(metadata):
    properties = metadata.state_dict_metadata["a"].properties
    object.__setattr__(properties, "dtype", "float32")


def _key(value):
    def edit(metadata):
        metadata.state_dict_metadata[value] = metadata.state_dict_metadata.pop("a")

    return edit


def _chunks_as_tuple(metadata):
    entry = metadata.state_dict_metadata["a"]
    entry.chunks = tuple(entry.chunks)


def _no_chunks(metadata):
    metadata.state_dict_metadata["a"].chunks = []


def _index_offsets_none(metadata):
    index = next(k for k in metadata.storage_data if k.fqn == "a")
    metadata.storage_data[dataclasses.replace(index, offset=None)] = metadata.storage_data.pop(index)


def _large_numbers(metadata):
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == "a")
    info.offset, info.length = (1 << 40) + 3, (1 << 48)


def _index_number(metadata):
    index = next(k for k in metadata.storage_data if k.fqn == "a")
    metadata.storage_data[dataclasses.replace(index, index=3)] = metadata.storage_data.pop(index)


def _extra_key_item(metadata):
    info = next(iter(metadata.storage_data.values()))
    metadata.storage_data[MetadataIndex(fqn="zz", offset=torch.Size([0, 0]))] = info
    metadata.storage_data[MetadataIndex(fqn="a", offset=None)] = info


_MORE_EDITS = [
    _size_as_list,
    _offsets_as_tuple,
    _transforms([]),
    _transforms(()),
    _transforms(None),
    _transforms(["zstd"]),
    _transforms(""),
    _path("../x"),
    _path(""),
    _path("a\0b"),
    _path("é.distcp"),
    _dtype_as_name,
    _key(1),
    _key(("a",)),
    _key("é"),
    _chunks_as_tuple,
    _no_chunks,
    _index_offsets_none,
    _large_numbers,
    _index_number,
    _extra_key_item,
]


@needs_c
@pytest.mark.parametrize("edit", _EDITS + _MORE_EDITS, ids=lambda edit: getattr(edit, "__qualname__", "edit"))
@pytest.mark.parametrize("plans", [False, True])
def test_an_edited_metadata_reads_the_same_with_the_c_reader_on_and_off(written, monkeypatch, edit, plans):
    """Hostile or unusual fields: the same facts or the same refusal (the C reader declines what it does not read)."""
    metadata = written[1]
    edit(metadata)
    data = _with_plans(metadata)[0] if plans else pickle.dumps(metadata)
    _same(data, monkeypatch)


@needs_c
def test_what_the_c_reader_reads_of_unusual_but_valid_fields(written, monkeypatch):
    """Valid fields torch may write (no transforms, large offsets, an index number, items of other keys) are read
    by the C reader, not declined."""
    for edit in (_transforms([]), _transforms(None), _large_numbers, _index_number, _extra_key_item, _no_chunks):
        metadata = pickle.loads(written[0])
        edit(metadata)
        assert _same(pickle.dumps(metadata), monkeypatch), edit


_OFFSET = b"\x8c\x06offsetJ" + (4096).to_bytes(4, "little")


def _item_of(metadata, key):
    return next(v for k, v in metadata.storage_data.items() if k.fqn == key)


_CHANGES = {  # opcodes after the plans (of the metadata and each object's memo index); whether the C reader reads it
    "build on an item": (lambda md, m: _get(m[id(_item_of(md, "a"))]) + b"}(" + _OFFSET + b"ub0", True),
    "build twice": (lambda md, m: (_get(m[id(_item_of(md, "a"))]) + b"}(" + _OFFSET + b"ub0") * 2, True),
    "setitem into storage": (
        lambda md, m: (
            _get(m[id(md.storage_data)])
            + _get(m[id(next(k for k in md.storage_data if k.fqn == "a"))])
            + _get(m[id(_item_of(md, "b"))])
            + b"s0"
        ),
        True,
    ),
    "a key set again": (
        lambda md, m: (
            _get(m[id(md.state_dict_metadata)]) + b"\x8c\x01a" + _get(m[id(md.state_dict_metadata["blob.not"])]) + b"s0"
        ),
        True,
    ),
    "a new byte key": (
        lambda md, m: (
            _get(m[id(md.state_dict_metadata)])
            + b"\x8c\x02zz"
            + _get(m[id(md.state_dict_metadata["blob.not"])])
            + b"s0"
        ),
        True,
    ),
    "build on a tensor's properties": (
        lambda md, m: _get(m[id(md.state_dict_metadata["a"].properties)]) + b"Nb0",
        False,
    ),
    "build with slot state": (lambda md, m: _get(m[id(_item_of(md, "a"))]) + b"N}(" + _OFFSET + b"u\x86b0", False),
    "a list appended to": (lambda md, m: _get(m[id(md.state_dict_metadata["a"].chunks)]) + b"Na0", False),
}


@needs_c
@pytest.mark.parametrize("change", list(_CHANGES))
def test_objects_changed_after_the_plans_read_the_same(written, monkeypatch, change):
    """BUILD on a memoized record, SETITEMS into storage_data or state_dict_metadata through the memo, and changes
    the C reader does not model: it reads what torch reads, or declines; never what was read before the change."""
    opcodes_of, read = _CHANGES[change]
    metadata = pickle.loads(written[0])
    data, memo = _with_plans(metadata)
    data = _after_plans(data, opcodes_of(metadata, memo))
    assert _same(data, monkeypatch) == read


@needs_c
def test_a_state_dict_changed_after_its_build_is_declined_and_read_as_torch_reads_it(written, monkeypatch):
    """SETITEM into the dict a BUILD read (its record keeps what it had): the C reader declines it; the Python path
    reads the record as it was built."""
    metadata = written[1]
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == "a")
    data, memo = _with_plans(metadata)
    # the memo index of the info's state dict: the first EMPTY_DICT memoized after the info's record
    ops = [(op.name, arg, pos) for op, arg, pos in __import__("pickletools").genops(data)]
    at = next(n for n, (name, arg, _) in enumerate(ops) if name in ("BINPUT", "LONG_BINPUT") and arg == memo[id(info)])
    state = next(ops[n + 1][1] for n in range(at, len(ops)) if ops[n][0] == "EMPTY_DICT")
    data = _after_plans(data, _get(state) + b"\x8c\x06offsetJ" + (4096).to_bytes(4, "little") + b"s0")
    assert not _same(data, monkeypatch)
    assert parse_metadata(data).items[("a", (0, 0))].offset == info.offset


@needs_c
def test_byte_flips_and_truncations_read_the_same(written, monkeypatch):
    """Random byte changes and truncations of Megatron's layout: the same facts or the same refusal, on and off."""
    rng = random.Random(18)
    data, _ = _with_plans(written[1], 4)
    read = 0
    for n in range(600):
        mutated = bytearray(data)
        if n % 5 == 0:
            mutated = mutated[: rng.randrange(len(mutated))]
        else:
            for _ in range(rng.choice([1, 1, 2, 4])):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        read += _same(bytes(mutated), monkeypatch)
    assert read >= 10  # some flips change values the reader reads (a number, a letter of a key)


@needs_c
def test_pickles_it_does_not_model_are_declined(written, monkeypatch):
    """Opcodes, globals and values outside what torch writes are declined, then read (or refused) by the Python
    path as before."""
    metadata = written[1]
    for value in ({1, 2}, b"bytes", bytearray(b"x"), 1.5, 1 << 70, frozenset(), (1,) * 3, {1: 2}, "\udc80"):
        metadata.planner_data = value
        data = pickle.dumps(metadata, protocol=4)
        assert _same(data, monkeypatch) == (type(value) in (float, tuple)), value
    for protocol in (0, 1):  # text opcodes: declined
        assert not _same(pickle.dumps(written[1], protocol=protocol), monkeypatch)


@needs_c
def test_the_c_reader_knows_only_the_globals_find_class_allows():
    tables, dtypes = dcp_metadata._reader_tables()
    unpickler = dcp_metadata._MetadataUnpickler(io.BytesIO(b""))
    for module, name, kind, arg in tables[0]:
        found = unpickler.find_class(module.decode(), name.decode())
        if kind == dcp_metadata._GLOBAL_KINDS.index("dtype"):
            assert found is dtypes[arg]
    assert torch.bfloat16 in dtypes and torch.float32 in dtypes
    names = {(m.decode(), n.decode()) for m, n, *_ in tables[0]}
    assert ("builtins", "eval") not in names and ("torch", "load") not in names


@needs_c
def test_without_the_c_reader_the_python_path_reads_and_warns_once(written, monkeypatch, caplog):
    """The extension not built: one warning, and the Python path reads the same facts."""
    expected = _facts(parse_metadata(written[0]))
    dcp_metadata._reader.cache_clear()
    monkeypatch.setitem(sys.modules, "megatron_peft_export._dcp_metadata", None)
    try:
        with caplog.at_level(logging.WARNING, logger="megatron_peft_export"):
            assert _facts(parse_metadata(written[0])) == expected
            assert _facts(parse_metadata(written[0])) == expected
        assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
        assert "reading checkpoint metadata in Python" in caplog.records[0].message
    finally:
        monkeypatch.undo()
        dcp_metadata._reader.cache_clear()
    assert dcp_metadata._reader() is not None


@needs_c
def test_keys_set_again_in_large_mappings_read_the_same(written, monkeypatch):
    """A key of state_dict_metadata and a stored item's index set again after the plans, in mappings large enough
    that the reader finds keys through its hash index: replaced where they were, as a dict does."""
    metadata = pickle.loads(written[0])
    info = _item_of(metadata, "a")
    for n in range(40):
        metadata.state_dict_metadata[f"extra.{n}"] = BytesStorageMetadata()
        metadata.storage_data[MetadataIndex(fqn=f"extra.{n}")] = dataclasses.replace(info, offset=n)
    data, memo = _with_plans(metadata)
    index = next(k for k in metadata.storage_data if k.fqn == "extra.7")
    other = _item_of(metadata, "b")
    data = _after_plans(
        data,
        _get(memo[id(metadata.state_dict_metadata)])
        + b"\x8c\x01a"
        + _get(memo[id(metadata.state_dict_metadata["extra.3"])])
        + b"s0"
        + _get(memo[id(metadata.storage_data)])
        + _get(memo[id(index)])
        + _get(memo[id(other)])
        + b"s0",
    )
    assert _same(data, monkeypatch)
    parsed = _c(data)
    assert "a" in parsed.byte_keys and "a" not in parsed.tensors and list(parsed.sizes) == ["b", "c", "d", "base"]
    assert parsed.items[("extra.7", None)] == parsed.items[("b", (0, 0))]
    assert list(parsed.items).index(("extra.7", None)) == list(_facts_items(metadata)).index(("extra.7", None))


def _facts_items(metadata):
    """The (key, offsets) of storage_data in order, as torch reads them."""
    return [(k.fqn, None if k.offset is None else tuple(k.offset)) for k in metadata.storage_data]


@pytest.fixture
def objects_limit(monkeypatch):
    """Sets the C reader's limit of objects per table (dcp_metadata.C_READER_OBJECTS) for a test, tables rebuilt."""

    def set_limit(limit: int) -> None:
        monkeypatch.setattr(dcp_metadata, "C_READER_OBJECTS", limit)
        dcp_metadata._reader_tables.cache_clear()

    yield set_limit
    monkeypatch.undo()
    dcp_metadata._reader_tables.cache_clear()


def _declined_why(data: bytes):
    """Why the C reader declines the data (a str), or None when it reads it."""
    found = C_READER.read(data, dcp_metadata._reader_tables()[0])
    return found if type(found) is str else None


_MANY = {  # planner_data of many objects of one table, and why the reader declines it past its limit of objects
    "strings": (lambda n: [f"s{i}" for i in range(n)], "too many strings"),
    "large ints": (lambda n: [(1 << 40) + i for i in range(n)], "too many large ints"),
    "records": (lambda n: [BytesStorageMetadata() for _ in range(n)], "too many records"),
    "dicts": (lambda n: [{} for _ in range(n)], "too many dicts and lists"),
    "lists": (lambda n: [[] for _ in range(n)], "too many dicts and lists"),
    "tuple items": (lambda n: [(i, i) for i in range(n)], "too many tuple items"),
}


@needs_c
@pytest.mark.parametrize("table", list(_MANY))
def test_past_its_limit_of_objects_the_c_reader_declines(written, monkeypatch, objects_limit, table):
    """The reader's values number strings, large ints, records, dicts, lists and tuple items in 28 bits (at most
    C_READER_OBJECTS of each): one more than the limit and it declines, saying which, and the Python path reads the
    file the same."""
    many, why = _MANY[table]
    metadata = written[1]
    metadata.planner_data = many(400)
    data = pickle.dumps(metadata, protocol=4)
    assert _declined_why(data) is None and _same(data, monkeypatch)
    low, high = 1, 4000  # the least limit it reads the file at
    objects_limit(high)
    assert _declined_why(data) is None
    while low < high:
        objects_limit((low + high) // 2)
        if _declined_why(data) is None:
            high = (low + high) // 2
        else:
            low = (low + high) // 2 + 1
    assert high >= 400
    objects_limit(high - 1)
    assert _declined_why(data) == why
    assert not _same(data, monkeypatch)


@needs_c
@pytest.mark.parametrize("value", [(1 << 27) - 1, 1 << 27, (1 << 31) - 1, 1 << 31, -(1 << 27), -(1 << 27) - 1])
def test_ints_either_side_of_the_small_ones_read_the_same(written, monkeypatch, value):
    """Ints the reader holds in its values and those it keeps apart (past 28 bits), as offsets and lengths of a
    stored item, chunk sizes and a size: read as the Python path reads them (negative ones refused by both)."""
    metadata = written[1]
    info = _item_of(metadata, "a")
    info.offset, info.length = value, abs(value)
    entry = metadata.state_dict_metadata["a"]
    entry.size = torch.Size([value, 1])
    entry.chunks[0].sizes = torch.Size([value, 1])
    data = pickle.dumps(metadata)
    assert _same(data, monkeypatch) == (value >= 0)
    if value >= 0:
        parsed = _c(data)
        item = next(v for (fqn, _), v in parsed.items.items() if fqn == "a")
        assert (item.offset, item.length) == (value, value)
        assert parsed.sizes["a"] == (value, 1) and parsed.tensors["a"].chunks[0].sizes == (value, 1)


@needs_c
@pytest.mark.parametrize("letter", ["é", "\U0001f600", "\udc80"])
def test_keys_with_a_letter_past_ascii_anywhere_read_the_same(written, monkeypatch, letter):
    """The reader checks UTF-8 eight ASCII bytes at a time, then byte by byte: a key with a letter past ASCII (or a
    lone surrogate, which strict UTF-8 refuses) at any place reads as the Python path reads it."""
    for at in range(19):
        metadata = pickle.loads(written[0])
        metadata.state_dict_metadata["k" * at + letter + "z" * (18 - at)] = BytesStorageMetadata()
        assert _same(pickle.dumps(metadata), monkeypatch) == (letter != "\udc80")


@needs_c
def test_field_names_written_again_as_other_strings_read_the_same(written, monkeypatch):
    """The reader matches a record's field names by the string objects it found to be them before, else by their
    bytes: a stored item whose field names are strings of their own (not memo references to the others') reads
    the same, before and after the others."""
    metadata = written[1]
    for key in ("a", "b"):
        state = vars(_item_of(metadata, key))
        fresh = {"".join(list(name)): value for name, value in state.items()}  # equal strings, other objects
        assert all(a is not b for a, b in zip(fresh, state))
        state.clear()
        state.update(fresh)
    data = pickle.dumps(metadata)
    assert data.count(b"relative_path") == 3  # the first item's, then a's and b's own
    assert _same(data, monkeypatch)
    parsed = _c(data)
    item = next(v for (fqn, _), v in parsed.items.items() if fqn == "a")
    assert (item.relative_path, item.offset, item.length) == (
        _item_of(metadata, "a").relative_path,
        _item_of(metadata, "a").offset,
        _item_of(metadata, "a").length,
    )
