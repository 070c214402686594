"""Faults during an export, on real megatron-core models in real gloo processes: a writer killed with SIGKILL at
every write step, a full or read-only disk, a rank that raises, dies or hangs mid-export, and SIGTERM.

What each test guarantees (README, "Guarantees"): no partial adapter directory is ever published; the Megatron
checkpoint is never touched; the next export works and removes what a killed one left behind; training goes
on under on_error=warn; no rank waits for ever (every wait is bounded by the collective timeout).
"""

import ctypes
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import time
import traceback
from pathlib import Path

import pytest

from tests.e2e.test_offline_export import ITERATION, _train_save_and_export_live
from tests.support.hook_loop import LogRecords, checkpoint_dir
from tests.support.multiprocess import run_ranks, run_ranks_allowing_deaths

pytestmark = pytest.mark.timeout(300)
ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}


def _model(tp):
    """The model of `_train_save_and_export_live` (ModelOpt, scale 1.5, seed 17): its adapter equals that
    checkpoint's."""
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel

    init_parallel(tp)
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()), scale=1.5)
    fill_lora_random(model, seed=17)
    return model


def _hook(**settings):
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook

    return AdapterExportHook(HookConfig(**{"sigterm_grace": None, **settings}))


def _whole_or_absent(adapter: Path, reference: Path, *, must_exist: bool) -> None:
    """A published adapter directory is complete and equals the reference export; or there is none."""
    from safetensors.torch import load_file

    if not adapter.exists():
        assert not must_exist, f"{adapter} is missing"
        return
    assert ADAPTER_FILES <= {p.name for p in adapter.iterdir()}, sorted(p.name for p in adapter.iterdir())
    ours, theirs = load_file(adapter / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    assert json.loads((adapter / "adapter_config.json").read_text()) == json.loads(
        (reference / "adapter_config.json").read_text()
    )


def _checkpoint_files(save: Path) -> dict[str, str]:
    """Every file of the Megatron checkpoint (adapter directories and their staging aside), with its hash."""
    return {
        str(p.relative_to(save)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(save.rglob("*"))
        if p.is_file() and not any(part == "hf_adapter" or part.startswith(".hf_adapter") for part in p.parts)
    }


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".hf_adapter*"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real torch_dist checkpoint (save/iter_0000005) of `_model(1)`, and its adapter exported live (live/)."""
    tmp = tmp_path_factory.mktemp("checkpoint")
    run_ranks(_train_save_and_export_live, 1, str(tmp), 1, 1, "modelopt")
    return tmp


# ------------------------------------------------------------------------------------- SIGKILL at every write step

WRITE_STEPS = [  # what the writer does, in order, for an iteration whose adapter directory exists already (overwrite)
    "mkdir staging",
    "write staging/adapter_model.safetensors",
    "write staging/adapter_config.json",
    "write staging/README.md",
    "fsync staging/adapter_model.safetensors",
    "fsync staging/adapter_config.json",
    "fsync staging/README.md",
    "fsync staging",
    "rename hf_adapter -> old",
    "rename staging -> hf_adapter",
    f"fsync iter_{ITERATION:07d}",
    "remove old",
]
KILLS = [  # (an adapter exists already, where SIGKILL arrives); every step above is reached (first test)
    (False, "after mkdir staging"),
    (False, "during write staging/adapter_model.safetensors"),  # half the file written
    (False, "after write staging/adapter_config.json"),
    (False, "after fsync staging"),
    (False, "after rename staging -> hf_adapter"),
    (False, f"after fsync iter_{ITERATION:07d}"),
    (True, "after write staging/adapter_model.safetensors"),
    (True, "after rename hf_adapter -> old"),
    (True, "after rename staging -> hf_adapter"),
    (True, "during remove old"),
]


def _export_in_hook(rank, world, save, iteration, kill_at):
    """One save with the hook; every file system step of the writer is recorded, and SIGKILL arrives at `kill_at`."""
    import pathlib

    from megatron_peft_export.io import atomic_dir, safetensors_out

    directory = Path(save) / f"iter_{iteration:07d}"
    directory.mkdir(exist_ok=True)
    model = _model(world)
    events = []

    def label(path):
        try:
            parts = Path(path).resolve().relative_to(directory.resolve()).parts
        except ValueError:
            return None
        if not parts:
            return directory.name
        head = "staging" if ".tmp-" in parts[0] else "old" if ".old-" in parts[0] else parts[0]
        return "/".join((head, *parts[1:]))

    def step(event, half_done=None):
        if kill_at == f"during {event}":
            half_done()
            os.kill(os.getpid(), signal.SIGKILL)
        events.append(event)

    def after(event):
        if kill_at == f"after {event}":
            os.kill(os.getpid(), signal.SIGKILL)

    originals = {
        "save_file": safetensors_out.save_file,
        "fsync": atomic_dir.fsync,
        "rmtree": shutil.rmtree,
        "mkdir": pathlib.Path.mkdir,
        "write_bytes": pathlib.Path.write_bytes,
        "rename": pathlib.Path.rename,
    }

    def save_file(tensors, path, metadata=None):
        originals["save_file"](tensors, path, metadata=metadata)
        event = f"write {label(path)}"

        def half():
            data = Path(path).read_bytes()
            originals["write_bytes"](Path(path), data[: len(data) // 2])

        step(event, half)
        after(event)

    def fsync(path):
        originals["fsync"](path)
        if label(path):
            step(f"fsync {label(path)}")
            after(f"fsync {label(path)}")

    def rmtree(path, *args, **kwargs):
        if label(path) != "old":
            return originals["rmtree"](path, *args, **kwargs)
        step("remove old", lambda: (Path(path) / "adapter_model.safetensors").unlink())
        originals["rmtree"](path, *args, **kwargs)
        after("remove old")

    def mkdir(self, *args, **kwargs):
        new = not self.exists() and label(self) == "staging"
        originals["mkdir"](self, *args, **kwargs)
        if new:
            step("mkdir staging")
            after("mkdir staging")

    def write_bytes(self, data):
        result = originals["write_bytes"](self, data)
        if (label(self) or "").startswith("staging/"):
            step(f"write {label(self)}")
            after(f"write {label(self)}")
        return result

    def rename(self, target):
        result = originals["rename"](self, target)
        if label(self):
            step(f"rename {label(self)} -> {label(target)}")
            after(f"rename {label(self)} -> {label(target)}")
        return result

    safetensors_out.save_file, atomic_dir.fsync, shutil.rmtree = save_file, fsync, rmtree
    pathlib.Path.mkdir, pathlib.Path.write_bytes, pathlib.Path.rename = mkdir, write_bytes, rename
    hook = _hook()
    hook.on_checkpoint_saved(iteration, directory, model)
    hook.finalize()
    return events


def test_the_crash_tests_kill_at_every_write_step(checkpoint, tmp_path):
    save = tmp_path / "save"
    shutil.copytree(checkpoint / "save", save)
    shutil.copytree(checkpoint / "live", save / f"iter_{ITERATION:07d}" / "hf_adapter")
    (events,) = run_ranks(_export_in_hook, 1, str(save), ITERATION, None)
    assert events == WRITE_STEPS


@pytest.mark.parametrize("existing,kill_at", KILLS, ids=[f"{'overwrite' if e else 'new'}: {k}" for e, k in KILLS])
def test_a_writer_killed_at_any_write_step_publishes_nothing_partial(checkpoint, tmp_path, existing, kill_at):
    save = tmp_path / "save"
    shutil.copytree(checkpoint / "save", save)
    target = save / f"iter_{ITERATION:07d}" / "hf_adapter"
    if existing:  # re-exporting an iteration: the previous adapter may never be lost either
        shutil.copytree(checkpoint / "live", target)
        (target / "previous.txt").write_text("the adapter exported before")
    before = _checkpoint_files(save)

    (outcome,) = run_ranks_allowing_deaths(_export_in_hook, 1, str(save), ITERATION, kill_at)
    assert outcome == ("died", -signal.SIGKILL), f"{kill_at!r} was never reached: {outcome}"
    between_renames = (
        kill_at == "after rename hf_adapter -> old"
    )  # no directory at all (never a partial one) until the next run
    _whole_or_absent(target, checkpoint / "live", must_exist=existing and not between_renames)
    assert _checkpoint_files(save) == before, "the Megatron checkpoint must not change"

    # The next run: its first save exports normally and removes what the killed run left behind.
    (outcome,) = run_ranks_allowing_deaths(_export_in_hook, 1, str(save), ITERATION + 1, None)
    assert outcome[0] == "ok", outcome
    _whole_or_absent(save / f"iter_{ITERATION + 1:07d}" / "hf_adapter", checkpoint / "live", must_exist=True)
    _whole_or_absent(target, checkpoint / "live", must_exist=existing)
    assert _leftovers(save) == []
    assert _checkpoint_files(save) == before


def test_leftovers_of_a_live_process_are_kept_and_old_ones_of_other_hosts_removed(tmp_path):
    from megatron_peft_export.io import atomic_dir

    out = tmp_path / "hf_adapter"
    live = tmp_path / f".hf_adapter.tmp-{atomic_dir._HOST}-{os.getppid()}-0123abcd"  # the pytest runner's parent: alive
    fresh = tmp_path / ".hf_adapter.tmp-otherhost-12-89abcdef"
    old = tmp_path / ".hf_adapter.tmp-otherhost-13-00000000"
    for path in (live, fresh, old):
        path.mkdir()
    os.utime(old, (time.time() - atomic_dir.STALE_AFTER - 60,) * 2)
    assert atomic_dir.clean_stale(out) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, fresh.name])


# ---------------------------------------------------------------------------------------------- disk full, read only

CLONE_NEWNS, CLONE_NEWUSER, MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    0x20000,
    0x10000000,
    1,
    32,
    4096,
    16384,
    1 << 18,
)


def _mount(source, target, fstype, flags, data=None):
    libc = ctypes.CDLL(None, use_errno=True)
    enc = lambda s: None if s is None else str(s).encode()  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _private_mount_namespace() -> str | None:
    """Enter a mount namespace of our own (with a user namespace when not root); why not, if it is not allowed."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    for flags in ((CLONE_NEWNS,) if uid == 0 else ()) + (CLONE_NEWNS | CLONE_NEWUSER,):
        if libc.unshare(flags) == 0:
            break
    else:
        return f"unshare: {os.strerror(ctypes.get_errno())}"
    try:
        if flags & CLONE_NEWUSER:
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here shows outside
    except OSError as exc:
        return str(exc)
    return None


def _in_mount_namespace(setup, fn, *args, timeout=120):
    """`fn(*args)` in a forked child with a mount namespace of its own, after `setup()`; skips where mounts are not
    allowed."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child():
        try:
            why = _private_mount_namespace()
            if why is None:
                setup()
            payload = ("unavailable", why) if why else ("ok", fn(*args))
        except BaseException:
            payload = ("error", traceback.format_exc())
        send.send_bytes(pickle.dumps(payload))
        os._exit(0)

    process = ctx.Process(target=child)
    process.start()
    send.close()
    try:
        if not recv.poll(timeout):
            raise TimeoutError(f"no answer within {timeout} s")
        status, value = pickle.loads(recv.recv_bytes())
    finally:
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
        process.join()
    if status == "unavailable":
        pytest.skip(
            f"no size-limited or read-only file system here (mount namespaces not allowed: {value}); the injected "
            f"ENOSPC case covers it"
        )
    assert status == "ok", value
    return value


def _train_on(rank, world, save, inject_enospc):
    """Two saves under on_error=warn with training steps between; the save directory is on the file system under
    test."""
    import torch

    from megatron_peft_export.io import safetensors_out

    records = LogRecords()
    model = _model(world)
    if inject_enospc and rank == 0:
        from safetensors import SafetensorError

        def full_disk(tensors, path, metadata=None):
            Path(path).write_bytes(b"\0" * 100)  # what got written before the device filled up
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        safetensors_out.save_file = full_disk
    hook = _hook(on_error="warn")
    outcome = []
    for iteration in (1, 2):
        hook.on_checkpoint_saved(iteration, Path(save) / f"iter_{iteration:07d}", model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora" in name:
                    p.add_(0.01)
        outcome.append(f"trained {iteration}")
    hook.finalize()
    outcome.append("finalized")
    listing = sorted(str(p.relative_to(save)) for p in Path(save).rglob("*")) if rank == 0 else None
    return outcome, records.messages, listing


def _iteration_dirs(save: Path):
    for iteration in (1, 2):
        (save / f"iter_{iteration:07d}").mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("disk", ["full (tmpfs of 32 KiB)", "read-only (bind mount)", "full (injected ENOSPC)"])
def test_a_full_or_read_only_disk_fails_clearly_writes_nothing_and_training_goes_on(tmp_path, disk):
    save = tmp_path / "save"
    save.mkdir()
    if disk.startswith("full (tmpfs"):

        def setup():
            _mount("tmpfs", save, "tmpfs", 0, "size=32k")
            _iteration_dirs(save)

        results = _in_mount_namespace(setup, run_ranks, _train_on, 2, str(save), False)
        expected = "no space left on the device of"
    elif disk.startswith("read-only"):
        _iteration_dirs(save)

        def setup():
            _mount(save, save, None, MS_BIND)
            _mount(None, save, None, MS_REMOUNT | MS_BIND | MS_RDONLY)

        results = _in_mount_namespace(setup, run_ranks, _train_on, 2, str(save), False)
        expected = "Read-only file system"
    else:
        _iteration_dirs(save)
        results = run_ranks(_train_on, 2, str(save), True)
        expected = "no space left on the device of"
    (outcome0, logs0, listing), (outcome1, logs1, _) = results
    assert outcome0 == outcome1 == ["trained 1", "trained 2", "finalized"]
    assert len(logs0) == 2 and logs1 == [], logs0 + logs1
    assert all("training continues" in m and expected in m for m in logs0), logs0
    assert listing == ["iter_0000001", "iter_0000002"], "nothing partial, no staging left behind"


# ------------------------------------------------------------------------------------------------ no hang


def _export_with_a_fault(rank, world, tmp, fault):
    import megatron_peft_export.distributed as coll_module
    import megatron_peft_export.export as export_module
    from megatron_peft_export import ExportError, export_adapter

    model = _model(world)
    calls = [0]
    module, name, victim, fail_at = (  # the sender: making its first transfer; the writer: placing it
        (coll_module, "_flat_on_host", 1, 1) if fault == "sender" else (export_module, "_place_received", 0, 1)
    )
    if rank == victim:
        original = getattr(module, name)

        def failing(*args):
            calls[0] += 1
            if calls[0] == fail_at:
                raise RuntimeError(f"simulated {'device' if fault == 'sender' else 'conversion'} error")
            return original(*args)

        setattr(module, name, failing)
    outcome = []
    try:
        export_adapter(model, Path(tmp) / "adapter")
        outcome.append("exported")
    except ExportError as exc:
        outcome.append(f"{type(exc).__name__}: {exc}")
    outcome.append(
        str(export_adapter(model, Path(tmp) / "again"))
    )  # the collectives stayed paired: the group still works
    return outcome


@pytest.mark.parametrize(
    "fault,message",
    [
        ("sender", "ExportError: rank 1: RuntimeError: simulated device error"),
        ("writer", "ExportError: rank 0: RuntimeError: simulated conversion error"),
    ],
    ids=["a sender raises while copying a shard", "the writer raises while converting"],
)
def test_a_rank_raising_mid_export_makes_every_rank_leave_with_the_error(tmp_path, fault, message):
    (r0, r1) = run_ranks(_export_with_a_fault, 2, str(tmp_path), fault)
    assert r0[0] == r1[0] == message
    assert r0[1] == str(tmp_path / "again") and r1[1] == "None"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"], "nothing partial, no staging left behind"


def _peer_dies(rank, world, save, victim, how, on_error, timeout):
    """A hook export in which `victim` is SIGKILLed (or stopped with SIGSTOP: hung) mid-export; the others report."""
    import megatron_peft_export.distributed as coll_module
    import megatron_peft_export.export as export_module
    from megatron_peft_export import ExportError

    records = LogRecords()
    model = _model(2) if world == 2 else _model_tp2_pp2()
    directory = checkpoint_dir(save, 1)
    hook = _hook(collective_timeout=timeout, on_error=on_error)
    if rank == victim:
        # the writer: placing another rank's transfer; a sender: making its transfer
        module, name = (export_module, "_place_received") if victim == 0 else (coll_module, "_flat_on_host")
        original, calls = getattr(module, name), [0]

        def dying(*args):
            calls[0] += 1
            if calls[0] == 1:
                (Path(save) / "victim").write_text(f"{os.getpid()} {time.time()}")
                os.kill(os.getpid(), signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            return original(*args)

        setattr(module, name, dying)
    outcome = []
    try:
        hook.on_checkpoint_saved(1, directory, model)
        outcome.append("saved")
        hook.finalize()
        outcome.append("finalized")
    except ExportError as exc:
        outcome.append(f"{type(exc).__name__}: {exc}")
    ended = time.time()
    pid, died = (Path(save) / "victim").read_text().split()
    if how == "hung":
        os.kill(int(pid), signal.SIGKILL)
    return outcome, records.messages, ended - float(died), [str(p) for p in hook.published]


def _model_tp2_pp2():
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel

    init_parallel(2, 2)
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()))
    fill_lora_random(model, seed=17)
    return model


@pytest.mark.parametrize(
    "world,victim,how,on_error,timeout",
    [
        (2, 1, "killed", "warn", 5.0),
        (2, 0, "killed", "warn", 5.0),
        (4, 3, "killed", "warn", 5.0),
        (2, 1, "hung", "raise", 2.0),
    ],
    ids=["a sender killed", "the writer killed", "one of four killed", "a sender hung (on_error=raise)"],
)
def test_a_rank_that_dies_or_hangs_mid_export_makes_the_others_give_up_in_bounded_time(
    tmp_path, world, victim, how, on_error, timeout
):
    results = run_ranks_allowing_deaths(_peer_dies, world, str(tmp_path), victim, how, on_error, timeout, timeout=120)
    assert results[victim] == ("died", -signal.SIGKILL)
    survivors = [value for rank, (status, value) in enumerate(results) if rank != victim and status == "ok"]
    assert len(survivors) == world - 1, results
    seconds = []
    for outcome, logs, elapsed, published in survivors:
        seconds.append(round(elapsed, 2))
        assert published == []
        if on_error == "warn":  # training goes on; every survivor says what happened
            assert outcome == ["saved", "finalized"]
            assert any(
                "this run exports no more adapters" in m and "lost contact with another rank" in m for m in logs
            ), logs
        else:
            assert (
                outcome[0] == "saved"
                and outcome[-1].startswith("CollectiveError: ")
                and "lost contact with another rank" in outcome[-1]
            )
    print(f"survivors gave up {seconds} s after rank {victim} was {how} (collective_timeout={timeout} s)")
    assert not (tmp_path / "iter_0000001" / "hf_adapter").exists()
    if victim != 0:  # a surviving writer removes its staging; a dead writer's is removed by the next run
        assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------- SIGTERM


def _sigterm_during_export(rank, world, save, scenario):
    import threading

    import torch.distributed as dist

    import megatron_peft_export.export as export_module

    model = _model(world)
    entered, release = threading.Event(), threading.Event()
    if rank == 0:
        original = export_module.write_staging

        def slow_write(tmp, **kwargs):  # the writer is in the middle of writing when SIGTERM arrives
            if scenario == "stalled":
                from safetensors.torch import save_file

                save_file(dict(kwargs["tensors"]), str(tmp / "adapter_model.safetensors"))  # a Payload: a mapping
            entered.set()
            release.wait(120)
            return original(tmp, **kwargs)

        export_module.write_staging = slow_write
    if scenario == "own handler":
        seen = []
        signal.signal(signal.SIGTERM, lambda *_: seen.append("SIGTERM"))
    hook = _hook(sigterm_grace=30.0 if scenario == "finishes" else 1.0)
    hook.on_checkpoint_saved(1, checkpoint_dir(save, 1), model)
    if rank == 0:
        assert entered.wait(60)
        if scenario in ("finishes", "own handler"):
            threading.Timer(0.5, release.set).start()  # the write completes only after SIGTERM arrived
    dist.barrier()
    os.kill(os.getpid(), signal.SIGTERM)
    if scenario == "own handler":
        hook.finalize()
        return seen, signal.getsignal(signal.SIGTERM).__name__
    time.sleep(120)
    return "SIGTERM did not terminate the process"


@pytest.mark.parametrize("scenario", ["finishes", "stalled", "own handler"])
def test_sigterm_lets_a_pending_export_finish_in_the_grace_period_or_abandons_it(tmp_path, scenario):
    results = run_ranks_allowing_deaths(_sigterm_during_export, 2, str(tmp_path), scenario, timeout=120)
    adapter = tmp_path / "iter_0000001" / "hf_adapter"
    if scenario == "own handler":  # a handler installed before the hook (Megatron-LM's --exit-signal-handler) is kept
        assert [r[0] for r in results] == ["ok", "ok"], results
        assert all(r[1] == (["SIGTERM"], "<lambda>") for r in results), results
        assert ADAPTER_FILES <= {p.name for p in adapter.iterdir()}
    else:
        assert results == [("died", -signal.SIGTERM)] * 2, results  # it still terminates as SIGTERM would
        if scenario == "finishes":  # the write completed after SIGTERM, within the grace period
            assert ADAPTER_FILES <= {p.name for p in adapter.iterdir()}
        else:  # stalled past the grace period: abandoned, its staging removed
            assert not adapter.exists()
    assert _leftovers(tmp_path) == []
