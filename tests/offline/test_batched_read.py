"""TorchDistReader.load_many: every key once, in order, in batches bounded by a byte budget, decoded without torch.load;
an item that is not a plain torch.save blob is refused, never handed to torch (whose loader unpickles byte entries)."""

import io
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex

from megatron_peft_export.io.torch_save import NotPlainTensor, decode
from megatron_peft_export.offline.checkpoint import CheckpointError, TorchDistReader

SHAPES = {
    "a": (8, 16),
    "b": (64, 16),
    "c": (4,),
    "d": (8, 16),
    "base": (32, 32),
}  # float32: 512, 4096, 16, 512, 4096 bytes


class _Writer(dcp.FileSystemWriter):
    """torch records the checkpoint path as a pathlib object, which the reader's restricted unpickler refuses;
    megatron's writer does not."""

    def storage_meta(self):
        meta = super().storage_meta()
        if meta is not None:
            meta.checkpoint_id = str(meta.checkpoint_id)
        return meta


@pytest.fixture
def checkpoint(tmp_path):
    tensors = {
        key: torch.randn(shape, generator=torch.Generator().manual_seed(n))
        for n, (key, shape) in enumerate(SHAPES.items())
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(tensors, storage_writer=_Writer(str(tmp_path)), no_dist=True)
    return tmp_path, tensors


@pytest.fixture
def torch_loads(monkeypatch):
    """Every call of torch.distributed.checkpoint.load (its key set) and of torch.load."""
    calls = []
    load, torch_load = dcp.load, torch.load
    monkeypatch.setattr(
        dcp, "load", lambda state_dict, **kwargs: calls.append(sorted(state_dict)) or load(state_dict, **kwargs)
    )
    monkeypatch.setattr(
        torch, "load", lambda *args, **kwargs: calls.append("torch.load") or torch_load(*args, **kwargs)
    )
    return calls


def test_every_key_once_in_order_equal_to_what_was_saved_without_torch_load(checkpoint, torch_loads):
    directory, tensors = checkpoint
    reader = TorchDistReader(directory)
    keys = ["d", "a", "c", "b"]
    got = list(reader.load_many(keys))
    assert [k for k, _ in got] == keys
    assert all(torch.equal(t, tensors[k]) for k, t in got)
    assert torch.equal(reader.load("b"), tensors["b"])
    assert torch_loads == [], "plain torch.save items are decoded in memory"


def test_batches_stay_within_the_budget(checkpoint, monkeypatch):
    directory, tensors = checkpoint
    batches = []
    read_items = TorchDistReader._read_items
    monkeypatch.setattr(
        TorchDistReader,
        "_read_items",
        lambda self, keys, *rest: batches.append(list(keys)) or read_items(self, keys, *rest),
    )
    got = dict(TorchDistReader(directory).load_many(["a", "c", "b", "d"], budget=1024))
    assert all(torch.equal(got[k], tensors[k]) for k in "abcd")
    assert batches == [["a", "c"], ["b"], ["d"]], "b alone exceeds the budget, so it is read alone"


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4),
        torch.randn(5, 6)[1:, ::2],
        torch.zeros(0, 3),
        torch.randn(7).to(torch.bfloat16),
        torch.arange(6, dtype=torch.int64),
        torch.tensor(2.5, dtype=torch.float16),
    ],
    ids=["float32", "strided view", "empty", "bfloat16", "int64", "scalar"],
)
def test_decode_gives_what_torch_load_gives(tensor):
    blob = io.BytesIO()
    torch.save(tensor, blob)
    expected = torch.load(io.BytesIO(blob.getvalue()), weights_only=True)
    got = decode(bytearray(blob.getvalue()))
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.stride() == expected.stride()
    assert torch.equal(got, expected)


def test_decode_finds_the_zip_end_record_before_a_comment():
    """torch writes no zip comment (the end record is then the last 22 bytes); a blob with one is read too."""
    saved = io.BytesIO()
    torch.save(torch.arange(5.0), saved)
    blob = bytearray(saved.getvalue())
    blob[-2:] = len(b"a comment").to_bytes(2, "little")
    blob += b"a comment"
    assert torch.equal(decode(blob), torch.arange(5.0))


def test_decode_refuses_what_is_not_a_plain_tensor_blob():
    legacy = io.BytesIO()
    torch.save(torch.ones(3), legacy, _use_new_zipfile_serialization=False)
    pickled_dict = io.BytesIO()
    torch.save({"w": torch.ones(3)}, pickled_dict)
    for blob in (legacy.getvalue(), pickled_dict.getvalue(), b"\xff" * 64):
        with pytest.raises(NotPlainTensor):
            decode(bytearray(blob))


def test_an_item_in_another_encoding_is_refused_and_never_handed_to_torch(checkpoint, torch_loads):
    """Item "c" rewritten in torch's legacy (non-zip) format, which torch.load would read and the in-memory decoder does
    not."""
    directory, tensors = checkpoint
    with open(directory / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    index = MetadataIndex("c", torch.Size([0]))
    info = metadata.storage_data[index]
    legacy = io.BytesIO()
    torch.save(tensors["c"], legacy, _use_new_zipfile_serialization=False)
    data_file = directory / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(legacy.getvalue())
    info.offset, info.length = offset, len(legacy.getvalue())
    with open(directory / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    reader = TorchDistReader(directory)
    assert torch.equal(reader.load("a"), tensors["a"])
    with pytest.raises(
        CheckpointError, match=r"c: no zip end record.*; expected a tensor as torch.distributed.checkpoint stores it"
    ):
        list(reader.load_many(["a", "c", "b"], budget=1024))
    assert torch_loads == [], "nothing is read by torch's loaders"


def test_a_damaged_data_file_names_the_tensor(checkpoint):
    directory, _ = checkpoint
    for path in directory.glob("*.distcp"):
        path.write_bytes(b"\xff" * path.stat().st_size)
    with pytest.raises(
        CheckpointError, match=r": a: no zip end record; expected a tensor as torch.distributed.checkpoint stores it"
    ):
        list(TorchDistReader(directory).load_many(["a", "b", "c"]))


def test_a_truncated_data_file_names_the_tensor_before_reading(checkpoint, monkeypatch):
    directory, _ = checkpoint
    (path,) = directory.glob("*.distcp")
    path.write_bytes(path.read_bytes()[:600])
    monkeypatch.setattr(TorchDistReader, "_read_items", lambda self, keys: pytest.fail("the items were read"))
    with pytest.raises(
        CheckpointError, match=r"__0_0.distcp: the stored item of b claims bytes \d+ to \d+, but the file has 600 bytes"
    ):
        list(TorchDistReader(directory).load_many(["b"]))
