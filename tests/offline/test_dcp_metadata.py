""".metadata parsed into inert records and checked (offline/dcp_metadata.py): the same facts torch's own reading gives,
and refusal of every class, function and attribute torch does not write."""

import dataclasses
import io
import os
import pickle
import re
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from megatron_peft_export.offline.dcp_metadata import MetadataError, RefusedGlobal, parse_metadata
from tests.offline.test_batched_read import SHAPES, _Writer
from tests.support.gadgets import Call


def torch_written(directory) -> bytes:
    """The `.metadata` torch.distributed.checkpoint writes for a few tensors and a non-tensor entry."""
    tensors = {
        key: torch.randn(shape, generator=torch.Generator().manual_seed(n))
        for n, (key, shape) in enumerate(SHAPES.items())
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({**tensors, "blob": {"not": "a tensor"}}, storage_writer=_Writer(str(directory)), no_dist=True)
    return (directory / ".metadata").read_bytes()


@pytest.fixture
def metadata(tmp_path):
    return pickle.loads(torch_written(tmp_path))  # the test's own file


def test_the_facts_are_those_torch_reads(metadata):
    parsed = parse_metadata(pickle.dumps(metadata))
    tensors = {k: v for k, v in metadata.state_dict_metadata.items() if not isinstance(v, BytesStorageMetadata)}
    assert parsed.tensors.keys() == tensors.keys() and parsed.byte_keys == {"blob.not"}
    for key, entry in tensors.items():
        got = parsed.tensors[key]
        assert got.dtype == entry.properties.dtype and got.size == tuple(entry.size)
        assert [(c.offsets, c.sizes) for c in got.chunks] == [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
    for index, info in metadata.storage_data.items():
        item = parsed.items[(index.fqn, None if index.offset is None else tuple(index.offset))]
        assert (item.relative_path, item.offset, item.length) == (info.relative_path, info.offset, info.length)


@pytest.mark.parametrize(
    "payload,name",
    [
        (Call(os.system, "touch /tmp/never"), "posix.system"),
        (Call(eval, "1"), "builtins.eval"),
        (torch.nn.Linear(1, 1), "torch.nn.modules.linear.Linear"),
        (Call(dcp.load, {}), "torch.distributed.checkpoint.state_dict_loader.load"),
    ],
    ids=["os.system", "eval", "a module", "a torch function"],
)
def test_any_other_class_or_function_is_refused(payload, name):
    with pytest.raises(RefusedGlobal, match=f"{name} is not allowed"):
        parse_metadata(pickle.dumps(payload))


def _extra(target):
    def edit(metadata):
        key = next(iter(SHAPES))
        entry = metadata.state_dict_metadata[key]
        found = {
            "metadata": metadata,
            "tensor": entry,
            "chunk": entry.chunks[0],
            "item": next(v for k, v in metadata.storage_data.items() if k.fqn == key),
        }[target]
        object.__setattr__(found, "hidden", 1)

    return edit


def _retype(metadata):
    metadata.state_dict_metadata["a"].chunks[0] = ChunkStorageMetadata(
        offsets=torch.Size([0, 0]), sizes=torch.Size([8, 17])
    )


def _bytes_with_fields(metadata):
    fake = BytesStorageMetadata()
    fake.size = metadata.state_dict_metadata["a"].size
    metadata.state_dict_metadata["a"] = fake


def _outside(metadata):
    next(v for k, v in metadata.storage_data.items() if k.fqn == "a").relative_path = "../a.distcp"


def _negative(metadata):
    next(v for k, v in metadata.storage_data.items() if k.fqn == "a").offset = -1


def _bool_offset(metadata):
    next(v for k, v in metadata.storage_data.items() if k.fqn == "a").offset = True


def _huge_length(metadata):
    next(v for k, v in metadata.storage_data.items() if k.fqn == "a").length = 1 << 62


def _index(value):
    def edit(metadata):
        key = next(k for k in metadata.storage_data if k.fqn == "a")
        metadata.storage_data[MetadataIndex(fqn="a", offset=key.offset, index=value)] = metadata.storage_data.pop(key)

    return edit


def _size_not_int(metadata):
    metadata.state_dict_metadata["a"].size = (8.0, 16)


def _index_fqn(metadata):
    info = metadata.storage_data.pop(next(k for k in metadata.storage_data if k.fqn == "a"))
    metadata.storage_data[MetadataIndex(fqn=("a",))] = info


@pytest.mark.parametrize(
    "edit,message",
    [
        *[
            (_extra(t), f"a {n} with attributes it does not have \\(hidden\\)")
            for t, n in [
                ("metadata", "Metadata"),
                ("tensor", "TensorStorageMetadata"),
                ("chunk", "ChunkStorageMetadata"),
                ("item", "_StorageInfo"),
            ]
        ],
        (_retype, "tensor a: chunk 0 at \\[0, 0\\] of size \\[8, 17\\] lies outside the tensor's size \\[8, 16\\]"),
        (_bytes_with_fields, "entry a: a BytesStorageMetadata with attributes it does not have \\(size\\)"),
        (_outside, "refused, it names data files outside the checkpoint directory \\(../a.distcp, for a\\)"),
        (_negative, "stored item of a: offset: expected an integer from 0"),
        (_size_not_int, "tensor a: size: expected up to 64 integers"),
        (_index_fqn, "a storage index names \\('a',\\), expected a key"),
    ],
    ids=[
        "extra on Metadata",
        "extra on a tensor",
        "extra on a chunk",
        "extra on an item",
        "chunk outside",
        "bytes entry with fields",
        "file outside",
        "negative offset",
        "float size",
        "index not a key",
    ],
)
def test_fields_are_checked(metadata, edit, message):
    """Refused when parsed (keys, kinds, sizes, the Metadata) or when the key is read (chunks, stored items)."""
    edit(metadata)
    with pytest.raises(MetadataError, match=message):
        _read_all(parse_metadata(pickle.dumps(metadata)))


def _read_all(parsed):
    """Every tensor and stored item read (each is checked and converted when first read)."""
    return dict(parsed.tensors), dict(parsed.items)


@pytest.mark.parametrize(
    "edit,read",
    [
        (_retype, lambda parsed: parsed.tensors["a"]),
        (_extra("chunk"), lambda parsed: parsed.tensors["a"]),
        (_negative, lambda parsed: parsed.items[("a", (0, 0))]),
        (_extra("item"), lambda parsed: parsed.items[("a", (0, 0))]),
        (_bool_offset, lambda parsed: parsed.items[("a", (0, 0))]),
        (_huge_length, lambda parsed: parsed.items[("a", (0, 0))]),
        (_index("x"), lambda parsed: parsed.items[("a", (0, 0))]),
        (_index(-1), lambda parsed: parsed.items[("a", (0, 0))]),
    ],
    ids=[
        "chunk outside",
        "extra on a chunk",
        "negative offset",
        "extra on an item",
        "bool offset",
        "huge length",
        "index not int",
        "negative index",
    ],
)
def test_a_bad_chunk_or_item_is_refused_when_its_key_is_read(metadata, edit, read):
    """A bad chunk or stored item of a: the other keys read as without it; a refused each time it is read, with the
    message reading every key gives."""
    plain = parse_metadata(pickle.dumps(metadata))
    edit(metadata)
    parsed = parse_metadata(pickle.dumps(metadata))
    assert "a" in parsed.tensors and parsed.sizes["a"] == plain.sizes["a"] == (8, 16)
    others = [key for key in plain.tensors if key != "a"]
    assert others and {k: parsed.tensors[k] for k in others} == {k: plain.tensors[k] for k in others}
    stored = [(k, c.offsets) for k in others for c in plain.tensors[k].chunks]
    assert [parsed.items[s] for s in stored] == [plain.items[s] for s in stored]
    with pytest.raises(MetadataError) as refused:
        read(parsed)
    for _ in range(2):
        with pytest.raises(MetadataError, match=re.escape(str(refused.value))):
            read(parsed)
    with pytest.raises(MetadataError, match=re.escape(str(refused.value))):
        _read_all(parsed)


@pytest.mark.parametrize(
    "path,named",
    [("../a.distcp", "../a.distcp"), ("", ""), ({"a": 1}, "{'a': 1}"), (None, "None")],
    ids=["outside", "empty", "a mapping", "none"],
)
def test_a_data_file_name_not_plain_is_refused_when_parsed(metadata, path, named):
    """Whatever key the stored item is of (read or not), a data file name that is not a plain name in the checkpoint
    directory refuses the whole file when parsed."""
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index].relative_path = path
    with pytest.raises(MetadataError, match=re.escape(f"data files outside the checkpoint directory ({named}, for ")):
        parse_metadata(pickle.dumps(metadata))


def _facts(parsed):
    return parsed.tensors, parsed.byte_keys, parsed.items


def _with_plans(metadata, protocol=2):
    """The metadata pickled as Megatron saves it (its cached save plans set last) by the pure-Python pickler (protocol
    2 by default: no frames, so opcodes can be added), and
    the memo index that pickler gave each object it wrote (id -> index)."""
    plan = SavePlan(
        [
            WriteItem(index=index, type=WriteItemType.TENSOR if index.offset is not None else WriteItemType.BYTE_IO)
            for index in metadata.storage_data
        ]
    )
    metadata.all_local_plans = [plan]
    buffer = io.BytesIO()
    pickler = pickle._Pickler(buffer, protocol=protocol)
    pickler.dump(metadata)
    return buffer.getvalue(), {key: index for key, (index, _) in pickler.memo.items()}


def _after_plans(data: bytes, opcodes: bytes) -> bytes:
    """`opcodes` run after the cached plans, before Metadata's state is closed (SETITEMS, BUILD, STOP)."""
    assert data.endswith(b"ub.")
    return data[:-3] + opcodes + b"ub."


def _get(index: int) -> bytes:
    return b"j" + index.to_bytes(4, "little")


def _torch_facts(data: bytes):
    found = pickle.loads(data)  # the test's own crafted pickle: what torch's plain pickle.load reads
    return {
        (index.fqn, None if index.offset is None else tuple(index.offset)): (info.relative_path, info.offset)
        for index, info in found.storage_data.items()
    }


def _facts_read(data: bytes):
    return {key: (item.relative_path, item.offset) for key, item in parse_metadata(data).items.items()}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_megatrons_cached_plans_are_read_with_the_rest(metadata, protocol):
    """Megatron sets Metadata.all_local_plans after torch built it (so it is pickled last): read like the rest, the
    facts are those of the pickle without it, whatever the pickle protocol."""
    plain = parse_metadata(pickle.dumps(metadata, protocol=protocol))
    data, _ = _with_plans(metadata, protocol)
    assert _facts(parse_metadata(data)) == _facts(plain)


def test_a_field_set_again_after_the_plans_is_what_is_read(metadata):
    """storage_data set a second time after the plans (torch keeps the last): the reader reads that one, not the
    first (a reader that stops at the plans would read items torch never reads)."""
    data, _ = _with_plans(metadata)
    moved = {
        index: dataclasses.replace(info, offset=info.offset + 4096 * (index.fqn == "a"))
        for index, info in metadata.storage_data.items()
    }
    buffer = io.BytesIO()
    pickler = pickle._Pickler(buffer, protocol=2)
    pickler.fast = True  # no memo: the mapping's opcodes stand on their own inside the other pickle
    pickler.dump(moved)
    data = _after_plans(data, b"X\x0c\x00\x00\x00storage_data" + buffer.getvalue()[2:-1])
    assert _torch_facts(data)[("a", (0, 0))] != _torch_facts(pickle.dumps(metadata))[("a", (0, 0))]
    assert _facts_read(data) == _torch_facts(data)


def test_a_record_changed_after_the_plans_is_read_changed(metadata):
    """A memo reference to a stored item's record after the plans, then BUILD on it (a new offset): torch reads the
    changed offset, and so does the reader."""
    data, memo = _with_plans(metadata)
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == "a")
    changed = _get(memo[id(info)]) + b"}(\x8c\x06offsetJ" + (4096).to_bytes(4, "little") + b"ub0"
    data = _after_plans(data, changed)
    assert _torch_facts(data)[("a", (0, 0))][1] == 4096
    assert _facts_read(data) == _torch_facts(data)


