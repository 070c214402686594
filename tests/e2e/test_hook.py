"""The training hook on real megatron-core models in real gloo processes: consistency, no stall, async publishing,
errors."""

import threading
from pathlib import Path

import pytest

from tests.support.hook_loop import LogRecords, checkpoint_dir, lora_model, optimizer_step
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def _consistent_run(rank, world, save):
    from megatron_peft_export import export_adapter
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook

    model = lora_model(world)
    hook = AdapterExportHook(HookConfig(max_pending=2))
    for iteration in (1, 2, 3):
        optimizer_step(model, iteration)
        directory = checkpoint_dir(save, iteration)
        export_adapter(model, Path(save) / f"reference_{iteration}")  # synchronous, same weights
        hook.on_checkpoint_saved(iteration, directory, model)
    hook.finalize()
    return [str(p) for p in hook.published]


def test_each_adapter_holds_its_iterations_weights(tmp_path):
    from safetensors.torch import load_file

    published = run_ranks(_consistent_run, 2, str(tmp_path))
    assert published[1] == []
    assert published[0] == [str(tmp_path / f"iter_000000{i}" / "hf_adapter") for i in (1, 2, 3)]
    tensors = []
    for i in (1, 2, 3):
        adapter = tmp_path / f"iter_000000{i}" / "hf_adapter"
        assert sorted(p.name for p in adapter.iterdir()) == ADAPTER_FILES
        ours, reference = (
            load_file(adapter / "adapter_model.safetensors"),
            load_file(tmp_path / f"reference_{i}" / "adapter_model.safetensors"),
        )
        assert ours.keys() == reference.keys() and all((ours[k] == reference[k]).all() for k in ours)
        tensors.append(ours)
    key = next(iter(tensors[0]))
    assert not (tensors[0][key] == tensors[2][key]).all(), "iterations should differ"


def _slow_export_run(rank, world, save):
    import megatron_peft_export.hook as hook_module
    from megatron_peft_export import export_adapter
    from megatron_peft_export.config import HookConfig

    events, release = [], threading.Event()
    original = hook_module.run_export

    def slow_run_export(*args, **kwargs):
        events.append("export started")
        assert release.wait(timeout=120)
        result = original(*args, **kwargs)
        events.append("export finished")
        return result

    hook_module.run_export = slow_run_export
    model = lora_model(world)
    hook = hook_module.AdapterExportHook(HookConfig(max_pending=1))
    optimizer_step(model, 1)
    export_adapter(model, Path(save) / "reference_1")
    hook.on_checkpoint_saved(1, checkpoint_dir(save, 1), model)
    events.append("save 1 returned")
    for iteration in (2, 3):  # training goes on while export 1 waits
        optimizer_step(model, iteration)
        events.append(f"iteration {iteration}")
    release.set()
    hook.on_checkpoint_saved(3, checkpoint_dir(save, 3), model)  # max_pending=1: waits for export 1 first
    events.append("save 3 returned")
    hook.finalize()
    events.append("finalized")
    return events


