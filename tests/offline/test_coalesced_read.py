"""Adjacent stored items are read together and blobs laid out alike are decoded together: the result equals what was
saved (the independent reference), every blob that differs where decoding looks is decoded alone, and one that is not
a plain tensor blob is refused even in the middle of a run of good ones."""

import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_peft_export.offline import checkpoint as offline_checkpoint
from megatron_peft_export.offline.checkpoint import CheckpointError, Segments, TorchDistReader
from tests.offline.test_batched_read import _Writer

SHAPES = [(2, 8), (8, 2), (16,), (4, 4), (3, 5), (1, 2, 8)]
"""Different shapes of the same byte length (64): blobs of one length with different layouts."""


def _save(directory, count: int = 120) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    tensors = {f"t{n:03d}": torch.randn(SHAPES[(n // 7) % len(SHAPES)], generator=generator) for n in range(count)}
    tensors["half"] = torch.randn(4, 8, generator=generator).to(torch.bfloat16)
    tensors["strided"] = torch.randn(6, 6, generator=generator)[::2, 1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(tensors, storage_writer=_Writer(str(directory), thread_count=1), no_dist=True)
    return tensors


def _segments(*segments: tuple[int, int, int, int]) -> Segments:
    """Segments from (chunk, start in the chunk's bytes, start in the payload, length) tuples."""
    return Segments(*(np.array(column, dtype=np.int64) for column in zip(*segments)))


def _items(reader: TorchDistReader, key: str):
    return [item for _, item in reader._items(key)]


def test_runs_of_alike_blobs_give_what_was_saved(tmp_path, monkeypatch):
    tensors = _save(tmp_path)
    reads = []
    readinto = offline_checkpoint.RegularFile.readinto
    monkeypatch.setattr(
        offline_checkpoint.RegularFile,
        "readinto",
        lambda f, buffer, at: reads.append(len(buffer)) or readinto(f, buffer, at),
    )
    reader = TorchDistReader(tmp_path)
    got = dict(reader.load_many(sorted(tensors)))
    assert got.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert len(reads) < len(tensors) / 10, "adjacent items are read together"


@pytest.mark.parametrize(
    "damage",
    [
        (lambda blob: blob.replace(b"PK\x01\x02", b"PK\x01\x03", 1), "central directory"),
        (lambda blob: blob.replace(b"little", b"big\x00\x00\x00", 1), "little-endian"),
        (lambda blob: blob.replace(b"_rebuild_tensor_v2", b"_rebuild_tensor_v3", 1), "_rebuild_tensor_v3"),
        (lambda blob: blob.replace(b"FloatStorage", b"FloatStoragf", 1), "FloatStoragf"),
    ],
    ids=["zip directory", "byte order", "rebuild function", "storage type"],
)
def test_a_bad_blob_inside_a_run_of_good_ones_is_refused(tmp_path, damage):
    change, reason = damage
    tensors = _save(tmp_path)
    reader = TorchDistReader(tmp_path)
    victim = _items(reader, "t050")[0]
    assert _items(reader, "t049")[0].offset + _items(reader, "t049")[0].length == victim.offset, "inside a run"
    path = tmp_path / victim.relative_path
    data = bytearray(path.read_bytes())
    blob = bytes(data[victim.offset : victim.offset + victim.length])
    changed = change(blob)
    assert changed != blob and len(changed) == len(blob)
    data[victim.offset : victim.offset + victim.length] = changed
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=reason if reason != "central directory" else "t050|corrupt"):
        dict(TorchDistReader(tmp_path).load_many(sorted(tensors)))


def test_a_blob_differing_only_in_its_values_is_read_in_the_run(tmp_path):
    tensors = _save(tmp_path)
    reader = TorchDistReader(tmp_path)
    victim = _items(reader, "t050")[0]
    path = tmp_path / victim.relative_path
    data = bytearray(path.read_bytes())
    expected = tensors["t050"].clone()
    expected.view(-1)[3] = 123.0
    blob = bytes(data[victim.offset : victim.offset + victim.length])
    old = tensors["t050"].contiguous().view(-1)[3:4].numpy().tobytes()
    assert blob.count(old) == 1
    data[victim.offset : victim.offset + victim.length] = blob.replace(old, expected.view(-1)[3:4].numpy().tobytes())
    path.write_bytes(bytes(data))
    got = dict(TorchDistReader(tmp_path).load_many(sorted(tensors)))
    assert torch.equal(got["t050"], expected) and torch.equal(got["t051"], tensors["t051"])


def test_what_is_read_ahead_is_bounded(tmp_path, monkeypatch):
    """The reader's memory beyond the output, checked by instrumenting its buffers: every read is at most RUN_BYTES
    (or one item larger than that), every batch decodes at most its budget of tensor bytes (or one larger tensor),
    and what it gives is what was saved."""
    tensors = _save(tmp_path)
    monkeypatch.setattr(offline_checkpoint, "RUN_BYTES", 1024)
    reads, batches = [], []
    readinto = offline_checkpoint.RegularFile.readinto
    monkeypatch.setattr(
        offline_checkpoint.RegularFile,
        "readinto",
        lambda f, buffer, at: reads.append(len(buffer)) or readinto(f, buffer, at),
    )
    read_items = TorchDistReader._read_items
    monkeypatch.setattr(
        TorchDistReader,
        "_read_items",
        lambda self, keys, *rest: (
            batches.append(sum(self._metadata.tensors[k].nbytes for k in keys)) or read_items(self, keys, *rest)
        ),
    )
    reader = TorchDistReader(tmp_path)
    largest_item = max(item.length for key in tensors for item in _items(reader, key))
    largest_tensor = max(t.numel() * t.element_size() for t in tensors.values())
    budget = 300
    reads.clear()  # .metadata, read whole
    got = dict(reader.load_many(sorted(tensors), budget=budget))
    assert all(torch.equal(got[key], tensor) and got[key].dtype == tensor.dtype for key, tensor in tensors.items())
    assert reads and max(reads) <= max(1024, largest_item)
    assert len(batches) > 10 and max(batches) <= max(budget, largest_tensor)


def test_direct_keys_are_copied_into_the_payload_by_their_segments(tmp_path):
    """Keys read straight into a payload: the bytes at each segment are the saved tensor's C-order bytes (computed here
    from what was saved), segments in any order; the other keys come as before. Blobs laid out alike next to other
    keys' blobs (a mixed run), a bfloat16 one and a strided one (decoded alone) are all copied."""
    tensors = _save(tmp_path)
    reader = TorchDistReader(tmp_path)
    chosen = ["t000", "t050", "t051", "half", "strided"]
    payload, expected, direct, at = bytearray(4096), bytearray(4096), {}, 8
    for key in chosen:
        raw = tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert len(reader.entry(key).chunks) == 1
        half = len(raw) // 2  # the second half first, then the first half
        direct[key] = _segments((0, half, at, len(raw) - half), (0, 0, at + len(raw) - half, half))
        expected[at : at + len(raw)] = raw[half:] + raw[:half]
        at += len(raw) + 8
    got = dict(reader.load_many(sorted(tensors), direct=direct, payload=memoryview(payload)))
    assert payload == expected
    assert got.keys() == tensors.keys() and all(got[key] is None for key in chosen)
    assert all(torch.equal(got[key], tensor) for key, tensor in tensors.items() if key not in direct)


def test_a_direct_key_whose_blob_is_not_what_the_metadata_says_is_refused(tmp_path):
    """The direct copy checks each blob's dtype and shape against the metadata as the tensor path does."""
    tensors = _save(tmp_path)
    reader = TorchDistReader(tmp_path)
    entry = reader.entry("t000")
    reader._metadata.tensors["t000"] = entry._replace(dtype=torch.float64)  # as a crafted .metadata would say
    with pytest.raises(CheckpointError, match="metadata says torch.float64"):
        dict(
            reader.load_many(
                sorted(tensors), direct={"t000": _segments((0, 0, 0, 8))}, payload=memoryview(bytearray(64))
            )
        )
