"""The hook's snapshots (host_snapshot.py): the model is walked in full only when it changed, host buffers are reused
from save to save, and an adapter re-scaled, replaced or joined by another after the first save is exported as it
is at each save (every adapter equal to a synchronous export of the same weights)."""

from pathlib import Path

import pytest

from tests.support.hook_loop import checkpoint_dir
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _run(rank, world, save):
    import torch
    from megatron.core.tensor_parallel.layers import copy_tensor_model_parallel_attributes

    from megatron_peft_export import export_adapter
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from megatron_peft_export.host_snapshot import Deferred
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel

    init_parallel(world)
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()))
    fill_lora_random(model, seed=5)
    hook = AdapterExportHook(HookConfig())  # max_pending=1: each save waits for the previous export
    snapshots = hook._snapshots
    take, walks, buffers = snapshots.take, [], []

    def recording_take(*args):
        snapshot = take(*args)  # a save that has to walk copies every trainable parameter and walks in the background
        buffers.append(None if isinstance(snapshot, Deferred) else [t.data_ptr() for t in snapshot.buffers.views])
        return snapshot

    snapshots.take = recording_take
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    for iteration in range(1, 9):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora" in name:
                    p.add_(0.01 * iteration)
        if iteration == 4:  # re-scaled
            qkv._lora_adapters["default"]["scale"] = 3.0
        if iteration == 6:  # replaced by a new parameter
            lora_b = qkv._lora_adapters["default"]["lora_b"]
            new = torch.nn.Parameter(lora_b.weight.detach().clone() + 0.5)
            copy_tensor_model_parallel_attributes(new, lora_b.weight)
            lora_b.weight = new
        if iteration == 7:  # another named adapter joins (new modules); "default" is still the one exported
            apply_modelopt_lora(model, adapter_name="other", rank=4)
        directory = checkpoint_dir(save, iteration)
        export_adapter(model, Path(save) / f"reference_{iteration}")
        hook.on_checkpoint_saved(iteration, directory, model)
        hook._pending[-1].result()
        walks.append(snapshots.walks)
    hook.finalize()
    return {"published": [Path(p).parent.name for p in hook.published], "walks": walks, "buffers": buffers}


def test_walks_only_when_the_model_changed_reuses_buffers_and_exports_every_change(tmp_path):
    from safetensors.torch import load_file

    results = run_ranks(_run, 2, str(tmp_path))
    assert results[0]["published"] == [f"iter_{i:07d}" for i in range(1, 9)]
    for result in results:
        assert result["walks"] == [1, 1, 1, 2, 2, 3, 4, 4], (
            "full walks at saves 1, 4 (re-scaled), 6 (replaced) and 7 (new modules)"
        )
        ptrs = result["buffers"]
        assert [i + 1 for i, p in enumerate(ptrs) if p is None] == [1, 4, 6, 7], "the saves that walk do it later"
        assert ptrs[1] == ptrs[2], "saves reuse the buffers of the previous export"
    for iteration in range(1, 9):
        ours, reference = (tmp_path / f"iter_{iteration:07d}" / "hf_adapter"), tmp_path / f"reference_{iteration}"
        a, b = load_file(ours / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), iteration
        assert (ours / "adapter_config.json").read_text() == (reference / "adapter_config.json").read_text(), iteration


def _remove_adapter(linear, name):
    """What a user removing one ModelOpt adapter from one module does: its entry and its two modules go (no module is
    registered, so only the check of what the dialect reports can notice)."""
    linear._lora_adapters.pop(name)
    delattr(linear, f"lora_a_{name}")
    delattr(linear, f"lora_b_{name}")


def _carriers_of(model, name):
    return [m for m in model.modules() if name in getattr(m, "_lora_adapters", {})]


def _added_and_removed_run(rank, world, save):
    from megatron_peft_export import export_adapter, export_adapters
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from tests.support.hook_loop import lora_model, optimizer_step
    from tests.support.tiny_gpt import apply_modelopt_lora, fill_lora_random

    model = lora_model(world)
    one = AdapterExportHook(HookConfig(subdir="one"))
    every = AdapterExportHook(HookConfig(subdir="every", adapter_names="all"))
    layers = model.decoder.layers
    changes = {
        2: lambda: fill_lora_random(apply_modelopt_lora(model, adapter_name="other", rank=4), seed=7),
        3: lambda: _remove_adapter(layers[0].self_attention.linear_qkv, "other"),
        4: lambda: _remove_adapter(layers[1].mlp.linear_fc2, "default"),
        5: lambda: [_remove_adapter(m, "other") for m in _carriers_of(model, "other")],
    }
    one.prepare(model)  # walks now: its first save only copies
    walks = [(one._snapshots.walks, every._snapshots.walks)]
    for iteration in range(1, 7):
        optimizer_step(model, iteration)
        changes.get(iteration, lambda: None)()
        directory = checkpoint_dir(save, iteration)
        export_adapter(model, Path(save) / f"reference_one_{iteration}")
        export_adapters(model, Path(save) / f"reference_every_{iteration}")
        for hook in (one, every):
            hook.on_checkpoint_saved(iteration, directory, model)
            hook.finalize()
        walks.append((one._snapshots.walks, every._snapshots.walks))
    return walks


def _same_adapters(ours: Path, reference: Path) -> None:
    """The same directory tree, with byte-identical weights and configs."""
    from safetensors.torch import load_file

    names = sorted(p.relative_to(ours) for p in ours.rglob("adapter_model.safetensors"))
    assert names == sorted(p.relative_to(reference) for p in reference.rglob("adapter_model.safetensors")), ours
    for name in names:
        a, b = load_file(ours / name), load_file(reference / name)
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and (a[k] == b[k]).all() for k in a), ours / name
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), ours / name
        config = name.with_name("adapter_config.json")
        assert (ours / config).read_text() == (reference / config).read_text(), ours / config


