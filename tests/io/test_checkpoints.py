"""Megatron's checkpoint layout as io/checkpoints reads and names it (Megatron-LM's checkpointing.get_checkpoint_name
writes `iter_{:07d}`, and the tracker holds an iteration number or `release`)."""

from __future__ import annotations

import pytest

from megatron_peft_export.errors import ExportError
from megatron_peft_export.io.checkpoints import (
    iteration_dir,
    iteration_dirs,
    iteration_of,
    read_tracker,
    release_dir,
    tracker_iteration,
)


def test_names_round_trip_past_seven_digits(tmp_path):
    assert iteration_dir(tmp_path, 100) == tmp_path / "iter_0000100"
    assert iteration_dir(tmp_path, 123456789).name == "iter_123456789"
    assert release_dir(tmp_path) == tmp_path / "release"
    assert iteration_of(tmp_path / "iter_0000100" / "hf_adapter") == 100
    assert iteration_of(tmp_path / "iter_0000100") == 100
    assert iteration_of(tmp_path / "iter_abc" / "hf_adapter") is None
    assert iteration_of(tmp_path / "release" / "hf_adapter") is None


def test_iteration_dirs_are_directories_oldest_first(tmp_path):
    for name in ("iter_10000000", "iter_9999999", "iter_0000005", "iter_x", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "iter_0000007").write_text("a file")
    assert [p.name for p in iteration_dirs(tmp_path)] == ["iter_0000005", "iter_9999999", "iter_10000000"]


def test_tracker_number_release_and_absence(tmp_path):
    assert read_tracker(tmp_path) is None and tracker_iteration(tmp_path) is None
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text("42\n")
    assert read_tracker(tmp_path) == 42 == tracker_iteration(tmp_path)
    tracker.write_text("release")

    class Refused(ExportError):
        pass

    with pytest.raises(Refused, match="expected an iteration number, found 'release'"):
        read_tracker(tmp_path, error=Refused)
    assert tracker_iteration(tmp_path) is None
    tracker.unlink()
    tracker.symlink_to(tmp_path.parent / "elsewhere.txt")
    with pytest.raises(ExportError):
        read_tracker(tmp_path)
