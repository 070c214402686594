"""Whether a tensor's chunks overlap (offline/checkpoint.py `_overlapping`): the even-grid shortcut answers as the
pairwise comparison does, on split tensors, shifted, duplicated and mixed chunks."""

import itertools
import random

import pytest
import torch

from megatron_peft_export.offline.checkpoint import _overlapping, _overlapping_pairs
from megatron_peft_export.offline.dcp_metadata import Chunk, TensorEntry


def _entry(size, chunks):
    return TensorEntry(torch.float32, tuple(size), tuple(Chunk(tuple(o), tuple(s)) for o, s in chunks))


def _grid(size, parts):
    """The tensor split evenly into parts[d] pieces along each dim d."""
    step = [n // p for n, p in zip(size, parts)]
    return [([k * s for k, s in zip(ks, step)], step) for ks in itertools.product(*(range(p) for p in parts))]


def _by_pairs(entry):
    chunks = [c for c in entry.chunks if c.numel]
    return len(chunks) > 1 and _overlapping_pairs(chunks)


@pytest.mark.parametrize(
    "chunks,overlap",
    [
        (_grid((256, 4, 8), (256, 1, 1)), False),  # experts, one chunk each
        (_grid((8, 16), (2, 4)), False),
        (_grid((8, 16), (2, 4)) + [([4, 8], [4, 4])], True),  # one chunk twice
        ([([0, 0], [4, 16]), ([2, 0], [4, 16])], True),  # one size, off the grid
        ([([0, 0], [4, 16]), ([4, 0], [2, 16]), ([6, 0], [2, 16])], False),  # two sizes
        ([([0, 0], [4, 16]), ([3, 0], [2, 16]), ([6, 0], [2, 16])], True),
        ([([0, 0], [8, 16]), ([0, 0], [0, 16])], False),  # an empty chunk meets nothing
    ],
    ids=["experts", "grid", "grid, one twice", "shifted", "two sizes", "two sizes, overlapping", "empty"],
)
def test_overlap(chunks, overlap):
    entry = _entry((8, 16) if len(chunks[0][0]) == 2 else (256, 4, 8), chunks)
    assert _overlapping(entry) == overlap == _by_pairs(entry)


def test_the_grid_shortcut_answers_as_pairs_do_on_random_layouts():
    rng = random.Random(5)
    grid = 0
    for _ in range(600):
        dims = rng.randint(1, 3)
        step = [rng.choice([1, 2, 3, 4]) for _ in range(dims)]
        parts = [rng.randint(1, 4) for _ in range(dims)]
        size = [s * p for s, p in zip(step, parts)]
        chunks = _grid(size, parts)
        rng.shuffle(chunks)
        chunks = chunks[: rng.randint(1, len(chunks))]
        if rng.random() < 0.3:  # a chunk again
            chunks.append(rng.choice(chunks))
        if rng.random() < 0.3:  # a chunk moved off the grid or resized
            n, d = rng.randrange(len(chunks)), rng.randrange(dims)
            offsets, sizes = list(chunks[n][0]), list(chunks[n][1])
            if rng.random() < 0.5 and offsets[d] + sizes[d] < size[d]:
                offsets[d] += 1
            elif sizes[d] > 1:
                sizes[d] -= 1
            chunks[n] = (offsets, sizes)
        entry = _entry(size, chunks)
        grid += len({c.sizes for c in entry.chunks}) == 1
        assert _overlapping(entry) == _by_pairs(entry), chunks
    assert grid > 200  # the shortcut was taken often