def test_adapters_added_and_removed_between_saves_are_noticed(tmp_path):
    """Adding an adapter, removing one from a module (no module is registered then) or removing it everywhere between
    saves is noticed at the next save: each export equals a synchronous export of the model as it is then, for one
    adapter and for all of them. A hook prepared before training does not walk at its first save."""
    results = run_ranks(_added_and_removed_run, 2, str(tmp_path))
    for walks in results:
        assert [one for one, _ in walks] == [1, 1, 2, 2, 3, 3, 3], (
            "one adapter: prepared, new modules at 2, removed at 4"
        )
        assert [every for _, every in walks] == [0, 1, 2, 3, 4, 5, 5], "all of them: each change noticed, then cached"
    for iteration in range(1, 7):
        directory = tmp_path / f"iter_{iteration:07d}"
        _same_adapters(directory / "one", tmp_path / f"reference_one_{iteration}")
        _same_adapters(directory / "every", tmp_path / f"reference_every_{iteration}")
    assert (tmp_path / "iter_0000002" / "every" / "other").is_dir()
    assert not (tmp_path / "iter_0000005" / "every" / "other").exists()


def _first_save_run(rank, world, save):
    """A hook never prepared: its first save copies the trainable parameters and walks later. The walk is held until
    the training thread has stepped past the save, so the export can only be right if it took the save's values."""
    import threading

    import torch

    from megatron_peft_export import export_adapters
    from megatron_peft_export import host_snapshot as hs
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from tests.support.hook_loop import LogRecords, lora_model
    from tests.support.tiny_gpt import apply_modelopt_lora, fill_lora_random

    model = lora_model(world)
    fill_lora_random(apply_modelopt_lora(model, adapter_name="other", rank=4), seed=7)
    other = [p for name, p in model.named_parameters() if "lora_" in name and "_other" in name]
    for p in other:  # a frozen adapter: not copied at a deferred save, read later if provably unwritten
        p.requires_grad_(False)
    stepped, walk = threading.Event(), hs.take_snapshots

    def held_walk(*args, **kwargs):  # the hook's walk, in the background (not export_adapters' on this thread)
        assert threading.current_thread() is threading.main_thread() or stepped.wait(60)
        return walk(*args, **kwargs)

    hs.take_snapshots = held_walk
    hook = AdapterExportHook(HookConfig(adapter_names="all"))
    outcomes = []
    with LogRecords() as records:
        for iteration, write_frozen in ((1, False), (2, True), (3, True)):
            export_adapters(model, Path(save) / f"reference_{iteration}")
            if iteration == 2:  # the next save walks again (a registration), and is held again
                model.decoder.layers[0].register_parameter("probe", torch.nn.Parameter(torch.zeros(1), False))
                stepped.clear()
            hook.on_checkpoint_saved(iteration, checkpoint_dir(save, iteration), model)
            with torch.no_grad():  # the optimizer step right after the save, before the walk
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.01 * iteration)
            if write_frozen:
                with torch.no_grad():
                    other[0].add_(1.0)
            stepped.set()
            hook._pending[-1].result()
            outcomes.append(len(hook.published) if rank == 0 else None)
    hook.finalize()
    return outcomes, hook._snapshots.walks, records.messages


def test_a_first_save_without_prepare_exports_the_values_at_the_save(tmp_path):
    """The walk of a save that has to walk runs in the background; the adapter is the one of the save (its trainable
    tensors copied then), byte for byte; a frozen adapter tensor written after such a save fails that export, named,
    and never exports a value from after the save. A save with the model walked already copies what the walk found."""
    results = run_ranks(_first_save_run, 2, str(tmp_path))
    (outcomes, walks, messages), _ = results
    assert walks == 2 and outcomes == [1, 1, 2], "save 2 walked again and failed; save 3 used that walk"
    _same_adapters(tmp_path / "iter_0000001" / "hf_adapter", tmp_path / "reference_1")
    assert not (tmp_path / "iter_0000002" / "hf_adapter").exists()
    assert any("written after the save" in m and "hook.prepare(model)" in m for m in messages), messages
    _same_adapters(tmp_path / "iter_0000003" / "hf_adapter", tmp_path / "reference_3")


def _walk_fails_run(rank, world, save):
    from megatron_peft_export import host_snapshot as hs
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from tests.support.hook_loop import LogRecords, lora_model

    model = lora_model(world)
    walk = hs.take_snapshots

    def failing_walk(*args, **kwargs):
        if rank == 1:
            raise RuntimeError("a module that cannot be read")
        return walk(*args, **kwargs)

    hs.take_snapshots = failing_walk
    hook = AdapterExportHook(HookConfig(collective_timeout=60))
    with LogRecords() as records:
        hook.on_checkpoint_saved(1, checkpoint_dir(save, 1), model)
        hook.finalize()
    hs.take_snapshots = walk
    hook.on_checkpoint_saved(2, checkpoint_dir(save, 2), model)
    hook.finalize()
    return [Path(p).parent.name for p in hook.published], records.messages


def test_a_walk_that_fails_in_the_background_fails_that_export_on_every_rank(tmp_path):
    """An unexpected error while one rank walks in the background reaches every rank at the export's first agreement
    (no rank waits for the collective's timeout, the group stays usable): that export is skipped, the next is made."""
    (published, messages), _ = run_ranks(_walk_fails_run, 2, str(tmp_path))
    assert published == ["iter_0000002"]
    assert any("rank 1: walking the model failed" in m and "a module that cannot be read" in m for m in messages), (
        messages
    )
