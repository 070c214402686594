"""Megatron-Bridge (>= 0.5): a callback for its callback system.

    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.integrations.megatron_bridge import HFAdapterExportCallback

    pretrain(cfg, forward_step, callbacks=[HFAdapterExportCallback(HookConfig.from_yaml("train.yaml"))])

Bridge fires `on_train_start(context)` on every rank before the first step (the callback walks the model then:
`AdapterExportHook.prepare`) and `on_checkpoint_save(context)` on every rank after a save, with a context that carries
`state` (cfg.checkpoint.save, cfg.checkpoint.async_save, train_state.step) and `model` (the chunks).
The adapter goes to `<cfg.checkpoint.save>/iter_<step>/<subdir>`. That event exists from Bridge 0.5 on;
on an older Bridge this callback would never export, so constructing it raises instead.

Two cases are skipped, with a log line: non-persistent saves (they leave no `iter_<step>` directory
under `cfg.checkpoint.save`), and asynchronous saves, because Bridge fires the callback from the
save's finalization, when training has already moved past the saved step, so the live weights are
no longer that checkpoint's.

Pending exports are completed at `on_train_end` and at interpreter exit: Bridge's train() leaves by
`sys.exit` on its exit interval, exit duration and exit signals, after their final save but before
`on_train_end`.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from ..config import HookConfig
from ..errors import ExportError
from ..hook import AdapterExportHook
from ..io.checkpoints import iteration_dir

log = logging.getLogger("megatron_peft_export")
EVENT = "on_checkpoint_save"


def _bridge_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"megatron-bridge {version('megatron-bridge')}"
    except PackageNotFoundError:
        return "the installed Megatron-Bridge"


def check_bridge_fires_checkpoint_saves() -> None:
    """Raise unless the importable Megatron-Bridge fires `on_checkpoint_save` (its callbacks list the event: Bridge >=
    0.5)."""
    try:
        from megatron.bridge.training import callbacks
    except ImportError as exc:
        raise ExportError(
            f"HFAdapterExportCallback needs Megatron-Bridge's callbacks (megatron.bridge.training.callbacks), "
            f"which do not import here "
            f"({exc}); expected megatron-bridge >= 0.5 in this environment"
        ) from None
    if EVENT not in getattr(callbacks, "VALID_EVENTS", ()):
        raise ExportError(
            f"{_bridge_version()} has no {EVENT} callback event (it came in 0.5), so HFAdapterExportCallback would "
            f"never export an "
            "adapter; expected megatron-bridge >= 0.5, or convert the saved checkpoints afterwards: "
            "megatron-peft-export export SAVE_DIR --all"
        )


class HFAdapterExportCallback:
    """Duck-typed Megatron-Bridge callback (Bridge's CallbackManager registers the methods it knows by name)."""

    def __init__(self, config: HookConfig | None = None) -> None:
        check_bridge_fires_checkpoint_saves()
        self.hook = AdapterExportHook(config)
        self._warned_async = False
        self._unfinalized = False
        atexit.register(self._finalize_at_exit)

    def on_train_start(self, context: Any) -> None:
        """Walk the model once before training (`AdapterExportHook.prepare`), so no save pays the walk."""
        self.hook.prepare(context.model)

    def on_checkpoint_save(self, context: Any) -> None:
        checkpoint = context.state.cfg.checkpoint
        step = context.state.train_state.step
        if getattr(checkpoint, "async_save", False):
            if not self._warned_async:
                log.warning(
                    "HF adapter export skipped: Megatron-Bridge reports asynchronous saves after training moved on"
                )
                self._warned_async = True
            return
        directory = iteration_dir(Path(checkpoint.save), step)
        self._unfinalized = True
        self.hook.on_checkpoint_saved(step, directory, context.model, non_persistent=not directory.is_dir())

    def on_train_end(self, context: Any = None) -> None:
        self.finalize()

    def finalize(self) -> None:
        """Complete pending exports (on_train_end and interpreter exit call it; once per run of saves)."""
        if self._unfinalized:
            self._unfinalized = False
            self.hook.finalize()

    def _finalize_at_exit(self) -> None:
        try:
            self.finalize()
        except ExportError as exc:  # on_error=raise: the run is ending anyway; say so instead of a traceback
            log.error("HF adapter export failed: %s", exc)
