"""The safetensors reader (io/safetensors_in.py) that every reader of an adapter's weights and of a verification
reference goes through: the same tensors as safetensors' own reader on valid files, every crafted lie in a header
refused with one line naming the file (tests/support/hostile_safetensors.py), and a file cut by another process
while it is read is an error, not a SIGBUS (safetensors' reader maps the file)."""

import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_peft_export.errors import AdapterFileError, ExportError
from megatron_peft_export.io.peft_dir import file_tensors, read_header, weights_file
from megatron_peft_export.io.safetensors_in import open_safetensors
from tests.support import hostile_safetensors

pytestmark = pytest.mark.timeout(120)


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(4, 2, generator=gen).bfloat16(),
        "f16": torch.randn(7, generator=gen).half(),
        "f64": torch.randn(2, 2, 2, generator=gen).double(),
        "i64": torch.arange(-3, 9).reshape(3, 4),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 5),
        "f8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
    }


def test_the_reader_gives_exactly_what_safetensors_reads(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt", "iteration": "7"})
    expected = load_file(str(path))
    with open_safetensors(path) as f:
        assert sorted(f.keys()) == sorted(expected)
        assert f.metadata == {"format": "pt", "iteration": "7"}
        for key, value in expected.items():
            got = f.tensor(key)
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))
        rows = f.get_slice("f32", (slice(1, 3), slice(None)))
        assert torch.equal(rows, expected["f32"][1:3])
        assert torch.equal(f.get_slice("f32", (slice(None), slice(2, 4))), expected["f32"][:, 2:4])
        assert torch.equal(f.get_slice("f32", (slice(0, 3, 2),)), expected["f32"][0:3:2])


@pytest.mark.parametrize("name", list(hostile_safetensors.ATTACKS))
def test_a_lying_or_hostile_header_is_refused_in_one_line(tmp_path, name):
    data, words = hostile_safetensors.ATTACKS[name]
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data)
    start = time.process_time()
    with pytest.raises(AdapterFileError) as caught:
        read_header(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a valid safetensors file (") and "\n" not in message, message
    assert words in message, message
    assert len(message) < 600, message
    assert time.process_time() - start < 10


def test_the_valid_hostile_baseline_is_read(tmp_path):
    """The crafted files differ from this one only by their lie (else the refusals above could be for anything)."""
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(hostile_safetensors.raw(hostile_safetensors.GOOD))
    assert read_header(path) == {hostile_safetensors.A: ("F32", (2, 4)), hostile_safetensors.B: ("F32", (4, 2))}
    assert [k for k, _ in file_tensors(path)] == [hostile_safetensors.A, hostile_safetensors.B]


_CUT_WHILE_READING = textwrap.dedent(
    """
    import os, sys, torch
    from safetensors.torch import save_file
    from megatron_peft_export.errors import ExportError
    from megatron_peft_export.io.peft_dir import file_tensors, weights_file
    from megatron_peft_export.services.verify import load_reference

    path = sys.argv[1] + "/adapter_model.safetensors"
    tensors = {"a": torch.ones(256, 1024), "b": torch.ones(256, 1024)}
    for reader in ("file_tensors", "get_slice", "reference"):
        save_file(tensors, path)
        try:
            if reader == "file_tensors":
                for key, value in file_tensors(path):
                    os.truncate(path, 4096)  # another process cuts the file after the first tensor
            elif reader == "get_slice":
                with weights_file(path) as f:
                    os.truncate(path, 4096)
                    f.get_slice("b", (slice(0, 128), slice(None)))
            else:
                os.truncate(path, 4096)
                load_reference(path)
        except ExportError as exc:
            print(reader, type(exc).__name__, exc)
    """
)


def test_a_file_cut_while_it_is_read_is_an_error_not_a_sigbus(tmp_path):
    """safetensors' reader maps the file: a page past the cut raises SIGBUS and the process dies (the old readers did
    on each of these). Run in a child so that a crash is a failure of this test, not of pytest."""
    done = subprocess.run(
        [sys.executable, "-c", _CUT_WHILE_READING, str(tmp_path)], capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["file_tensors", "AdapterFileError"],
        ["get_slice", "AdapterFileError"],
        ["reference", "VerificationInputError"],
    ], done.stdout
    assert "truncated while being read" in lines[0] and "truncated while being read" in lines[1], done.stdout
    assert "not a valid safetensors file" in lines[2], done.stdout


def test_an_unknown_but_valid_dtype_is_named_not_read(tmp_path):
    """Packed 4-bit floats are valid safetensors that this reader does not read: refused by name."""
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(hostile_safetensors.raw(hostile_safetensors.two(hostile_safetensors.entry("F4", (64,), (0, 32)))))
    with pytest.raises(ExportError, match="has dtype 'F4'"):
        with weights_file(path):
            pass
