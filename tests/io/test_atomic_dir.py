"""The adapter directory's staging against other users of a shared directory: nobody else can put anything into the
staging directory before it is published, a link swapped in for it is never followed, and leftovers planted with
the names of an interrupted export's are removed or refused without touching what they point to."""

import os
import stat

import pytest

from megatron_peft_export.errors import OutputError
from megatron_peft_export.io import atomic_dir
from megatron_peft_export.io.peft_dir import write_staging

CARD = "---\ntags:\n- megatron-peft-export\n---\n# adapter\n"


@pytest.fixture
def group_umask():
    """A shared cluster's umask, set after the package was imported: the group may write what this user creates."""
    before = os.umask(0o002)
    yield
    os.umask(before)


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_staging_directory_is_private_until_published(tmp_path, group_umask):
    """With umask 002 a group member could otherwise put `adapter_model.safetensors -> ~victim/file` into the
    staging directory between its mkdir and our write, which follows the link (os.open O_TRUNC)."""
    out = tmp_path / "hf_adapter"
    tmp = atomic_dir.staging_dir(out, False)
    assert _mode(tmp) == 0o700
    write_staging(tmp, tensors={}, config={"peft_type": "LORA"}, card=CARD)
    assert atomic_dir.publish(tmp, out, False) == out
    assert _mode(out) == 0o775  # what mkdir gives under the umask, as before


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_the_umask_is_read_when_publishing_without_changing_it(mask):
    before = os.umask(mask)
    try:
        assert atomic_dir._dir_mode() == 0o777 & ~mask
        assert os.umask(mask) == mask  # still the caller's
    finally:
        os.umask(before)


def test_a_link_swapped_in_for_the_staging_directory_is_not_followed(tmp_path):
    out, victim = tmp_path / "hf_adapter", tmp_path / "victim"
    victim.mkdir(mode=0o700)
    tmp = atomic_dir.staging_dir(out, False)
    os.rename(tmp, tmp_path / "moved")
    tmp.symlink_to(victim)
    with pytest.raises(OutputError, match="publishing the adapter"):
        atomic_dir.publish(tmp, out, False)
    assert _mode(victim) == 0o700 and not os.path.lexists(out)


def test_planted_leftovers_are_removed_as_links_or_refused(tmp_path):
    """Names of an interrupted export's leftovers (a dead pid of this host) planted as links to someone's files."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    parent = tmp_path / "out"
    parent.mkdir()
    host = atomic_dir._HOST
    dead = 2**22 + 12345  # above Linux's pid_max default: no such process
    staging = parent / f".hf_adapter.tmp-{host}-{dead}-0123abcd"
    staging.symlink_to(victim)
    atomic_dir.clean_stale(parent / "hf_adapter")
    assert not os.path.lexists(staging) and (victim / "keep").read_text() == "x"
    aside = parent / f".hf_adapter.old-{host}-{dead}-0123abcd"
    aside.symlink_to(victim)
    with pytest.raises(OutputError, match="a symbolic link"):
        atomic_dir.staging_dir(parent / "hf_adapter", True)
    assert (victim / "keep").read_text() == "x" and sorted(p.name for p in victim.iterdir()) == ["keep"]