def test_an_item_set_after_the_plans_is_read(metadata):
    """SETITEM into storage_data (a memo reference) after the plans, giving a's chunk b's stored item: torch reads
    a from b's bytes, and so does the reader."""
    data, memo = _with_plans(metadata)
    index = next(k for k in metadata.storage_data if k.fqn == "a")
    other = next(v for k, v in metadata.storage_data.items() if k.fqn == "b")
    data = _after_plans(
        data, _get(memo[id(metadata.storage_data)]) + _get(memo[id(index)]) + _get(memo[id(other)]) + b"s0"
    )
    assert _torch_facts(data)[("a", (0, 0))] == (other.relative_path, other.offset)
    assert _facts_read(data) == _torch_facts(data)


def test_a_call_in_the_plans_is_refused_and_never_run(metadata, tmp_path):
    """A call planted among the cached plans is refused by name, and nothing runs."""
    marker = tmp_path / "ran"
    metadata.all_local_plans = [Call(os.system, f"touch {marker}")]
    with pytest.raises(RefusedGlobal, match="posix.system is not allowed"):
        parse_metadata(pickle.dumps(metadata))
    assert not marker.exists()


def test_a_length_past_the_data_in_the_plans_is_refused(metadata):
    """A BYTEARRAY8 among the plans that declares 2**40 bytes (the unpickler would allocate them before reading):
    refused before anything is unpickled."""
    data, _ = _with_plans(metadata)
    data = _after_plans(data, b"\x96" + (1 << 40).to_bytes(8, "little") + b"0")
    with pytest.raises(MetadataError, match="declares 1099511627776 bytes"):
        parse_metadata(data)


