"""A training loop driven by hand around the hook, for tests inside forked ranks: model, step, save, captured logs."""

from __future__ import annotations

import logging
from pathlib import Path


def lora_model(tp: int, seed: int = 5):
    """The tiny GPT with ModelOpt LoRA (random adapter values) at tensor-parallel size `tp`; the world must be up."""
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel

    init_parallel(tp)
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()))
    fill_lora_random(model, seed=seed)
    return model


def optimizer_step(model, iteration: int) -> None:
    """Stand-in for an optimizer step: every LoRA weight moves, differently at each iteration."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.add_(0.01 * iteration)


def checkpoint_dir(save, iteration: int, tracker: bool = True) -> Path:
    """What a checkpoint save leaves for the hook: the iteration directory and (unless `tracker` is False) the tracker
    file."""
    import torch.distributed as dist

    from megatron_peft_export.io.checkpoints import TRACKER, iteration_dir

    directory = iteration_dir(save, iteration)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tracker:
            (Path(save) / TRACKER).write_text(str(iteration))
    dist.barrier()
    return directory


class LogRecords(logging.Handler):
    """Records of `logger` ("" for every logger) from `level` up while attached: `messages` as logged, `lines` with name
    and level.

    Attached on creation; as a context manager it detaches (and restores the logger's level) on exit.
    """

    def __init__(self, level: int = logging.WARNING, logger: str = "megatron_peft_export"):
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.messages: list[str] = []
        self.lines: list[str] = []
        self._logger = logging.getLogger(logger)
        self._level = self._logger.level
        if level < self._logger.getEffectiveLevel():
            self._logger.setLevel(level)
        self._logger.addHandler(self)

    def emit(self, record):
        self.messages.append(record.getMessage())
        self.lines.append(self.format(record))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)
