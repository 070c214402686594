"""The header is formatted from the payload's layout as pieces joined once (keys copied as they are when none needs
an escape, else through json's encoder, per dtype): the bytes safetensors' own save_file writes, for escaped and plain
keys side by side, empty files and a payload or loose tensors alike; `header` of any `where` order is the json of
that mapping."""

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_peft_export.io import safetensors_out


def _reference(tmp_path, tensors, metadata):
    path = tmp_path / "reference.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


def _ours(tmp_path, tensors, metadata, payload):
    path = tmp_path / "ours.safetensors"
    if payload:
        allocated = safetensors_out.allocate({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
        for key, t in tensors.items():
            allocated[key].copy_(t)
        tensors = allocated
    safetensors_out.save_file(tensors, path, metadata=metadata)
    return path.read_bytes()


CASES = {
    "plain keys": {f"base_model.model.layers.{n}.q.lora_A.weight": torch.full((2, n + 1), float(n)) for n in range(9)},
    "escapes in one dtype only": {
        **{f"plain.{n}.lora_A.weight": torch.full((2,), float(n)) for n in range(5)},
        **{name: torch.full((3,), 1.0, dtype=torch.bfloat16) for name in ['a"b', "c\\d", "e\x1ff", "tab\t"]},
    },
    "non-ascii key": {"é.weight": torch.zeros(2), "plain.weight": torch.ones(2)},
    "delete character": {"x\x7fy": torch.zeros(1), " space ": torch.ones(1)},
    "empty": {},
}


@pytest.mark.parametrize("payload", [True, False])
@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
@pytest.mark.parametrize("name", list(CASES))
def test_header_bytes_as_save_file(tmp_path, name, metadata, payload):
    tensors = CASES[name]
    assert _ours(tmp_path, tensors, metadata, payload) == _reference(tmp_path, tensors, metadata)


def test_header_of_any_order_is_the_json_of_its_mapping():
    entries = {"b": (torch.float32, (2, 3)), 'a"': (torch.float32, (4,)), "c": (torch.int64, ())}
    where = {"c": (100, 108), "b": (0, 24), 'a"': (24, 40)}  # not the payload order: written as given
    head = safetensors_out.header(entries, where, {"format": "pt"})
    size = int.from_bytes(head[:8], "little")
    expected = {"__metadata__": {"format": "pt"}}
    for key, (start, end) in where.items():
        dtype, shape = entries[key]
        expected[key] = {
            "dtype": safetensors_out.DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [start, end],
        }
    text = json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()
    assert head[8 : 8 + size].rstrip(b" ") == text and size % 8 == 0 and len(head) == 8 + size


@pytest.mark.parametrize("char", ['"', "\\", *map(chr, range(0x20)), "\x7f", "é"])
def test_each_character_json_escapes_alone(tmp_path, char):
    """Keys among which one character json escapes (or one it writes as it is, 0x7f and a non-ASCII one) is the only
    such: the bytes save_file writes."""
    tensors = {f"a{char}b.lora_A.weight": torch.zeros(2), "plain.lora_A.weight": torch.ones(2)}
    assert _ours(tmp_path, tensors, {"format": "pt"}, True) == _reference(tmp_path, tensors, {"format": "pt"})
