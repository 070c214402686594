"""The offline export's bulk paths against simple per-item references written here: chunks and stored items checked
on arrays refuse exactly what a per-cell, per-item check refuses (with the same messages), multi-chunk tensors read
and copied into a payload equal what torch.load gives item by item, evenly spaced blobs match as gathering their bytes
does (also when a blob's last word would run past the buffer), and `offline_shards` gives the specs a per-matrix
construction gives."""

import dataclasses
import io
import itertools
import random
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_peft_export.core.shards import ShardSpec, spec_column
from megatron_peft_export.core.splits import stored_row_pieces
from megatron_peft_export.io.torch_save import Layout, _matching_gathered, matching
from megatron_peft_export.offline.checkpoint import CheckpointError, Segments, TorchDistReader
from megatron_peft_export.offline.dcp_metadata import Chunk, StoredItem, TensorEntry
from megatron_peft_export.offline.keys import OfflineShard, classify, offline_shards, specs_of
from tests.offline.test_batched_read import _Writer

ROWS, COLS = 8, 4


@pytest.fixture
def pieces(tmp_path):
    """A dcp checkpoint of pieces p0..p7 ([2, 4] float32 each, saved as one tensor each) and q ([4, 2])."""
    generator = torch.Generator().manual_seed(7)
    tensors = {f"p{n}": torch.randn(2, COLS, generator=generator) for n in range(8)}
    tensors["q"] = torch.randn(4, 2, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(tensors, storage_writer=_Writer(str(tmp_path), thread_count=1), no_dist=True)
    return tmp_path, tensors


def _item(reader: TorchDistReader, key: str) -> StoredItem:
    ((_, item),) = reader._items(key)
    return item


def _craft(reader: TorchDistReader, tensors: dict[str, TensorEntry], items: dict) -> TorchDistReader:
    """The reader, its metadata replaced by what a crafted .metadata would say: these tensors and stored items."""
    metadata = reader._metadata
    reader._metadata = dataclasses.replace(
        metadata, tensors=tensors, sizes={k: e.size for k, e in tensors.items()}, items=items
    )
    return reader


def _stacked(directory, order: list[int]) -> TorchDistReader:
    """A tensor w [8, 4] stored as four chunks of two rows, listed in `order`, each chunk the item of p<k>."""
    reader = TorchDistReader(directory)
    chunks = tuple(Chunk((2 * k, 0), (2, COLS)) for k in order)
    items = {("w", (2 * k, 0)): _item(reader, f"p{k}") for k in order}
    return _craft(reader, {"w": TensorEntry(torch.float32, (ROWS, COLS), chunks)}, items)


def _by_torch_load(reader: TorchDistReader, key: str) -> torch.Tensor:
    """The reference: each chunk's item read from its file and given to torch.load, put at its offsets."""
    entry = reader.entry(key)
    out = torch.empty(entry.size, dtype=entry.dtype)
    for chunk in entry.chunks:
        item = reader._metadata.items[key, chunk.offsets]
        with open(reader.directory / item.relative_path, "rb") as f:
            f.seek(item.offset)
            part = torch.load(io.BytesIO(f.read(item.length)), weights_only=True)
        out[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))] = part
    return out


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 0, 1]])
def test_a_multi_chunk_tensor_is_read_and_copied_as_torch_load_gives_it(pieces, order):
    directory, _ = pieces
    reader = _stacked(directory, order)
    expected = _by_torch_load(reader, "w")
    assert torch.equal(reader.load("w"), expected)
    raw = expected.numpy().tobytes()
    # every row of w to the payload in reverse order of rows, each a segment of its chunk (found by position here)
    rows = [(k, 2 * order[k] + r) for k in range(4) for r in range(2)]
    segments = Segments(
        *(
            np.array(column, dtype=np.int64)
            for column in zip(*((k, (row % 2) * 16, (ROWS - 1 - row) * 16, 16) for k, row in rows))
        )
    )
    payload = bytearray(ROWS * 16)
    reader = _stacked(directory, order)
    assert dict(reader.load_many(["w"], direct={"w": segments}, payload=memoryview(payload))) == {"w": None}
    assert payload == b"".join(raw[row * 16 : (row + 1) * 16] for row in reversed(range(ROWS)))


