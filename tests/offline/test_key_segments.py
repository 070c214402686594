"""The payload segments of a checkpoint key (`offline.export._key_segments`, computed on arrays per form of shard)
copy exactly the bytes `apply_placements` copies: both are applied here, to random data, and the payloads compared,
for stacked and unstacked keys, row ranges, shards of several forms, chunks listed in any order and chunks whose bounds
cut through placements."""

import math

import pytest
import torch

from megatron_peft_export.core.plan import apply_placements
from megatron_peft_export.core.shards import Placement, ShardSpec
from megatron_peft_export.io import safetensors_out
from megatron_peft_export.offline.dcp_metadata import Chunk, TensorEntry
from megatron_peft_export.offline.export import _key_segments, _shard_data
from megatron_peft_export.offline.keys import OfflineShard


def _shard(key, index, rows, shape):
    spec = ShardSpec(module="m", role="lora_B", shape=shape, split_dim=None, tp_rank=0, tp_size=1, alpha=1.0)
    return OfflineShard(spec, spec.module, key, index, rows)


def _case(stacked: bool, cuts: list[int], shuffled: bool = False, mixed: bool = False):
    """A key [experts, 6, 3] (or [12, 3]) and its shards' placements into HF tensors [4, 3] and [8, 3] (rows taken
    in two pieces, the second half first, as a de-interleave does)."""
    size = (5, 6, 3) if stacked else (12, 3)
    bounds = [0, *cuts, size[0]]
    chunks = tuple(
        Chunk((lo,) + (0,) * (len(size) - 1), (hi - lo, *size[1:])) for lo, hi in zip(bounds, bounds[1:]) if hi > lo
    )
    entry = TensorEntry(torch.float32, size, tuple(reversed(chunks)) if shuffled else chunks)
    placed, entries = [], {}
    for n in range(size[0] if stacked else 1):
        index = (n,) if stacked else ()
        rows = ((3, 3), (0, 3)) if stacked else ((6, 6), (0, 6))
        rows = None if mixed and n % 2 else rows  # shards of two forms
        local = 6 if stacked else 12
        a, b = f"e{n}.a", f"e{n}.b"
        entries[a], entries[b] = (torch.float32, (local // 3, 3)), (torch.float32, (2 * local // 3, 3))
        placements = [
            Placement(a, (local // 3, 3), 0, 0, 0, local // 3),
            Placement(b, (2 * local // 3, 3), 0, 0, local // 3, 2 * local // 3),
        ]
        placed.append((_shard("k", index, rows, (local, 3)), placements))
    return entry, placed, entries


@pytest.mark.parametrize(
    "stacked, cuts", [(True, []), (True, [2]), (True, [1, 4]), (False, []), (False, [5]), (False, [2, 7, 8])]
)
@pytest.mark.parametrize("shuffled, mixed", [(False, False), (True, False), (True, True)])
def test_segments_copy_what_apply_placements_copies(stacked, cuts, shuffled, mixed):
    entry, placed, entries = _case(stacked, cuts, shuffled, mixed)
    data = torch.randn(entry.size)
    expected = safetensors_out.allocate(entries)
    for shard, placements in placed:
        apply_placements(expected, placements, _shard_data(data, shard))
    got = safetensors_out.allocate(entries)
    segments = _key_segments(entry, *map(list, zip(*placed)), got.entries, got.where)
    assert segments is not None and set(segments.chunk.tolist()) == set(range(len(entry.chunks)))
    raw = data.reshape(-1).view(torch.uint8).numpy().tobytes()
    row = math.prod(entry.size[1:]) * 4
    buffer = got.buffer()
    for chunk, src, dst, n in zip(*(column.tolist() for column in segments)):
        start, rows = entry.chunks[chunk].offsets[0] * row, entry.chunks[chunk].sizes[0]
        assert 0 <= src and src + n <= rows * row  # inside its chunk
        buffer[dst : dst + n] = raw[start + src : start + src + n]
    assert bytes(got.buffer()) == bytes(expected.buffer())


def test_a_placement_that_is_not_a_run_of_rows_leaves_the_key_to_apply_placements():
    entry, placed, entries = _case(True, [2])
    shard, placements = placed[3]
    placed[3] = (shard, [placements[0]._replace(dim=1), placements[1]])
    assert _key_segments(entry, *map(list, zip(*placed)), entries, safetensors_out.spans(entries)) is None
    entry, placed, entries = _case(True, [2])
    entries["e4.b"] = (torch.bfloat16, entries["e4.b"][1])  # a dtype cast
    assert _key_segments(entry, *map(list, zip(*placed)), entries, safetensors_out.spans(entries)) is None


@pytest.mark.parametrize("tp", [1, 2])
def test_stamped_columns_are_the_placements_columns(tp):
    """`_columns` of a stamped plan's shards (arrays of its combinations) gives what it gives of the same shards'
    Placement lists: in one run of positions, reversed, or scattered, and for one shard or none."""
    import random

    import numpy as np

    from megatron_peft_export.core.archs import QWEN_MOE
    from megatron_peft_export.core.plan import plan_adapter
    from megatron_peft_export.core.shards import SpecTable, StampedPlacements
    from megatron_peft_export.offline.export import _columns, _Stamped, _stamped_arrays
    from tests.core.test_plan_stamps import MOE, _moe_specs

    specs = _moe_specs(range(3), range(4), tp)
    table = plan_adapter(SpecTable(specs, [s.module for s in specs]), MOE, QWEN_MOE).placements
    assert isinstance(table, StampedPlacements)
    arrays = _stamped_arrays(table)
    rng = random.Random(tp)
    cases = [list(range(len(table))), list(range(5, 17)), list(range(len(table)))[::-1], [3], []]
    cases += [sorted(rng.sample(range(len(table)), 9)), rng.sample(range(len(table)), 9)]
    for positions in cases:
        got = _columns(_Stamped(table, np.array(positions, dtype=np.int64), arrays))
        expected = _columns([table[n] for n in positions])
        assert list(got[0]) == list(expected[0]) and got[2] == expected[2]
        for a, b in zip(got[1:2] + got[3:], expected[1:2] + expected[3:]):
            assert a.tolist() == b.tolist()
