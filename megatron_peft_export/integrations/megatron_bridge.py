"""Megatron-Bridge: a callback for its callback system; needs no import of megatron.bridge.

    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.integrations.megatron_bridge import HFAdapterExportCallback

    pretrain(cfg, forward_step, callbacks=[HFAdapterExportCallback(HookConfig.from_yaml("train.yaml"))])

Bridge fires `on_checkpoint_save(context)` on every rank after a save, with a context that carries
`state` (cfg.checkpoint.save, cfg.checkpoint.async_save, train_state.step) and `model` (the chunks).
The adapter goes to `<cfg.checkpoint.save>/iter_<step>/<subdir>`.

Two cases are skipped, with a log line: non-persistent saves (they leave no `iter_<step>` directory
under `cfg.checkpoint.save`), and asynchronous saves, because Bridge fires the callback from the
save's finalization, when training has already moved past the saved step, so the live weights are
no longer that checkpoint's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import HookConfig
from ..hook import AdapterExportHook, iteration_dir

log = logging.getLogger("megatron_peft_export")


class HFAdapterExportCallback:
    """Duck-typed Megatron-Bridge callback (Bridge calls the methods it knows by name)."""

    def __init__(self, config: HookConfig | None = None) -> None:
        self.hook = AdapterExportHook(config)
        self._warned_async = False

    def on_checkpoint_save(self, context: Any) -> None:
        checkpoint = context.state.cfg.checkpoint
        step = context.state.train_state.step
        if getattr(checkpoint, "async_save", False):
            if not self._warned_async:
                log.warning("HF adapter export skipped: Megatron-Bridge reports asynchronous saves after training moved on")
                self._warned_async = True
            return
        directory = iteration_dir(Path(checkpoint.save), step)
        self.hook.on_checkpoint_saved(step, directory, context.model, non_persistent=not directory.is_dir())

    def on_train_end(self, context: Any = None) -> None:
        self.hook.finalize()