def _refused(reader: TorchDistReader, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        reader.check_stored(list(reader._metadata.tensors))


def test_hostile_chunks_and_items_are_refused_with_their_messages(pieces):
    directory, _ = pieces
    fresh = lambda: TorchDistReader(directory)  # noqa: E731
    item = _item(fresh(), "p0")
    size = (directory / item.relative_path).stat().st_size

    def one(chunks, items):
        return _craft(fresh(), {"w": TensorEntry(torch.float32, (ROWS, COLS), tuple(chunks))}, items)

    rows = [Chunk((2 * k, 0), (2, COLS)) for k in range(4)]
    good = {("w", c.offsets): _item(fresh(), f"p{n}") for n, c in enumerate(rows)}
    one(rows, good).check_stored(["w"])  # the base case is taken
    not_covered = r"w is not fully stored \(its chunks do not cover \[8, 4\] exactly once\)"
    _refused(one([rows[0], rows[0], rows[2], rows[3]], good), not_covered)  # on the grid, twice the same chunk
    uneven = [Chunk((0, 0), (3, COLS)), Chunk((2, 0), (3, COLS)), Chunk((6, 0), (2, COLS))]  # overlap and a gap
    _refused(one(uneven, {("w", c.offsets): item for c in uneven}), not_covered)
    _refused(one(rows[:3], good), not_covered)  # a row block missing
    outside = [*rows[:3], Chunk((7, 0), (1, COLS))]
    _refused(one(outside, {**good, ("w", (7, 0)): item}), not_covered)
    _refused(
        one(rows, {k: v for k, v in good.items() if k[1] != (4, 0)}), r"w has no stored item for its chunk at \[4, 0\]"
    )
    _refused(
        one(rows, {**good, ("w", (2, 0)): good["w", (2, 0)]._replace(transforms=("zstd",))}),
        r"w is stored transformed \(zstd\); only plain items are read",
    )
    _refused(
        one(rows, {**good, ("w", (6, 0)): good["w", (6, 0)]._replace(length=31)}),
        r"w claims 32 bytes of torch.float32 data in a stored item of 31 bytes",
    )
    _refused(
        one(rows, {**good, ("w", (6, 0)): good["w", (6, 0)]._replace(offset=size - 100, length=200)}),
        rf"the stored item of w claims bytes {size - 100} to {size + 100}, but the file has {size} bytes",
    )
    _refused(one(rows, {**good, ("w", (6, 0)): good["w", (0, 0)]}), r"the stored items of w and w overlap in")
    # a blob whose shape is not its chunk's (the same bytes: checked when read), by both read paths
    swapped = {**good, ("w", (2, 0)): _item(fresh(), "q")}
    with pytest.raises(CheckpointError, match=r"stored torch.float32 \[4, 2\], metadata says torch.float32 \[2, 4\]"):
        one(rows, swapped).load("w")
    segments = Segments(*(np.array(c, dtype=np.int64) for c in ([0, 1, 2, 3], [0] * 4, [0, 32, 64, 96], [32] * 4)))
    with pytest.raises(CheckpointError, match=r"stored torch.float32 \[4, 2\], metadata says torch.float32 \[2, 4\]"):
        list(one(rows, swapped).load_many(["w"], direct={"w": segments}, payload=memoryview(bytearray(128))))


def _reference_accepts(size, chunks, items, file_size) -> bool:
    """The per-cell, per-item reference: every cell of the tensor in exactly one chunk (none outside), every chunk an
    item that is plain, holds its bytes and lies inside its file, no two items sharing a byte."""
    cells = [cell for c in chunks for cell in itertools.product(*(range(o, o + n) for o, n in zip(c.offsets, c.sizes)))]
    if sorted(cells) != sorted(itertools.product(*map(range, size))):
        return False
    spans = []
    for c in chunks:
        item = items.get(("w", c.offsets))
        if item is None or item.transforms or item.length < len(list(itertools.product(*map(range, c.sizes)))) * 4:
            return False
        if item.offset + item.length > file_size:
            return False
        spans.append((item.offset, item.offset + item.length))
    return not any(_meet(p, q) for p, q in itertools.combinations(spans, 2))


def _meet(p: tuple[int, int], q: tuple[int, int]) -> bool:
    """Whether two byte ranges share a byte; an empty one meets a range it lies strictly inside."""
    (a, b), (c, d) = p, q
    if a == b or c == d:
        return (a == b) != (c == d) and (c < a < d if a == b else a < c < b)
    return max(a, c) < min(b, d)


def test_random_chunkings_and_items_are_taken_or_refused_as_the_reference_says(pieces):
    """Random boxes of a [4, 3] tensor (on and off a grid, overlapping, gapped, outside) and random items (missing,
    transformed, short, past the file's end, overlapping): check_stored refuses exactly what the reference refuses."""
    directory, _ = pieces
    base = _item(TorchDistReader(directory), "p0")
    file_size = (directory / base.relative_path).stat().st_size
    rng = random.Random(11)
    size = (4, 3)
    taken = refused = 0
    for _ in range(400):
        if rng.random() < 0.5:  # a grid, sometimes damaged
            step = (rng.choice([1, 2, 4]), rng.choice([1, 3]))
            chunks = [Chunk((r, c), step) for r in range(0, size[0], step[0]) for c in range(0, size[1], step[1])]
            if rng.random() < 0.3:
                chunks[rng.randrange(len(chunks))] = chunks[0]
        else:
            chunks = []
            for _ in range(rng.randint(1, 5)):
                r, c = rng.randrange(size[0]), rng.randrange(size[1])
                chunks.append(Chunk((r, c), (rng.randint(0, size[0] - r), rng.randint(0, size[1] - c))))
        items, at = {}, 0
        for chunk in chunks:
            need = chunk.sizes[0] * chunk.sizes[1] * 4
            length = need + rng.choice([0, 0, 0, 5, -1 if need else 0])
            offset = at if rng.random() < 0.85 else max(0, at - rng.choice([1, 3]))
            if rng.random() < 0.03:
                offset = file_size - length + 1
            item = StoredItem(base.relative_path, offset, length, ("zstd",) if rng.random() < 0.03 else ())
            if rng.random() > 0.03:
                items["w", chunk.offsets] = item
            at = offset + length + rng.choice([0, 0, 1])
        reader = _craft(TorchDistReader(directory), {"w": TensorEntry(torch.float32, size, tuple(chunks))}, items)
        expected = _reference_accepts(size, chunks, items, file_size)
        try:
            reader.check_stored(["w"])
            got = True
        except CheckpointError:
            got = False
        assert got == expected, (chunks, items)
        taken, refused = taken + got, refused + (not got)
    assert taken > 40 and refused > 100


def test_evenly_spaced_blobs_ending_at_the_buffers_end_match_as_gathering_does():
    """The last blobs' last position is the buffer's last byte: their words would run past it; steps shorter than a
    blob too."""
    rng = np.random.default_rng(5)
    for _ in range(400):
        length = int(rng.integers(1, 40))
        positions = np.unique(rng.integers(0, length, size=int(rng.integers(1, length + 1))))
        count, step = int(rng.integers(2, 1200)), int(rng.integers(0, 2 * length))
        data = rng.integers(0, 3, size=(count - 1) * step + int(positions[-1]) + 1, dtype=np.uint8)
        values = data[positions].copy()
        for n in range(1, count):
            if rng.random() < 0.8:
                data[n * step + positions] = values
        starts = np.arange(count, dtype=np.int64) * step
        layout = Layout(length, positions, values, 0, torch.uint8, 0, (), (), 0)
        buffer = bytearray(data.tobytes())
        expected = _matching_gathered(np.frombuffer(buffer, dtype=np.uint8), starts, layout)
        assert (matching(buffer, starts, layout) == expected).all()


def _offline_shards_per_matrix(found, shape, *, alpha, tp_save, gated, dtype, num_experts=None):
    """The reference: each matrix's module and layout on their own, each spec built by ShardSpec."""
    axes, dims = found.axes, 1 if found.role == "magnitude" else 2
    shared = "e" in axes and len(shape) == len(axes) - 1 + dims
    if shared:
        axes = axes.replace("e", "")
    out = []
    for index in itertools.product(*(range(n) for n in shape[: len(axes)])):
        at = dict(zip(axes, index))
        for expert in range(num_experts) if shared else [at.get("e")]:
            module = found.module.replace("{i}", str(at.get("i"))).replace("{e}", str(expert))
            local = shape[len(index) :]
            layout = found.tensor.stored(module, found.part, gated)
            for t, rows in enumerate([None] if layout == "whole" else stored_row_pieces(layout, local[0], tp_save)):
                split = rows is not None
                spec = ShardSpec(
                    module=module,
                    role=found.role,
                    part=found.part,
                    shape=(sum(n for _, n in rows), *local[1:]) if split else tuple(local),
                    split_dim=0 if split else None,
                    tp_rank=t if split else 0,
                    tp_size=tp_save if split else 1,
                    alpha=alpha,
                    dtype=dtype,
                )
                out.append((spec, found.key, index, rows))
    return out


@pytest.mark.parametrize(
    "key, shape",
    [
        ("decoder.layers.3.self_attention.linear_qkv.lora_a_sft.weight", (4, 16)),
        ("decoder.layers.1.mlp.linear_fc1.lora_b_sft.weight", (24, 4)),
        ("decoder.layers.mlp.linear_fc1.adapter.linear_out.weight", (2, 24, 4)),
        ("decoder.layers.mlp.linear_fc1.adapter.adapter_gate.linear_out.weight", (3, 12, 4)),
        ("decoder.layers.mlp.linear_fc2.adapter.weight_magnitude", (2, 16)),
        ("decoder.layers.mlp.experts.experts.linear_fc1.adapter.linear_out.weight", (2, 3, 8, 4)),
        ("decoder.layers.mlp.experts.experts.linear_fc1.adapter.linear_in.weight", (2, 4, 16)),
        ("decoder.layers.0.mlp.experts.experts.linear_fc1.lora_b_default.weight", (5, 16, 2)),
    ],
)
@pytest.mark.parametrize("tp_save", [1, 2])
def test_offline_shards_equal_specs_built_per_matrix(key, shape, tp_save):
    found = classify(key)
    assert found is not None
    settings = dict(alpha=8.0, tp_save=tp_save, gated=True, dtype="float32", num_experts=3)
    got = offline_shards(found, shape, **settings)
    expected = _offline_shards_per_matrix(found, shape, **settings)
    assert [(s.spec, s.key, s.index, s.rows) for s in got] == expected
    assert all(s.spec == e[0] and hash(s.spec) == hash(e[0]) for s, e in zip(got, expected))
    assert all(type(s) is OfflineShard and type(s.spec) is ShardSpec for s in got)
    table = specs_of(got)  # the specs the plan is given: the same, as columns
    assert list(table) == [e[0] for e in expected] and table[1:3] == [e[0] for e in expected[1:3]]
    for name in ("module", "role", "shape", "split_dim", "tp_rank", "tp_size", "alpha", "part", "dtype"):
        assert spec_column(table, name) == [getattr(e[0], name) for e in expected]


@pytest.mark.parametrize("ep", [1, 2])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_copies_into_the_payload_write_the_bytes_tensor_placements_write(tmp_path, monkeypatch, ep, layout):
    """A small MoE checkpoint saved by megatron (at EP 1, or EP 2: each key's chunks in two files) exported twice: its
    keys copied into the payload by their segments, and every key read as a tensor and placed by apply_placements
    (segments refused); every output file is the same bytes. The first export is quiet (no progress bar is made), the
    second reads through its bar."""
    from bench.moe_offline import write_checkpoint
    from megatron_peft_export.export import ExportOptions
    from megatron_peft_export.offline import export as offline_export
    from tests.support.multiprocess import run_ranks

    run_ranks(write_checkpoint, ep, 2, 4, str(tmp_path / "save"), 8, 2, timeout=600)
    options = ExportOptions(model_type="mixtral", expert_layout=layout)
    key_segments, found = offline_export._key_segments, []
    monkeypatch.setattr(offline_export, "_key_segments", lambda *args: found.append(key_segments(*args)) or found[-1])
    bars = []
    monkeypatch.setattr(offline_export, "tqdm", lambda loaded, **kwargs: bars.append(kwargs) or loaded)
    offline_export.export_checkpoint(tmp_path / "save", tmp_path / "copied", options=options, quiet=True)
    assert found and all(segments is not None for segments in found), "every key copied by its segments"
    assert not bars
    monkeypatch.setattr(offline_export, "_key_segments", lambda *args: None)
    offline_export.export_checkpoint(tmp_path / "save", tmp_path / "placed", options=options, quiet=False)
    assert len(bars) == 1 and bars[0]["unit"] == "tensor"
    files = sorted(p.name for p in (tmp_path / "placed").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "copied").iterdir()) and "adapter_model.safetensors" in files
    for name in files:
        assert (tmp_path / "copied" / name).read_bytes() == (tmp_path / "placed" / name).read_bytes(), name


def test_a_short_positional_read_is_finished_and_a_file_shrunk_while_read_refused(tmp_path, monkeypatch):
    """RegularFile.read takes one positional read's bytes; when it comes back short the rest is read after it, and
    a file that ends before the size it had when opened is refused."""
    import os

    from megatron_peft_export.io import safe_read
    from megatron_peft_export.io.safe_read import open_regular

    data = bytes(range(256)) * 40
    path = tmp_path / "f"
    path.write_bytes(data)
    pread = os.pread
    monkeypatch.setattr(safe_read.os, "pread", lambda fd, n, at: pread(fd, min(n, 1000), at))
    with open_regular(path, error=CheckpointError) as f:
        assert f.read() == data and f.read(300, 5000) == data[300:5300]
        path.write_bytes(data[:3000])  # shrinks the open file
        with pytest.raises(CheckpointError, match="ends at byte 3000, expected at least 10240"):
            f.read()
