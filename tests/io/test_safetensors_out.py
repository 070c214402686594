"""The safetensors writer gives the bytes safetensors' own save_file gives for the same tensors (the independent
reference), from its flat payload buffer and from tensors anywhere in memory."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_peft_export.io import safetensors_out

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


def _tensors(count: int, dtypes, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    found = {}
    for n in range(count):
        dtype = dtypes[n % len(dtypes)]
        shape = [(2, 3), (5,), (), (0, 4), (3, 1, 2)][n % 5]
        values = torch.randn(shape, generator=generator) * 50
        found[f"base_model.model.layers.{n % 7}.m{n}.lora_A.weight"] = (
            values > 0 if dtype == torch.bool else values.to(dtype)
        )
    return found


def _reference(tmp_path, tensors, metadata):
    path = tmp_path / "reference.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], DTYPES])
@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_same_bytes_as_save_file(tmp_path, dtypes, metadata):
    tensors = _tensors(60, dtypes)
    path = tmp_path / "written.safetensors"
    safetensors_out.save_file(tensors, path, metadata)
    assert path.read_bytes() == _reference(tmp_path, tensors, metadata)


def test_allocated_tensors_are_written_from_one_buffer_with_the_same_bytes(tmp_path, monkeypatch):
    tensors = _tensors(3000, DTYPES, seed=1)  # more than one vectored write's worth of buffers
    allocated = safetensors_out.allocate({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    assert list(allocated) == list(tensors)
    for key, tensor in tensors.items():
        allocated[key].copy_(tensor)
    writes = []
    pwritev = safetensors_out.os.pwritev
    monkeypatch.setattr(
        safetensors_out.os, "pwritev", lambda fd, bufs, at: writes.append(len(bufs)) or pwritev(fd, bufs, at)
    )
    path = tmp_path / "written.safetensors"
    safetensors_out.save_file(allocated, path, {"format": "pt"})
    assert writes == [4]  # the header (its length, JSON and padding) and the payload: one system call
    assert path.read_bytes() == _reference(tmp_path, tensors, {"format": "pt"})
    safetensors_out.save_file(dict(tensors), path, {"format": "pt"})  # tensors of their own: vectored writes
    assert len(writes) > 3
    assert path.read_bytes() == _reference(tmp_path, tensors, {"format": "pt"})


def test_non_contiguous_and_short_writes(tmp_path, monkeypatch):
    tensors = {"a": torch.arange(24.0).view(4, 6).t(), "b": torch.arange(5, dtype=torch.int64)}
    pwritev = safetensors_out.os.pwritev
    monkeypatch.setattr(safetensors_out.os, "pwritev", lambda fd, bufs, at: pwritev(fd, [bufs[0][:3]], at))
    path = tmp_path / "written.safetensors"
    safetensors_out.save_file(tensors, path)
    loaded = load_file(path)
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    assert path.read_bytes() == _reference(tmp_path, {k: t.contiguous() for k, t in tensors.items()}, None)


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        safetensors_out.save_file({"a": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x")


def test_keys_needing_escapes_give_the_same_bytes_as_save_file(tmp_path):
    """The header is formatted entry by entry: keys with quotes, backslashes, control and non-ASCII characters come
    out as safetensors writes them."""
    names = ['a"b', "back\\slash", "tab\there", "new\nline", "\x01ctl", "é.ü", "日本.weight", "plain.lora_A.weight"]
    tensors = {name: torch.full((2, n + 1), float(n)) for n, name in enumerate(names)}
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    safetensors_out.save_file(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_a_payload_is_written_from_its_buffer_without_making_its_views(tmp_path):
    """The header from names, dtypes and shapes, the payload from the buffer: the bytes safetensors writes for the
    same tensors, with views made only for the tensors asked for."""
    tensors = _tensors(500, DTYPES, seed=2)
    payload = safetensors_out.allocate({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    buffer = payload.buffer()
    keys = list(tensors)
    for key in keys[::2]:  # half filled through their views, half as bytes straight into the buffer
        payload[key].copy_(tensors[key])
    for key in keys[1::2]:
        start, end = payload.where[key]
        buffer[start:end] = tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert len(payload._views) == len(keys[::2])
    assert payload[keys[0]] is payload[keys[0]] and keys[1] in payload and "nothing" not in payload
    path = tmp_path / "written.safetensors"
    safetensors_out.save_file(payload, path, {"format": "pt"})
    assert len(payload._views) == len(keys[::2])
    assert path.read_bytes() == _reference(tmp_path, tensors, {"format": "pt"})
    assert safetensors_out.shapes(payload) == {k: tuple(t.shape) for k, t in tensors.items()}
    assert list(payload) == keys and len(payload) == len(keys)
    for key in keys:  # every view reads the bytes written
        assert torch.equal(payload[key], tensors[key])


def test_header_and_spans_match_a_plain_formatting_of_every_entry():
    """The formatted-once text per (dtype, shape) and the payload order against a direct json.dumps of the header
    (the independent rule: safetensors' order is dtype rank, then name)."""
    import json

    tensors = _tensors(300, DTYPES, seed=3)
    tensors['odd "key"\\ é\n'] = torch.zeros(2, 2)
    entries = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    where = safetensors_out.spans(entries)
    ranks = list(safetensors_out.DTYPE_NAMES)
    assert list(where) == sorted(entries, key=lambda k: (ranks.index(entries[k][0]), k))
    expected, at = {"__metadata__": {"format": "pt"}}, 0
    for key in where:
        dtype, shape = entries[key]
        size = torch.Size(shape).numel() * dtype.itemsize
        expected[key] = {
            "dtype": safetensors_out.DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [at, at + size],
        }
        at += size
    head = safetensors_out.header(entries, where, {"format": "pt"})
    text = json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    assert head == len(text).to_bytes(8, "little") + text