def test_cached_plans_anywhere_else_are_read_with_the_rest(metadata):
    """The field before the others: the whole pickle is checked and read (a call in it refused, plain data kept)."""
    fields = dict(metadata.__dict__)
    plain = parse_metadata(pickle.dumps(metadata))
    metadata.__dict__.clear()
    metadata.__dict__.update({"all_local_plans": ["plain data"], **fields})
    assert _facts(parse_metadata(pickle.dumps(metadata))) == _facts(plain)
    metadata.__dict__["all_local_plans"] = [Call(os.system, "touch /tmp/never")]
    with pytest.raises(RefusedGlobal, match="posix.system is not allowed"):
        parse_metadata(pickle.dumps(metadata))


_CHUNK_CLASS = b"ctorch.distributed.checkpoint.metadata\nChunkStorageMetadata\n"
_PLAN_CLASS = b"ctorch.distributed.checkpoint.planner\nWriteItem\n"
_GET_LAYOUT = b"ctorch.serialization\n_get_layout\n"


@pytest.mark.parametrize(
    "target,state,message",
    [
        (_CHUNK_CLASS, b"N}X\x0a\x00\x00\x00class_nameX\x01\x00\x00\x00xs\x86", "sets attributes of the class"),
        (_CHUNK_CLASS, b"}X\x0a\x00\x00\x00class_nameX\x01\x00\x00\x00xs", "mappingproxy"),
        (_PLAN_CLASS, b"N}X\x0c\x00\x00\x00__setstate__" + _GET_LAYOUT + b"s\x86", "missing 1 required positional"),
        (
            _GET_LAYOUT,
            b"}X\x05\x00\x00\x00cache}X\x0d\x00\x00\x00torch.stridedctorch\nfloat32\nss",
            "no attribute '__dict__'",
        ),
    ],
    ids=["a record class, slot state", "a record class, its dict", "a planner class", "torch's _get_layout"],
)
def test_a_build_on_a_class_or_function_is_refused_and_changes_nothing(metadata, target, state, message):
    """BUILD on what a GLOBAL gives (a record class, a planner class, the layout function) would set its attributes
    for the whole process (a record's name or __setstate__, the layout cache torch.load reads): refused, nothing
    changed, and a plain metadata reads as before."""
    before = parse_metadata(pickle.dumps(metadata))
    cache = dict(torch.serialization._get_layout.cache)
    with pytest.raises(Exception, match=message):
        parse_metadata(b"\x80\x02" + target + state + b"b.")
    assert torch.serialization._get_layout.cache == cache
    assert torch.serialization._get_layout("torch.strided") is torch.strided
    after = parse_metadata(pickle.dumps(metadata))
    assert _read_all(after) == _read_all(before)
    with pytest.raises(MetadataError, match="stored item of a: expected a _StorageInfo, found Dropped"):
        index = next(k for k in metadata.storage_data if k.fqn == "a")
        metadata.storage_data[index] = WriteItem(index=index, type=WriteItemType.TENSOR)
        _read_all(parse_metadata(pickle.dumps(metadata)))


