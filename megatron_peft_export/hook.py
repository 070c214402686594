"""The training hook: an HF adapter next to every checkpoint, without stalling training.

On the training thread each rank only copies its own adapter shards to host memory. Exchange,
conversion and writing run on one background thread per rank, over a process group of their
own, in save order on every rank (so the collectives of successive exports pair up).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import distributed as coll
from .config import HookConfig
from .errors import CollectiveError, ExportError
from .export import WRITER, ExportOptions
from .host_snapshot import HostSnapshots
from .io.atomic_dir import abandon_all, clean_stale, discard, publish
from .io.checkpoints import ITERATION_GLOB, tracker_iteration
from .multi_adapter import run_multi_export as run_export  # the one export path: one adapter is a list of one
from .services.verify_hook import extensions as verification_steps

log = logging.getLogger("megatron_peft_export")


@dataclass
class _AwaitingPublish:
    """An adapter written to staging whose checkpoint is still being saved asynchronously."""

    iteration: int
    checkpoint_dir: Path
    staging: Path
    output: Path

    def checkpoint_finalized(self) -> bool:
        found = tracker_iteration(self.checkpoint_dir.parent)
        return found is not None and found >= self.iteration and self.checkpoint_dir.is_dir()


class _Publisher:
    """The writer's publishing: at once for a finalized checkpoint, else once Megatron's tracker names its iteration
    (a watcher thread polls while adapters wait); then the after-publish steps, whose failures are only logged."""

    def __init__(self, after_publish: Sequence[Callable[[int, Path], None]], record: Callable[[ExportError], None]):
        self._after_publish = tuple(after_publish)
        self._record = record
        self._awaiting: list[_AwaitingPublish] = []
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self.published: list[Path] = []

    def finish(self, staging: Path, output: Path, iteration: int, checkpoint_dir: Path, finalized: bool) -> Path:
        """Publish `staging` as `output`, or (checkpoint not finalized yet) keep it until the tracker says so."""
        if finalized:
            return self.publish(staging, output)
        with self._lock:
            self._awaiting.append(_AwaitingPublish(iteration, checkpoint_dir, staging, output))
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="hf-adapter-publish", daemon=True)
                self._watcher.start()
        return staging

    def publish(self, staging: Path, output: Path) -> Path:
        path = publish(staging, output, overwrite=True)
        self.published.append(path)
        log.info("published HF adapter %s", path)
        return path

    def after_publish(self, iteration: int, path: Path) -> None:
        for callback in self._after_publish:
            try:
                callback(iteration, path)
            except Exception:  # verification, W&B, Hub: never the reason training stops
                log.exception("after-publish step %s failed for %s", getattr(callback, "__name__", callback), path)

    def publish_finalized(self) -> None:
        """Publish every adapter whose asynchronously saved checkpoint has been finalized since."""
        with self._lock:
            ready = [a for a in self._awaiting if a.checkpoint_finalized()]
            self._awaiting = [a for a in self._awaiting if a not in ready]
        for item in ready:
            try:
                self.after_publish(item.iteration, self.publish(item.staging, item.output))
            except ExportError as exc:
                self._record(exc)
                log.warning("publishing the HF adapter for iteration %d failed: %s", item.iteration, exc)

    def _watch(self, interval: float = 0.5) -> None:
        """Writer only, while adapters await their checkpoint: publish each as soon as it is finalized."""
        while True:
            time.sleep(interval)
            self.publish_finalized()
            with self._lock:
                if not self._awaiting:
                    self._watcher = None
                    return

    def settle(self, timeout: float) -> None:
        """Wait up to `timeout` for awaited checkpoints to finalize; remove the adapters of the others unpublished."""
        deadline = time.monotonic() + timeout
        while True:
            self.publish_finalized()
            with self._lock:
                if not self._awaiting or time.monotonic() > deadline:
                    abandoned, self._awaiting = self._awaiting, []
                    break
            time.sleep(0.05)
        for item in abandoned:
            discard(item.staging)
            log.warning("checkpoint %s was never finalized; its HF adapter was not published", item.checkpoint_dir)


class _Failures:
    """What went wrong in the background, and (on_error=raise) the one error every rank raises at the same call."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self.failure: ExportError | None = None
        self.broken: CollectiveError | None = None
        """Set when a collective of an export failed (a rank died or timed out): the group is unusable, no more
        exports."""

    def record(self, exc: ExportError) -> None:
        if self.on_error == "raise":
            self.failure = self.failure or exc

    def export_failed(self, iteration: int, exc: ExportError, rank: int, group: Any) -> None:
        if isinstance(exc, CollectiveError):  # every surviving rank says so: each saw its own peer fail
            if self.broken is None:
                self.broken = exc
                coll.close_group(group)  # ranks still waiting on it fail at once, not after their timeout
            log.warning(
                "HF adapter export for iteration %d failed on rank %d (no partial adapter is ever published); this "
                "run exports no "
                "more adapters (convert checkpoints later with `megatron-peft-export export SAVE_DIR --all`): %s",
                iteration,
                rank,
                exc,
            )
        self.record(exc)
        if self.on_error != "raise" and rank == WRITER and not isinstance(exc, CollectiveError):
            log.warning("HF adapter export for iteration %d failed; training continues: %s", iteration, exc)

    def raise_agreed(self, control: Any) -> None:
        """With on_error=raise: if any rank has seen a failure, every rank raises it here, at the same call.

        Ranks learn of a background failure at different moments, so they agree over a group of
        their own on the training thread (one tiny exchange per save) before anyone raises.
        """
        if self.on_error != "raise" or control is None:
            return
        failure = next((f for f in coll.all_gather(self.failure, control) if f is not None), None)
        if failure is not None:
            self.failure = None
            raise failure


