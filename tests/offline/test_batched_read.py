"""TorchDistReader.load_many: every key once, in order, in torch.distributed.checkpoint.load calls bounded by a byte budget."""

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_peft_export.offline.checkpoint import CheckpointError, TorchDistReader

SHAPES = {"a": (8, 16), "b": (64, 16), "c": (4,), "d": (8, 16), "base": (32, 32)}  # float32: 512, 4096, 16, 512, 4096 bytes


class _Writer(dcp.FileSystemWriter):
    """torch records the checkpoint path as a pathlib object, which the reader's restricted unpickler refuses; megatron's writer does not."""

    def storage_meta(self):
        meta = super().storage_meta()
        if meta is not None:
            meta.checkpoint_id = str(meta.checkpoint_id)
        return meta


@pytest.fixture
def checkpoint(tmp_path):
    tensors = {key: torch.randn(shape, generator=torch.Generator().manual_seed(n)) for n, (key, shape) in enumerate(SHAPES.items())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(tensors, storage_writer=_Writer(str(tmp_path)), no_dist=True)
    return tmp_path, tensors


@pytest.fixture
def load_calls(monkeypatch):
    calls = []
    load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda state_dict, **kwargs: calls.append(sorted(state_dict)) or load(state_dict, **kwargs))
    return calls


def test_every_key_once_in_order_and_equal_to_single_loads(checkpoint, load_calls):
    directory, tensors = checkpoint
    reader = TorchDistReader(directory)
    keys = ["d", "a", "c", "b"]
    got = list(reader.load_many(keys))
    assert [k for k, _ in got] == keys
    assert all(torch.equal(t, tensors[k]) for k, t in got)
    assert load_calls == [["a", "b", "c", "d"]], "one load call for the whole batch; the base tensor is never asked for"
    assert torch.equal(reader.load("b"), tensors["b"])


def test_batches_stay_within_the_budget(checkpoint, load_calls):
    directory, tensors = checkpoint
    got = dict(TorchDistReader(directory).load_many(["a", "c", "b", "d"], budget=1024))
    assert all(torch.equal(got[k], tensors[k]) for k in "abcd")
    assert load_calls == [["a", "c"], ["b"], ["d"]], "b alone exceeds the budget, so it is read alone"


def test_a_damaged_data_file_names_the_tensors(checkpoint):
    directory, _ = checkpoint
    for path in directory.glob("*.distcp"):
        path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"reading a \(and 2 more tensors\) failed"):
        list(TorchDistReader(directory).load_many(["a", "b", "c"]))
