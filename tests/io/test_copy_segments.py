"""`copy_segments` (bytes written into a payload by offset: the offline reader's segments out of a read buffer, another
rank's transfer on the writer) copies exactly what one slice
assignment per segment copies: segments of one length and of several, long ones copied one by one, empty ones, and
more of one length than a batch holds."""

import numpy as np
import pytest

from megatron_peft_export.io import safetensors_out
from megatron_peft_export.io.safetensors_out import copy_segments


def _segments(rng, lengths: list[int], buffer_bytes: int):
    """Segments of these lengths at random places of the buffer, to disjoint places of a payload (in random order)."""
    starts = np.array([rng.integers(0, buffer_bytes - m + 1) for m in lengths], dtype=np.int64)
    slots = rng.permutation(len(lengths))
    width = max(lengths, default=1) or 1
    dsts = slots.astype(np.int64) * width
    return starts, dsts, np.array(lengths, dtype=np.int64), width * len(lengths)


def _one_by_one(payload: bytearray, buffer: np.ndarray, starts, dsts, lengths) -> None:
    view = memoryview(buffer)
    for s, d, m in zip(starts.tolist(), dsts.tolist(), lengths.tolist()):
        payload[d : d + m] = view[s : s + m]


@pytest.mark.parametrize(
    "lengths",
    [
        [64] * 300,
        [8, 64, 3, 64, 8, 0, 1],
        [safetensors_out.LONG_SEGMENT + 5, 16, safetensors_out.LONG_SEGMENT, 16],
        [0, 0],
        [],
    ],
    ids=["one-length", "several-lengths", "long", "empty", "none"],
)
def test_copy_segments_is_one_slice_assignment_each(lengths, monkeypatch):
    monkeypatch.setattr(safetensors_out, "SEGMENT_BATCH_BYTES", 1000)  # several batches of the 64-byte segments
    rng = np.random.default_rng(len(lengths))
    buffer = rng.integers(0, 256, size=3 * safetensors_out.LONG_SEGMENT, dtype=np.uint8)
    starts, dsts, lengths, size = _segments(rng, lengths, len(buffer))
    expected = bytearray(rng.integers(0, 256, size=size + 7, dtype=np.uint8).tobytes())
    found = bytearray(expected)
    _one_by_one(expected, buffer, starts, dsts, lengths)
    copy_segments(memoryview(found), buffer, starts, dsts, lengths)
    assert found == expected