class AdapterExportHook:
    """Call `on_checkpoint_saved` on every rank after each checkpoint save, and `finalize` at the end."""

    def __init__(
        self,
        config: HookConfig | None = None,
        *,
        capture: Callable[[Any, int], dict[str, bytes] | None] | None = None,
        after_publish: Sequence[Callable[[int, Path], None]] = (),
    ) -> None:
        """`capture(model, iteration)` runs on the training thread on every rank at each exported save
        (it may use collectives); the files it returns on the writer (relative path -> bytes) are
        published inside the adapter directory. `after_publish(iteration, path)` callbacks run on the
        writer, in the background, after each publish; their failures are logged, never raised.
        """
        self.config = config or HookConfig()
        capture, after_publish, self.verification = verification_steps(self.config, capture, after_publish)
        self._capture = capture
        self.serving = None
        """Loads each published adapter into a running vLLM server (config.serve), after its verification."""
        if self.config.serve is not None:
            from .services.delivery import Serving

            self.serving = Serving(self.config.serve, self.verification)
            after_publish = (*after_publish, self.serving.after_publish)
        self.pusher = None
        """Pushes to the Hub (config.push): fed after every other after-publish step, so a push sees their files."""
        if self.config.push is not None:
            from .services.hub import HubPusher

            self.pusher = HubPusher(self.config.push)
            after_publish = (*after_publish, self.pusher.after_publish)
        self._options = _export_options(self.config)
        self._snapshots = HostSnapshots(self._options, self.config.adapter_names)
        """Finds the adapters when the model changed and reuses host buffers: a save costs the training thread one
        bulk copy."""
        self._saves = 0
        self._group: Any = None
        """Export traffic, on the background thread."""
        self._control: Any = None
        """Failure agreement, on the training thread."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-adapter-export")
        self._pending: deque[Future] = deque()
        self._failures = _Failures(self.config.on_error)
        self._publisher = _Publisher(after_publish, self._failures.record)
        self._swept = False
        self.published: list[Path] = self._publisher.published
        """Adapter directories this rank published (the writer's list; empty elsewhere)."""

    def prepare(self, model: Any) -> None:
        """Optional, on every rank once the model (with its adapters) is built, before training: walk it now, so that
        no save pays the walk on the training thread unless the model changes later (a model with ~10^5 adapter
        tensors takes seconds to walk)."""
        if not self.config.enabled:
            return
        try:
            self._snapshots.prepare(model, coll.RankLayout.from_megatron())
        except Exception as exc:  # only an optimization: the first save walks instead
            log.warning("could not walk the model before training (the first save will): %s", exc)

    def on_checkpoint_saved(
        self,
        iteration: int,
        checkpoint_dir: str | Path,
        model: Any,
        *,
        finalized: bool = True,
        non_persistent: bool = False,
    ) -> None:
        """Snapshot this rank's adapter shards for `iteration` and export them in the background.

        `checkpoint_dir` is the iteration's checkpoint directory (`<save>/iter_0000100`); the adapter
        goes to `<checkpoint_dir>/<subdir>`. With `finalized=False` (asynchronous saves) it is
        published only once Megatron's tracker file names this iteration or a later one.
        Non-persistent (local, in-memory) saves are skipped.
        """
        if not self.config.enabled:
            return
        self._start()
        self._publisher.publish_finalized()
        self._failures.raise_agreed(self._control)
        if non_persistent:
            return
        self._saves += 1
        if self._saves % self.config.every_n_saves or self._skipped_broken(iteration):
            return
        while len(self._pending) >= self.config.max_pending:
            self._pending.popleft().result()
        layout = coll.RankLayout.from_megatron()
        extra_files = self._capture(model, iteration) if self._capture is not None else None
        snapshots = self._snapshots.take(model, layout)
        job = self._executor.submit(
            self._export_snapshots, snapshots, layout, iteration, Path(checkpoint_dir), finalized, extra_files
        )
        self._pending.append(job)

    def _start(self) -> None:
        """At the first save (collective: every rank reaches it together): the hook's process groups."""
        if self._group is not None:
            return
        self._group, self._control = (
            coll.new_gloo_group(self.config.collective_timeout),
            coll.new_gloo_group(self.config.collective_timeout),
        )
        _HOOKS.add(self)
        if self.config.sigterm_grace is not None:
            _install_sigterm_handler()

    def _skipped_broken(self, iteration: int) -> bool:
        if self._failures.broken is None:
            return False
        log.warning(
            "HF adapter export for iteration %d skipped: an earlier export lost contact with another rank (%s)",
            iteration,
            self._failures.broken,
        )
        return True

    def _export_snapshots(self, taken: Any, *args) -> None:
        """Background: export the snapshots, then hand their host buffers to a later save."""
        try:
            self._export(taken, *args)
        finally:
            self._snapshots.release(taken)

    def _export(self, taken, layout, iteration: int, checkpoint_dir: Path, finalized: bool, extra_files) -> None:
        output = checkpoint_dir / self.config.subdir
        try:
            snapshots = self._snapshots.resolve(taken)  # the copy is complete; the model walked if it was not yet
            if layout.rank == WRITER and not self._swept:
                self._swept = True
                _clean_leftovers(checkpoint_dir.parent, self.config.subdir)
            path = run_export(
                snapshots,
                output,
                self._options,
                layout,
                self._group,
                finish=lambda staging: self._publisher.finish(staging, output, iteration, checkpoint_dir, finalized),
                source=f"iteration {iteration}",
                extra_files=extra_files,
            )
            if finalized and path is not None:  # outside the collectives: the other ranks do not wait for these steps
                self._publisher.after_publish(iteration, path)
        except Exception as exc:  # never raised into training: recorded (on_error=raise) or logged
            if not isinstance(exc, ExportError):
                exc = ExportError(f"unexpected {type(exc).__name__}: {exc}")
            self._failures.export_failed(iteration, exc, layout.rank, self._group)
        self._publisher.publish_finalized()

    def finalize(self) -> None:
        """Complete every pending export; wait (up to publish_timeout) for asynchronous checkpoints to finalize.

        Adapters of checkpoints that never finalize are removed unpublished.
        """
        while self._pending:
            self._pending.popleft().result()
        self._publisher.settle(self.config.publish_timeout)
        if self.verification is not None:  # ends the W&B run it started, if any; never raises
            self.verification.finish()
        if self.serving is not None:  # the delivery in flight and the newest pending one, bounded; never raises
            self.serving.finalize(self.config.publish_timeout)
        if self.pusher is not None:  # the last push (strategy end) and every push still running; never raises
            self.pusher.finalize()
        self._publisher.publish_finalized()
        self._failures.raise_agreed(self._control)


def _clean_leftovers(save_dir: Path, subdir: str) -> None:
    """Staging directories that earlier runs left behind (killed mid-export) in this save directory, if their process
    is gone."""
    try:
        for parent in sorted({p.parent for p in save_dir.glob(f"{ITERATION_GLOB}/.{subdir}.*")}):
            clean_stale(parent / subdir)
    except OSError as exc:
        log.warning("could not clean leftovers of interrupted exports under %s: %s", save_dir, exc)


def _export_options(config: HookConfig) -> ExportOptions:
    """The export options of a hook's config: every ExportOptions field the schema shares with HookConfig (one
    declaration each in core/options.py), and overwrite, which a re-save of an iteration needs."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(ExportOptions) if hasattr(config, f.name)}
    return ExportOptions(**{**shared, "overwrite": True})


_HOOKS: weakref.WeakSet[AdapterExportHook] = weakref.WeakSet()
_SIGTERM = {"checked": False}


def _install_sigterm_handler() -> None:
    """Once per process, from the main thread, and only where SIGTERM still has its default action (which
    kills at once, leaving pending exports' staging behind): Megatron-LM's --exit-signal-handler, or a
    launcher's own handler, is left alone (training then exits normally and finalize() runs at exit)."""
    if _SIGTERM["checked"] or threading.current_thread() is not threading.main_thread():
        return
    _SIGTERM["checked"] = True
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        log.info("SIGTERM already has a handler; pending HF adapter exports finish at exit (finalize)")
        return
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    """Let pending exports finish within the hooks' sigterm_grace, abandon the rest (their staging removed,
    nothing published), then terminate as the default action would."""
    hooks = list(_HOOKS)
    deadline = time.monotonic() + max((h.config.sigterm_grace or 0.0 for h in hooks), default=0.0)
    unfinished = 0
    for hook in hooks:
        for job in list(hook._pending):
            try:
                job.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                unfinished += 1
            except Exception:  # _export never raises; nothing to do at shutdown anyway
                pass
    abandoned = abandon_all(timeout=max(1.0, deadline - time.monotonic()))
    if unfinished or abandoned:
        log.warning(
            "SIGTERM: %d pending HF adapter export(s) did not finish in time; abandoned (staging removed: %s), "
            "nothing partial was published",
            unfinished,
            ", ".join(str(p) for p in abandoned) or "none",
        )
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
