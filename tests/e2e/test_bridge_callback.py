"""HFAdapterExportCallback fired by Megatron-Bridge's own CallbackManager (tests/support/real_bridge.py) on a model with
Bridge's own LoRA: it exports at persistent synchronous saves, refuses to be made for a Bridge without
`on_checkpoint_save`,
and finalizes pending work when the run leaves by sys.exit as Bridge's train() does at its exit interval."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_peft_export.config import HookConfig
from tests.support.multiprocess import run_ranks

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("real_bridge")]
ROOT = Path(__file__).parents[2]


def _bridge_run(rank, world, save, async_save):
    import torch.distributed as dist

    from megatron_peft_export.integrations.megatron_bridge import HFAdapterExportCallback
    from tests.support import real_bridge
    from tests.support.tiny_gpt import (
        TinyGPTConfig,
        build_gpt,
        compare_peft,
        fill_lora_random,
        init_parallel,
        megatron_logits,
        sample_tokens,
    )

    callbacks = real_bridge.load_callbacks()
    cfg = TinyGPTConfig()
    init_parallel(world)
    model = real_bridge.apply(build_gpt(cfg))
    fill_lora_random(model, seed=2)
    callback = HFAdapterExportCallback(HookConfig())
    manager = callbacks.normalize_callbacks([callback])  # what Bridge's pretrain() does with callbacks=[...]
    checkpoint = SimpleNamespace(save=save, async_save=async_save)
    manager.fire("on_train_start", callbacks.CallbackContext(state=None, model=[model], user_state=manager.user_state))
    walks = [callback.hook._snapshots.walks]
    for step in (5, 10):
        if rank == 0 and step == 5:  # step 10 is a non-persistent save: no iter_ directory under save
            (Path(save) / f"iter_{step:07d}").mkdir(parents=True)
        dist.barrier()
        state = SimpleNamespace(cfg=SimpleNamespace(checkpoint=checkpoint), train_state=SimpleNamespace(step=step))
        manager.fire(
            "on_checkpoint_save", callbacks.CallbackContext(state=state, model=[model], user_state=manager.user_state)
        )
    manager.fire("on_train_end", callbacks.CallbackContext(state=None, model=[model], user_state=manager.user_state))
    walks.append(callback.hook._snapshots.walks)
    published = [str(p) for p in callback.hook.published]
    tokens = sample_tokens(cfg)
    logits = megatron_logits(model, tokens)
    diff = compare_peft(published[0], cfg, tokens, logits) if published else None
    return published, diff, walks


def test_bridge_callback_exports_persistent_synchronous_saves(tmp_path):
    """The model is walked at on_train_start (prepare), and not again at the saves."""
    (published, diff, walks), (others, _, _) = run_ranks(_bridge_run, 2, str(tmp_path), False)
    assert published == [str(tmp_path / "iter_0000005" / "hf_adapter")] and others == []
    assert diff <= 1e-5
    assert walks == [1, 1]


def test_bridge_callback_skips_async_saves(tmp_path):
    assert [published for published, _, _ in run_ranks(_bridge_run, 2, str(tmp_path), True)] == [[], []]
    assert not list(tmp_path.glob("iter_*/hf_adapter"))


def _construct(rank, world, version):
    from megatron_peft_export import ExportError
    from megatron_peft_export.integrations.megatron_bridge import HFAdapterExportCallback
    from tests.support import real_bridge

    callbacks = real_bridge.load_callbacks(version)
    try:
        callback = HFAdapterExportCallback(HookConfig())
    except ExportError as exc:
        return f"{type(exc).__name__}: {exc}"
    manager = callbacks.normalize_callbacks([callback])
    return sorted(name for name in callbacks.VALID_EVENTS if manager.has_callbacks(name))


def test_the_callback_cannot_be_made_for_a_bridge_without_on_checkpoint_save():
    """Bridge 0.4.x has callbacks but no on_checkpoint_save event: its CallbackManager would never call the callback's
    method."""
    from tests.support import real_bridge

    assert run_ranks(_construct, 1, real_bridge.CALLBACKS_VERSION)[0] == [
        "on_checkpoint_save",
        "on_train_end",
        "on_train_start",
    ]
    message = run_ranks(_construct, 1, real_bridge.PEFT_VERSION)[0]
    assert message.startswith(
        "ExportError: the installed Megatron-Bridge has no on_checkpoint_save callback event (it came in 0.5), "
        "so HFAdapterExportCallback would never export an adapter; expected megatron-bridge >= 0.5"
    ), message


def test_a_run_that_leaves_by_sys_exit_is_finalized(hub, tmp_path):
    """Bridge's train() exits by sys.exit after its exit-interval save, without on_train_end: the push of the last
    adapter
    (strategy end), which only finalize() makes, still happens, and every save has its adapter."""
    from tests.support.multiprocess import _free_port

    save = tmp_path / "save"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_ENDPOINT": hub.endpoint,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.bridge_exit_run", str(save), hub.endpoint],
            cwd=ROOT,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all((save / f"rank{r}.exiting").exists() for r in (0, 1))  # both left by sys.exit after the last save
    for step in (2, 4):
        assert (save / f"iter_000000{step}" / "hf_adapter" / "adapter_model.safetensors").is_file()
    assert len(hub.commits) == 1 and "iteration 4" in hub.commits[0].summary, (
        [c.summary for c in hub.commits],
        outputs,
    )
    pushed = hub.files("me/run")["adapter_model.safetensors"]
    assert pushed == (save / "iter_0000004" / "hf_adapter" / "adapter_model.safetensors").read_bytes()
