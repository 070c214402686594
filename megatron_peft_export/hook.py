"""The training hook: an HF adapter next to every checkpoint, without stalling training.

On the training thread each rank only copies its own adapter shards to host memory. Exchange,
conversion and writing run on one background thread per rank, over a process group of their
own, in save order on every rank (so the collectives of successive exports pair up).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.distributed as dist

from . import distributed as coll
from .atomic_dir import discard, publish
from .config import HookConfig
from .errors import ExportError
from .export import WRITER, ExportOptions, run_export, take_snapshot
from .integrations.verify_hook import extensions as verification_steps

log = logging.getLogger("megatron_peft_export")
TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    """Megatron-LM's checkpoint directory for one iteration."""
    return Path(save_dir) / f"iter_{iteration:07d}"


def tracker_iteration(save_dir: Path) -> int | None:
    """The iteration Megatron's tracker file names, or None while there is none."""
    try:
        return int((save_dir / TRACKER).read_text().strip())
    except (OSError, ValueError):
        return None


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
        self._after_publish = tuple(after_publish)
        self.pusher = None
        """Pushes to the Hub (config.push): fed after every other after-publish step, so a push sees their files."""
        if self.config.push is not None:
            from .integrations.hub import HubPusher

            self.pusher = HubPusher(self.config.push)
            self._after_publish += (self.pusher.after_publish,)
        self._options = ExportOptions(
            base_model_name_or_path=self.config.base_model_name_or_path, adapter_name=self.config.adapter_name,
            dtype=self.config.dtype, overwrite=True, model_type=self.config.model_type,
        )
        self._saves = 0
        self._group: Any = None
        """Export traffic, on the background thread."""
        self._control: Any = None
        """Failure agreement, on the training thread."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-adapter-export")
        self._pending: deque[Future] = deque()
        self._failure: ExportError | None = None
        self._awaiting: list[_AwaitingPublish] = []
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self.published: list[Path] = []
        """Adapter directories this rank published (the writer's list; empty elsewhere)."""

    def on_checkpoint_saved(self, iteration: int, checkpoint_dir: str | Path, model: Any, *, finalized: bool = True, non_persistent: bool = False) -> None:
        """Snapshot this rank's adapter shards for `iteration` and export them in the background.

        `checkpoint_dir` is the iteration's checkpoint directory (`<save>/iter_0000100`); the adapter
        goes to `<checkpoint_dir>/<subdir>`. With `finalized=False` (asynchronous saves) it is
        published only once Megatron's tracker file names this iteration or a later one.
        Non-persistent (local, in-memory) saves are skipped.
        """
        if not self.config.enabled:
            return
        if self._group is None:  # collective: every rank reaches the first save together
            self._group, self._control = dist.new_group(backend="gloo"), dist.new_group(backend="gloo")
        self._raise_agreed_failure()
        if non_persistent:
            return
        self._saves += 1
        if self._saves % self.config.every_n_saves:
            return
        while len(self._pending) >= self.config.max_pending:
            self._pending.popleft().result()
        layout = coll.RankLayout.from_megatron()
        extra_files = self._capture(model, iteration) if self._capture is not None else None
        snapshot = take_snapshot(model, layout, self._options, copy=True)
        job = self._executor.submit(self._export, snapshot, layout, iteration, Path(checkpoint_dir), finalized, extra_files)
        self._pending.append(job)

    def _export(self, snapshot, layout, iteration: int, checkpoint_dir: Path, finalized: bool, extra_files) -> None:
        output = checkpoint_dir / self.config.subdir

        def finish(staging: Path) -> Path:
            if finalized:
                return self._publish(iteration, staging, output)
            with self._lock:
                self._awaiting.append(_AwaitingPublish(iteration, checkpoint_dir, staging, output))
                if self._watcher is None:
                    self._watcher = threading.Thread(target=self._watch_tracker, name="hf-adapter-publish", daemon=True)
                    self._watcher.start()
            return staging

        try:
            run_export(snapshot, output, self._options, layout, self._group, finish=finish, source=f"iteration {iteration}", extra_files=extra_files)
        except ExportError as exc:
            if self.config.on_error == "raise":
                self._failure = self._failure or exc
            elif layout.rank == WRITER:
                log.warning("HF adapter export for iteration %d failed; training continues: %s", iteration, exc)
        self._publish_finalized()

    def _publish(self, iteration: int, staging: Path, output: Path) -> Path:
        path = publish(staging, output, overwrite=True)
        self.published.append(path)
        log.info("published HF adapter %s", path)
        for callback in self._after_publish:
            try:
                callback(iteration, path)
            except Exception:  # verification, W&B, Hub: never the reason training stops
                log.exception("after-publish step %s failed for %s", getattr(callback, "__name__", callback), path)
        return path

    def _publish_finalized(self) -> None:
        """Publish every adapter whose asynchronously saved checkpoint has been finalized since."""
        with self._lock:
            ready = [a for a in self._awaiting if a.checkpoint_finalized()]
            self._awaiting = [a for a in self._awaiting if a not in ready]
        for item in ready:
            try:
                self._publish(item.iteration, item.staging, item.output)
            except ExportError as exc:
                if self.config.on_error == "raise":
                    self._failure = self._failure or exc
                log.warning("publishing the HF adapter for iteration %d failed: %s", item.iteration, exc)

    def _watch_tracker(self, interval: float = 0.5) -> None:
        """Writer only, while adapters await their checkpoint: publish each as soon as it is finalized."""
        while True:
            time.sleep(interval)
            self._publish_finalized()
            with self._lock:
                if not self._awaiting:
                    self._watcher = None
                    return

    def _raise_agreed_failure(self) -> None:
        """With on_error=raise: if any rank has seen a failure, every rank raises it here, at the same call.

        Ranks learn of a background failure at different moments, so they agree over a group of
        their own on the training thread (one tiny exchange per save) before anyone raises.
        """
        self._publish_finalized()
        if self.config.on_error != "raise" or self._control is None:
            return
        failure = next((f for f in coll.all_gather(self._failure, self._control) if f is not None), None)
        if failure is not None:
            self._failure = None
            raise failure

    def finalize(self) -> None:
        """Complete every pending export; wait (up to publish_timeout) for asynchronous checkpoints to finalize.

        Adapters of checkpoints that never finalize are removed unpublished.
        """
        while self._pending:
            self._pending.popleft().result()
        deadline = time.monotonic() + self.config.publish_timeout
        while True:
            self._publish_finalized()
            with self._lock:
                if not self._awaiting or time.monotonic() > deadline:
                    abandoned, self._awaiting = self._awaiting, []
                    break
            time.sleep(0.05)
        for item in abandoned:
            discard(item.staging)
            log.warning("checkpoint %s was never finalized; its HF adapter was not published", item.checkpoint_dir)
        if self.verification is not None:  # ends the W&B run it started, if any; never raises
            self.verification.finish()
        if self.pusher is not None:  # the last push (strategy end) and every push still running; never raises
            self.pusher.finalize()
        self._raise_agreed_failure()