def test_a_key_named_like_the_cached_plans_is_read_as_a_key(metadata):
    """The text `all_local_plans` as a key of state_dict_metadata (not Metadata's field) is a key like any other."""
    metadata.state_dict_metadata = {"all_local_plans": BytesStorageMetadata(), **metadata.state_dict_metadata}
    parsed = parse_metadata(pickle.dumps(metadata))
    assert parsed.byte_keys == {"all_local_plans", "blob.not"}
    assert parsed.tensors.keys() == {k for k, v in metadata.state_dict_metadata.items() if k not in parsed.byte_keys}


def test_a_planner_object_where_a_record_belongs_is_refused(metadata):
    """The planner's objects are read as one inert instance: one placed as a stored item is refused, not read."""
    index = next(k for k in metadata.storage_data if k.fqn == "a")
    metadata.storage_data[index] = WriteItem(index=index, type=WriteItemType.TENSOR)
    with pytest.raises(MetadataError, match="stored item of a: expected a _StorageInfo, found Dropped"):
        _read_all(parse_metadata(pickle.dumps(metadata)))


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_left_as_it_was(metadata, enabled):
    """parse_metadata pauses the cyclic garbage collector while it unpickles: after it, and after a refusal, the
    collector is as it was."""
    import gc

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        parse_metadata(pickle.dumps(metadata))
        assert gc.isenabled() == enabled
        with pytest.raises(RefusedGlobal):
            parse_metadata(pickle.dumps(Call(eval, "1")))
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_items_of_one_key_with_and_without_offsets_are_both_kept(metadata):
    """One key stored with chunk offsets and again without (as a byte entry is): both items are read, each as given;
    an item of a key no tensor entry names is read as given too (the reader refuses what it does not expect)."""
    key = next(k for k in metadata.storage_data if k.fqn == "a")
    with_offsets = metadata.storage_data[key]
    without = dataclasses.replace(with_offsets, offset=with_offsets.offset + 4)
    metadata.storage_data[MetadataIndex(fqn="a", offset=None)] = without
    metadata.storage_data[MetadataIndex(fqn="zz", offset=torch.Size([0, 0]))] = with_offsets
    parsed = parse_metadata(pickle.dumps(metadata))
    expected = {
        ("a", (0, 0)): (with_offsets.relative_path, with_offsets.offset, with_offsets.length),
        ("a", None): (without.relative_path, without.offset, without.length),
        ("zz", (0, 0)): (with_offsets.relative_path, with_offsets.offset, with_offsets.length),
    }
    assert {k: tuple(parsed.items[k])[:3] for k in expected} == expected
    assert {k for k in parsed.items if k[0] in ("a", "zz")} == set(expected)