def test_training_advances_while_an_export_is_in_flight(tmp_path):
    from safetensors.torch import load_file

    for events in run_ranks(_slow_export_run, 2, str(tmp_path)):
        assert (
            events.index("save 1 returned")
            < events.index("iteration 2")
            < events.index("iteration 3")
            < events.index("export finished")
        )
        assert events.index("export finished") < events.index("save 3 returned")  # the bound on pending exports
        assert events.count("export finished") == 2 and events[-1] == "finalized"
    ours = load_file(tmp_path / "iter_0000001" / "hf_adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "reference_1" / "adapter_model.safetensors")
    assert all((ours[k] == reference[k]).all() for k in reference), "export 1 must hold iteration 1's weights"
    assert (tmp_path / "iter_0000003" / "hf_adapter" / "adapter_model.safetensors").exists()


def _async_run(rank, world, save):
    import time

    import torch.distributed as dist

    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from megatron_peft_export.io.checkpoints import TRACKER

    model = lora_model(world)
    hook = AdapterExportHook(HookConfig(publish_timeout=1.0))
    seen = {}
    hook.on_checkpoint_saved(1, checkpoint_dir(save, 1, tracker=False), model, finalized=False)
    hook._pending[0].result()  # the export itself is done; publishing waits for the tracker
    seen["before tracker"] = (Path(save) / "iter_0000001" / "hf_adapter").exists()
    dist.barrier()
    if rank == 0:
        (Path(save) / TRACKER).write_text("1")
        deadline = time.monotonic() + 60
        while not hook.published and time.monotonic() < deadline:
            time.sleep(0.05)
    seen["after tracker"] = (Path(save) / "iter_0000001" / "hf_adapter").exists()
    dist.barrier()
    hook.on_checkpoint_saved(2, checkpoint_dir(save, 2, tracker=False), model, finalized=False)  # never finalized
    hook.finalize()
    seen["never finalized"] = (Path(save) / "iter_0000002" / "hf_adapter").exists()
    return seen


def test_async_saves_publish_only_after_the_tracker(tmp_path):
    results = run_ranks(_async_run, 2, str(tmp_path))
    assert results[0] == {"before tracker": False, "after tracker": True, "never finalized": False}
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == [], leftovers


def _failing_run(rank, world, save, on_error):
    from megatron_peft_export import ExportError
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook

    records = LogRecords()
    model = lora_model(world)
    hook = AdapterExportHook(HookConfig(on_error=on_error))
    blocked = Path(save) / "blocked"
    if rank == 0:
        blocked.write_text("a file where the checkpoint directory should be")
    outcome = []
    try:
        for iteration in (1, 2):
            hook.on_checkpoint_saved(iteration, blocked, model)
            optimizer_step(model, iteration)
            outcome.append(f"trained {iteration}")
        hook.finalize()
        outcome.append("finalized")
    except ExportError as exc:
        outcome.append(f"{type(exc).__name__}: {exc}")
    return outcome, records.messages


def test_on_error_warn_keeps_training_and_reports_once_per_save_on_one_rank(tmp_path):
    (r0, logs0), (r1, logs1) = run_ranks(_failing_run, 2, str(tmp_path), "warn")
    assert r0 == r1 == ["trained 1", "trained 2", "finalized"]
    assert len(logs0) == 2 and logs1 == []
    assert all("training continues" in m and "cannot write the adapter" in m for m in logs0)


def test_on_error_raise_stops_every_rank_with_the_same_error(tmp_path):
    (r0, _), (r1, _) = run_ranks(_failing_run, 2, str(tmp_path), "raise")
    assert r0 == r1, "every rank stops at the same call with the same error"
    assert (
        r0[0] == "trained 1" and "finalized" not in r0
    )  # it stops at save 2 or at finalize, whichever sees the failure first
    assert r0[-1].startswith("OutputError: cannot write the adapter")


def _skips_run(rank, world, save):
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook

    model = lora_model(world)
    hook = AdapterExportHook(HookConfig(every_n_saves=2, subdir="peft"))
    for iteration in (1, 2, 3, 4):
        hook.on_checkpoint_saved(iteration, checkpoint_dir(save, iteration), model, non_persistent=iteration == 2)
    hook.finalize()
    return [Path(p).parent.name for p in hook.published]


def test_non_persistent_saves_are_skipped_and_every_n_counts_persistent_saves(tmp_path):
    assert run_ranks(_skips_run, 2, str(tmp_path))[0] == ["iter_0000003"]
    assert sorted(p.parent.name for p in tmp_path.glob("iter_*/peft")) == ["iter_0000003"]


def _real_training_run(rank, world, save):
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from tests.support.training import TrainConfig, run_training

    hook = AdapterExportHook(HookConfig(max_pending=2))
    history = run_training(
        TrainConfig(tp=world), steps=6, save_interval=2, save_dir=save, on_save=hook.on_checkpoint_saved, log=None
    )
    hook.finalize()
    return history


def _offline_export(rank, world, checkpoint, out):
    from megatron_peft_export.offline.export import export_checkpoint

    export_checkpoint(checkpoint, out, quiet=True)


def test_tp2_training_run_leaves_one_adapter_per_save_equal_to_its_checkpoint(tmp_path):
    """Training moves on while the hook exports; each adapter must equal the one converted from its own checkpoint."""
    from safetensors.torch import load_file

    history = run_ranks(_real_training_run, 2, str(tmp_path))[0]
    assert history[-1] < history[0]
    adapters = sorted(tmp_path.glob("iter_*/hf_adapter"))
    assert [a.parent.name for a in adapters] == ["iter_0000002", "iter_0000004", "iter_0000006"]
    first = load_file(adapters[0] / "adapter_model.safetensors")
    for adapter in adapters:
        assert sorted(p.name for p in adapter.iterdir()) == ADAPTER_FILES
        run_ranks(_offline_export, 1, str(adapter.parent), str(tmp_path / f"from_{adapter.parent.name}"))
        ours, reference = (
            load_file(adapter / "adapter_model.safetensors"),
            load_file(tmp_path / f"from_{adapter.parent.name}" / "adapter_model.safetensors"),
        )
        assert ours.keys() == reference.keys() and all((ours[k] == reference[k]).all() for k in ours), adapter
    last = load_file(adapters[-1] / "adapter_model.safetensors")
    assert any(not (first[k] == last[k]).all() for k in first), "training should have changed the adapter"
