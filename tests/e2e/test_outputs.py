"""Outputs never touch inputs: an export refuses, whatever --overwrite says, an output that is, contains or lies inside
the checkpoint being read (or the save directory, or the base model's directory), and replaces an existing output only
when it is an adapter directory this tool published. Every file of the checkpoint hashes the same afterwards.

Also the cleanup of what an overwrite set aside, file or directory, and the parents an export created for nothing."""

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from megatron_peft_export.io import atomic_dir, peft_dir
from tests.e2e.test_offline_export import ITERATION, _train_save_and_export_live
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
ITER = f"iter_{ITERATION:07d}"


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under `root` without following links: files by hash, links by target, directories, others by kind."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            mode = path.lstat().st_mode
            key = str(path.relative_to(root))
            if stat.S_ISLNK(mode):
                found[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(mode):
                found[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                found[key] = ("dir",) if stat.S_ISDIR(mode) else ("special", stat.S_IFMT(mode))
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A torch_dist checkpoint (save/iter_0000005, tracker included) of the tiny model with ModelOpt LoRA, its live
    export
    (live/), and the HF base model's config (base/)."""
    tmp = tmp_path_factory.mktemp("outputs")
    run_ranks(_train_save_and_export_live, 1, str(tmp), 1, 1, "modelopt")
    run_ranks(_save_base_config, 1, str(tmp / "base"))
    return tmp


def _save_base_config(rank, world, path):
    from tests.support.tiny_gpt import TinyGPTConfig, hf_llama_twin

    hf_llama_twin(TinyGPTConfig()).config.save_pretrained(path)


def _cli_many(rank, world, argvs):
    """Each argv through the CLI in this one process: (exit status, stderr) each."""
    import contextlib
    import io

    from megatron_peft_export.cli import main

    found = []
    for argv in argvs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            found.append((main([*argv, "--quiet"]), err.getvalue()))
    return found


@pytest.fixture
def work(exported, tmp_path):
    shutil.copytree(exported / "save", tmp_path / "save")
    shutil.copytree(exported / "base", tmp_path / "base")
    return tmp_path


# (checkpoint argument, output, extra flags, what the one error line says); paths relative to the test's directory
REFUSED = {
    "the iteration": (f"save/{ITER}", f"save/{ITER}", [], "is the checkpoint being read"),
    "the save directory": ("save", "save", [], "is the checkpoint being read"),
    "the save directory, reading the iteration": (f"save/{ITER}", "save", [], "contains the checkpoint being read"),
    "a parent of the save directory": ("save", ".", [], "contains the checkpoint being read"),
    "common.pt": (
        f"save/{ITER}",
        f"save/{ITER}/common.pt",
        [],
        "already exists and is a file, part of the checkpoint being read",
    ),
    ".metadata": (
        f"save/{ITER}",
        f"save/{ITER}/.metadata",
        [],
        "already exists and is a file, part of the checkpoint being read",
    ),
    "inside modelopt_state": (
        f"save/{ITER}",
        f"save/{ITER}/modelopt_state/adapter",
        [],
        "lies inside the checkpoint being read",
    ),
    "a new directory two levels inside": (
        f"save/{ITER}",
        f"save/{ITER}/a/b",
        [],
        "lies inside the checkpoint being read",
    ),
    "the tracker file": ("save", "save/latest_checkpointed_iteration.txt", [], "already exists and is a file;"),
    "a link to the iteration": (f"save/{ITER}", "link-to-iteration", [], "is the checkpoint being read"),
    "a link to the save directory": (f"save/{ITER}", "link-to-save", [], "contains the checkpoint being read"),
    "inside a link to the iteration": (
        f"save/{ITER}",
        "link-to-iteration/modelopt_state",
        [],
        "already exists and is a directory without the model card",
    ),
    "the base model directory": (
        f"save/{ITER}",
        "base",
        ["--base-model", "base"],
        "is the base model directory being read",
    ),
    "a directory of the user's": (
        f"save/{ITER}",
        "mine",
        [],
        "already exists and is a directory without the model card",
    ),
    "a file of the user's": (f"save/{ITER}", "notes.txt", [], "already exists and is a file;"),
    "a link to a file": (f"save/{ITER}", "link-to-notes", [], "already exists and is a symbolic link to notes.txt"),
}


def _prepare(work: Path) -> None:
    (work / "link-to-iteration").symlink_to(work / "save" / ITER)
    (work / "link-to-save").symlink_to(work / "save")
    (work / "mine").mkdir()
    (work / "mine" / "thesis.tex").write_text("three years of work")
    (work / "notes.txt").write_text("notes")
    (work / "link-to-notes").symlink_to("notes.txt")


@pytest.mark.parametrize("overwrite", [True, False], ids=["--overwrite", "no --overwrite"])
def test_an_export_onto_its_input_or_onto_what_it_did_not_publish_is_refused_and_changes_nothing(work, overwrite):
    _prepare(work)
    before = tree(work)
    argvs = [
        [
            "export",
            str(work / ckpt),
            "--output",
            str(work / out),
            *(["--overwrite"] if overwrite else []),
            *[str(work / a) if a == "base" else a for a in extra],
        ]
        for ckpt, out, extra, _ in REFUSED.values()
    ]
    for case, (status, err) in zip(REFUSED, run_ranks(_cli_many, 1, argvs)[0]):
        assert status == 2, (case, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (case, err)
        assert REFUSED[case][3] in err, (case, err)
    assert tree(work) == before, (
        "no byte of the checkpoint, the base model or the user's files may change, and nothing is left behind"
    )


def test_an_adapter_directly_in_the_iteration_is_written_and_replaced_only_as_ours(work):
    checkpoint = tree(work / "save")
    adapter = work / "save" / ITER / "hf_adapter"
    export = ["export", str(work / "save" / ITER), "--output", str(adapter)]
    (first, again, replaced) = run_ranks(_cli_many, 1, [export, export, [*export, "--overwrite"]])[0]
    assert first[0] == 0 and replaced[0] == 0, (first, replaced)
    assert again[0] == 2 and "already exists; expected a new directory. Pass overwrite=True (--overwrite)" in again[1]
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert {k: v for k, v in tree(work / "save").items() if not k.startswith(f"{ITER}/hf_adapter")} == checkpoint
    (adapter / "README.md").write_text("# my own card\n")  # no longer recognisably ours: never replaced
    [(status, err)] = run_ranks(_cli_many, 1, [[*export, "--overwrite"]])[0]
    assert status == 2 and "is a directory without the model card (README.md) megatron-peft-export writes" in err
    assert (adapter / "README.md").read_text() == "# my own card\n"


def test_an_adapter_of_an_older_version_is_recognised_by_its_card(exported, tmp_path):
    """Every version wrote README.md with the megatron-peft-export tag (the first one, 02ff3de, without
    pipeline_tag)."""
    old = tmp_path / "old"
    shutil.copytree(exported / "live", old)
    (old / "README.md").write_text(
        '---\nlibrary_name: peft\nbase_model: "/models/x"\ntags:\n- lora\n- megatron\n- '
        "megatron-peft-export\n---\n\n# LoRA\n"
    )
    assert peft_dir.is_published_adapter(old)
    (old / "README.md").write_text("---\ntags:\n- lora\n---\n")
    assert not peft_dir.is_published_adapter(old)
    (old / "README.md").unlink()
    (old / "README.md").symlink_to(exported / "live" / "README.md")
    assert not peft_dir.is_published_adapter(old), "a link is never ours, whatever it points to"
    link = tmp_path / "link"
    link.symlink_to(exported / "live")
    assert peft_dir.is_published_adapter(exported / "live") and not peft_dir.is_published_adapter(link)


def _live_exports(rank, world, tmp):
    from megatron_peft_export import ExportError, export_adapter
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from tests.support.hook_loop import LogRecords
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel

    init_parallel(world)
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()), scale=1.5)
    fill_lora_random(model, seed=17)
    found = {}
    for case, output, kwargs in [
        ("the save directory", "save", {}),
        ("the base model", "base", {"base_model_name_or_path": f"{tmp}/base"}),
        ("a directory of the user's", "mine", {}),
    ]:
        try:
            export_adapter(model, Path(tmp) / output, overwrite=True, **kwargs)
            found[case] = "written"
        except ExportError as exc:
            found[case] = f"{type(exc).__name__}: {exc}"
    with LogRecords() as records:  # the hook: a subdir that names a directory of the checkpoint
        hook = AdapterExportHook(HookConfig(subdir="modelopt_state", sigterm_grace=None))
        hook.on_checkpoint_saved(ITERATION, Path(tmp) / "save" / ITER, model)
        hook.finalize()
    found["hook"] = [line for line in records.lines if "failed" in line]
    return found


def test_live_exports_and_the_hook_refuse_to_replace_what_they_did_not_publish(work):
    _prepare(work)
    before = tree(work)
    results = run_ranks(_live_exports, 2, str(work))
    for found in results:  # the same error on every rank
        assert (
            found["the save directory"].startswith("OutputError: ")
            and "already exists and is a directory without the model card" in found["the save directory"]
        )
        assert "is the base model directory being read" in found["the base model"], found
        assert "already exists and is a directory without the model card" in found["a directory of the user's"], found
        assert {k: v for k, v in found.items() if k != "hook"} == {k: v for k, v in results[0].items() if k != "hook"}
    [line] = results[0]["hook"]
    assert (
        "export for iteration 5 failed; training continues" in line
        and f"{ITER}/modelopt_state already exists and is a directory" in line
    )
    assert tree(work) == before


# ------------------------------------------------------------------------------------------- cleanup, file or directory


def test_cleanup_removes_set_aside_files_and_links_without_following_them(tmp_path):
    """What an interrupted overwrite set aside (`.NAME.old-*`) is removed whatever it is; a link's target stays."""
    out = tmp_path / "out"
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data").write_text("keep")
    dead = 2**22 + 7  # beyond pid_max's default: no such process
    file_left = tmp_path / f".out.old-{atomic_dir._HOST}-{dead}-0000000a"
    link_left = tmp_path / f".out.old-{atomic_dir._HOST}-{dead}-0000000b"
    staged_link = tmp_path / f".out.tmp-{atomic_dir._HOST}-{dead}-0000000c"
    out.mkdir()  # there is an output, so nothing set aside is put back
    file_left.write_text("set aside")
    link_left.symlink_to(target)
    staged_link.symlink_to(target)
    removed = atomic_dir.clean_stale(out)
    assert sorted(p.name for p in removed) == sorted([file_left.name, link_left.name, staged_link.name])
    assert not any(os.path.lexists(p) for p in (file_left, link_left, staged_link)), "nothing set aside stays for ever"
    assert (target / "data").read_text() == "keep", "a link is removed, never followed"


def test_publish_replaces_only_a_published_adapter_and_removes_what_it_set_aside(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        tmp = atomic_dir.staging_dir(out, True)
        peft_dir.write_staging(
            tmp, tensors={}, config={"peft_type": "LORA"}, card="---\ntags:\n- megatron-peft-export\n---\n"
        )
        atomic_dir.publish(tmp, out, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the replaced directory is removed"
    tmp = atomic_dir.staging_dir(out, True)
    shutil.rmtree(out)
    out.symlink_to(tmp_path)  # appears between staging and publish
    with pytest.raises(atomic_dir.OutputError, match="is now a symbolic link"):
        atomic_dir.publish(tmp, out, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and out.is_symlink(), (
        "the link stays, the staging is gone"
    )


def test_a_failed_export_leaves_no_parent_directory_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    tmp = atomic_dir.staging_dir(out, False)
    assert tmp.parent == tmp_path / "a" / "b"
    atomic_dir.discard(tmp)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine").write_text("x")
    atomic_dir.discard(atomic_dir.staging_dir(out, False))
    assert tree(tmp_path) == {"a": ("dir",), "a/mine": tree(tmp_path)["a/mine"]}, (
        "a parent that existed, or is not empty, stays"
    )
