"""verify writes verification.json whole or not at all: a full or read-only disk (a real 4 KiB tmpfs and a read-only
bind
mount, and injected ENOSPC / EIO) gives exit status 2 with one `error:` line and leaves nothing behind, no temporary
`.verification.json.<hex>`, no directory created for it; only a previous result is ever replaced. A reference with an
empty probe or non-numeric metadata is bad input (exit 2), not a traceback."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_outputs import tree
from tests.e2e.test_reliability import MS_BIND, MS_RDONLY, MS_REMOUNT, _in_mount_namespace, _mount
from tests.e2e.test_verify import exported  # noqa: F401  (the module fixture: a TP2 export with its reference, and the base model)
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _verify(rank, world, argv, fault=None):
    """The verify CLI in this process, with `fault` injected into the result's write: (exit status, stderr)."""
    import contextlib
    import io

    from megatron_peft_export.cli import main

    if fault == "ENOSPC on write":

        def write(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        os.write = write
    elif fault == "EIO on fsync":

        def fsync(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        os.fsync = fsync
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return status, err.getvalue()


def _one_error_line(status, err, fragment):
    """Exit status 2, and stderr ends with the one `error:` line (before it only transformers' progress bars and
    warnings)."""
    assert status == 2, (status, err)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n") and "Traceback" not in err, err
    assert fragment in lines[0], err


@pytest.fixture
def adapter(exported, tmp_path):  # noqa: F811
    source, base = exported
    copy = tmp_path / "adapter"
    shutil.copytree(source, copy)
    (copy / "verification.json").unlink()
    return copy, base


@pytest.mark.parametrize(
    "fault,fragment", [("ENOSPC on write", "no space left on the device of"), ("EIO on fsync", "Input/output error")]
)
def test_a_failed_write_leaves_nothing_behind(adapter, tmp_path, fault, fragment):
    adapter, base = adapter
    before = tree(tmp_path)
    # in the adapter, and where directories are created for it
    for output in (
        None,
        tmp_path / "new" / "deeper" / "result.json",
    ):
        argv = ["verify", str(adapter), "--base-model", str(base), *(["--output", str(output)] if output else [])]
        (status, err) = run_ranks(_verify, 1, argv, fault)[0]
        _one_error_line(status, err, fragment)
        assert "cannot write the verification result" in err and "Nothing was written" in err
        assert tree(tmp_path) == before, "no result, no temporary file, no directory created for it"


@pytest.mark.parametrize("disk", ["full (tmpfs of 4 KiB)", "read-only (bind mount)"])
def test_a_full_or_read_only_disk_gives_one_error_line(adapter, tmp_path, disk):
    adapter, base = adapter
    out = tmp_path / "out"
    out.mkdir()
    if disk.startswith("full"):

        def setup():
            _mount("tmpfs", out, "tmpfs", 0, "size=4k")

        expected = "no space left on the device of"
    else:

        def setup():
            _mount(out, out, None, MS_BIND)
            _mount(None, out, None, MS_REMOUNT | MS_BIND | MS_RDONLY)

        expected = "is on a read-only file system"

    def run():
        found = run_ranks(
            _verify, 1, ["verify", str(adapter), "--base-model", str(base), "--output", str(out / "verification.json")]
        )[0]
        return found, sorted(p.name for p in out.iterdir())

    before = tree(adapter)
    (status, err), listing = _in_mount_namespace(setup, run)
    _one_error_line(status, err, expected)
    assert listing == [], "nothing written, no temporary file left"
    assert tree(adapter) == before


def test_only_a_previous_result_is_replaced(adapter, tmp_path):
    adapter, base = adapter
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "link.json").symlink_to(adapter / "adapter_config.json")
    (tmp_path / "notes.json").write_text('{"passed": true}')  # JSON, but not a result this tool wrote
    before = tree(tmp_path)
    for output, kind in [
        (adapter / "adapter_model.safetensors", "a file"),
        (adapter / "adapter_config.json", "a file"),
        (adapter / "verification" / "reference.safetensors", "a file"),
        (base / "config.json", "a file"),
        (tmp_path / "a-directory", "a directory"),
        (tmp_path / "link.json", "a symbolic link"),
        (tmp_path / "notes.json", "a file"),
    ]:
        (status, err) = run_ranks(
            _verify, 1, ["verify", str(adapter), "--base-model", str(base), "--output", str(output)]
        )[0]
        _one_error_line(
            status, err, f"{output} exists and is {kind}, not a verification result; only a previous result is replaced"
        )
    assert tree(tmp_path) == before
    argv = ["verify", str(adapter), "--base-model", str(base)]
    assert [run_ranks(_verify, 1, argv)[0][0] for _ in range(2)] == [0, 0], "a result replaces the previous one"
    assert json.loads((adapter / "verification.json").read_text())["passed"] is True
    assert not list(adapter.glob(".verification.json*"))


def _edit_reference(source: Path, target: Path, *, ids=None, logits=None, metadata=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if ids is not None:
        tensors["input_ids"], tensors["logits"] = ids, logits
        tensors = {k: v for k, v in tensors.items() if not k.startswith("blocks.")}
    meta.update(metadata or {})
    save_file(tensors, str(target), metadata=meta)


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("empty probe", "the probe is empty (logits (2, 0, 128))"),
        ("no vocabulary", "the probe is empty (logits (2, 16, 0))"),
        ("iteration 'five'", "metadata iteration is 'five'; expected a non-negative integer"),
        ("projection_seed -1", "metadata projection_seed is '-1'"),
        ("a 1-D block", "expected every block output projected to [batch, seq, dim] floats"),
    ],
)
def test_a_reference_that_cannot_be_compared_is_bad_input(adapter, tmp_path, case, fragment):
    import torch

    adapter, base = adapter
    reference = adapter / "verification" / "reference.safetensors"
    edited = tmp_path / "reference.safetensors"
    if case == "empty probe":
        _edit_reference(reference, edited, ids=torch.zeros(2, 0, dtype=torch.long), logits=torch.zeros(2, 0, 128))
    elif case == "no vocabulary":
        _edit_reference(reference, edited, ids=torch.zeros(2, 16, dtype=torch.long), logits=torch.zeros(2, 16, 0))
    elif case == "a 1-D block":
        from safetensors.torch import load_file, save_file

        tensors = load_file(reference)
        tensors["blocks.0.mlp"] = torch.ones(3)
        save_file(tensors, str(edited), metadata={"format": "pt"})
    else:
        name, value = case.split(" ", 1)
        _edit_reference(reference, edited, metadata={name: value.strip("'")})
    before = tree(tmp_path)
    (status, err) = run_ranks(
        _verify, 1, ["verify", str(adapter), "--base-model", str(base), "--reference", str(edited)]
    )[0]
    _one_error_line(status, err, fragment)
    assert tree(tmp_path) == before
