""".metadata parsed into inert records and checked (offline/dcp_metadata.py): the same facts torch's own reading gives,
and refusal of every class, function and attribute torch does not write."""

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex

from megatron_peft_export.offline.dcp_metadata import MetadataError, RefusedGlobal, parse_metadata
from tests.offline.test_batched_read import SHAPES, _Writer
from tests.support.gadgets import Call


@pytest.fixture
def metadata(tmp_path):
    tensors = {
        key: torch.randn(shape, generator=torch.Generator().manual_seed(n))
        for n, (key, shape) in enumerate(SHAPES.items())
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({**tensors, "blob": {"not": "a tensor"}}, storage_writer=_Writer(str(tmp_path)), no_dist=True)
    with open(tmp_path / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own file


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
    edit(metadata)
    with pytest.raises(MetadataError, match=message):
        parse_metadata(pickle.dumps(metadata))


def _facts(parsed):
    return parsed.tensors, parsed.byte_keys, parsed.items


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_megatrons_cached_plans_saved_last_are_not_unpickled(metadata, tmp_path, protocol):
    """Megatron sets Metadata.all_local_plans after torch built it (so it is pickled last): the reader stops before
    it. A call planted there is never unpickled (neither run nor refused), and the facts are those of the pickle
    without it, whatever the pickle protocol (2: no frames; 4 and 5: the cut inside a frame)."""
    plain = parse_metadata(pickle.dumps(metadata, protocol=protocol))
    marker = tmp_path / "ran"
    metadata.all_local_plans = [Call(os.system, f"touch {marker}")] + [f"item {n}" for n in range(20_000)]
    parsed = parse_metadata(pickle.dumps(metadata, protocol=protocol))
    assert _facts(parsed) == _facts(plain) and not marker.exists()


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


def test_a_key_named_like_the_cached_plans_is_read_as_a_key(metadata):
    """The text `all_local_plans` first met as a key of state_dict_metadata (not Metadata's field): the prefix does
    not read back as metadata, so the whole pickle is read and the key is there."""
    metadata.state_dict_metadata = {"all_local_plans": BytesStorageMetadata(), **metadata.state_dict_metadata}
    parsed = parse_metadata(pickle.dumps(metadata))
    assert parsed.byte_keys == {"all_local_plans", "blob.not"}
    assert parsed.tensors.keys() == {k for k, v in metadata.state_dict_metadata.items() if k not in parsed.byte_keys}
