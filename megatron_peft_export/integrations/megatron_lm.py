"""Megatron-LM: `--export-hf-adapter` and friends, and a wrapper around `checkpointing.save_checkpoint`.

Two added lines in a stock `pretrain_gpt.py`, before `pretrain(...)`:

    from megatron_peft_export.integrations import megatron_lm
    megatron_lm.install()

`install()` chains `add_args` in front of whatever `extra_args_provider` the script passes (ModelOpt's,
for example) and wraps `megatron.training.checkpointing.save_checkpoint`, the function every checkpoint
Megatron-LM writes goes through, both as that module's attribute and as the name `training.py` bound
at import (`from megatron.training.checkpointing import save_checkpoint`). After each save returns, on
every rank, the hook gets the iteration, the model and `non_persistent_ckpt`, all bound by name from
the call; the directory is `<args.save>/iter_XXXXXXX` with `args.save` read after the call (a
`--ckpt-convert-format` run sets it to `<ckpt_convert_save>/<format>` first). A save of the iteration just
exported, to the same directory, is not exported again: the rerun state machine's checkpoint request and
the interval save can fall on one iteration (nothing trains in between), and a wrapper of ours inside
another wrapper of `save_checkpoint` sees the save twice. `install()` also wraps `training.setup_model_and_optimizer`
(called by name in `pretrain()`): once it returns, the hook walks the model (`AdapterExportHook.prepare`), so the
first save only copies the adapter. Scripts that build their own provider can use `add_args` or `chain(...)`
directly instead.

What Megatron-LM's training code does around checkpoints, read in `megatron/training/training.py` and
`checkpointing.py` at core_v0.15.0, v0.15.3, v0.16.0, v0.16.1, v0.17.0, v0.17.1, v0.18.0, v0.18.2, v0.19.0:

- Every version: `training.py` binds `save_checkpoint` by name at import. `save_checkpoint_and_time(iteration,
  model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far, checkpointing_context,
  non_persistent_ckpt=False, train_data_iterator=None)` calls it for the interval saves, the exit saves of
  `checkpoint_and_decide_exit` (signal with `--exit-signal-handler`, `--exit-duration-in-mins`,
  `--exit-interval`; each saves only if that iteration was not just saved), non-persistent saves
  (`non_persistent_ckpt=True`: skipped by the hook, they leave no `iter_` directory under `--save`), the rerun
  state machine's checkpoint request and a batch-size ramp-up change. `setup_model_and_optimizer` calls
  `save_checkpoint` directly for `--ckpt-convert-format` (then `exit()`) and for MoE upcycling;
  `utils.check_adlr_autoresume_termination` imports it from `checkpointing` when it runs.
- core_v0.15.x to v0.17.x: `pretrain()` calls `save_checkpoint` directly for the end-of-training save (when
  the last iteration is not a multiple of `--save-interval`); v0.18.0 and v0.19.0 call `save_checkpoint_and_time`.
- `save_checkpoint(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far,
  checkpointing_context=None, pipeline_rank=None, expert_rank=None, tensor_rank=None, pipeline_parallel=None,
  expert_parallel=None, non_persistent_ckpt=False, train_data_iterator=None, preprocess_common_state_dict_fn=None,
  release=False, ...)`: these names and positions in every version; v0.16 adds `tp_group`, `pp_group`,
  `dp_cp_group`, v0.19 `dp_group`, `expt_dp_group`, `rng_state_key_prefix` (keywords after `release`). `model`
  is the list of DDP-wrapped model chunks. `release=True` (conversion tools, not training) writes
  `<save>/release`; that directory is used then.
- `--async-save`: `save_checkpoint` schedules the write and returns; rank 0 writes the tracker file
  (`latest_checkpointed_iteration.txt`) when the save is finalized, so the hook publishes after the tracker
  names the iteration. `train()` finalizes every pending save (`maybe_finalize_async_save(blocking=True,
  terminate=True)`) before it returns or leaves by `sys.exit(exit_code)` on an exit condition; `pretrain()`
  finalizes again after its end-of-training save. Pending exports finish at interpreter exit, which
  `sys.exit` and `exit()` reach too, or at `finalize()`.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import HookConfig, PushConfig, ServeConfig
from ..core.options import MLM as MEGATRON_LM
from ..core.options import add_arguments, from_args
from ..hook import AdapterExportHook
from ..io.checkpoints import iteration_dir, release_dir
from ..services.verify_hook import verify_config_from_args

log = logging.getLogger("megatron_peft_export")
ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """An `extra_args_provider`: the hook's options as Megatron-LM style flags, made from the option schema
    (`core/options.py`); a bad value fails when the flags are parsed. W&B reuses Megatron-LM's own --wandb-project,
    --wandb-entity, --wandb-exp-name and --wandb-save-dir; the Hub token is never a flag (HF_TOKEN or `hf auth
    login`)."""
    group = parser.add_argument_group("HF adapter export (megatron-peft-export)")
    add_arguments(group, MEGATRON_LM, check=True)
    return parser


def chain(*providers: ArgsProvider | None) -> ArgsProvider:
    """One extra_args_provider that applies several in order (None entries are skipped)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for p in providers:
            if p is not None:
                parser = p(parser) or parser
        return parser

    return provider


def config_from_args(args: argparse.Namespace) -> HookConfig:
    """The hook's config from Megatron-LM's args (a flag absent from `args`: the option's default)."""
    push = from_args(args, "push", MEGATRON_LM) if getattr(args, "hf_adapter_push_repo_id", None) else None
    serve = from_args(args, "serve", MEGATRON_LM) if getattr(args, "hf_adapter_serve_url", None) else None
    return HookConfig(
        **from_args(args, "hook", MEGATRON_LM),
        verify=verify_config_from_args(args),
        push=PushConfig(**push) if push else None,
        serve=ServeConfig(**serve) if serve else None,
    )


def _chain_parse_args(parse_args: Callable) -> Callable:
    if getattr(parse_args, "_hf_adapter_chained", False):
        return parse_args

    @functools.wraps(parse_args)
    def wrapped(extra_args_provider=None, *args, **kwargs):
        parsed = parse_args(chain(add_args, extra_args_provider), *args, **kwargs)
        if getattr(parsed, "export_hf_adapter", False):
            config_from_args(parsed)  # every option checked at startup, not at the first save
        return parsed

    wrapped._hf_adapter_chained = True
    return wrapped


_HOOK: AdapterExportHook | None = None
_LAST_EXPORTED: list[Path] = []
"""The checkpoint directory of the last exported save (one entry at most)."""


def install() -> None:
    """Wrap Megatron-LM's checkpoint save and argument parsing; idempotent.

    With `--export-hf-adapter`, the hook is made once the model is set up (and walks it then) or at the first save,
    and finalized at interpreter exit (or by `finalize()`).
    """
    from megatron.training import arguments, checkpointing, initialize, training

    arguments.parse_args = _chain_parse_args(arguments.parse_args)
    if hasattr(initialize, "parse_args"):
        initialize.parse_args = _chain_parse_args(initialize.parse_args)
    wrappers: dict[int, Callable] = {}
    for module in (checkpointing, training):  # one wrapper for the one function both names hold
        current = getattr(module, "save_checkpoint", None)
        if current is not None and not getattr(current, "_hf_adapter_wrapped", False):
            module.save_checkpoint = wrappers.setdefault(id(current), _wrap_save_checkpoint(current))
    setup = getattr(training, "setup_model_and_optimizer", None)
    if setup is not None and not getattr(setup, "_hf_adapter_wrapped", False):
        training.setup_model_and_optimizer = _wrap_setup(setup)


def _wrap_setup(original: Callable) -> Callable:
    """`setup_model_and_optimizer`, after which (the model built, adapters applied, checkpoint loaded; before the first
    training step) the hook walks the model, so that the first save only copies the adapter."""

    @functools.wraps(original)
    def setup_model_and_optimizer(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        hook = _hook_for(_megatron_args())
        if hook is not None:
            hook.prepare(result[0])
        return result

    setup_model_and_optimizer._hf_adapter_wrapped = True
    return setup_model_and_optimizer


def _wrap_save_checkpoint(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        _after_save(signature.bind(*args, **kwargs).arguments, _megatron_args())
        return result

    save_checkpoint._hf_adapter_wrapped = True
    return save_checkpoint


def _megatron_args() -> Any:
    from megatron.training import get_args

    return get_args()


def _after_save(call: dict[str, Any], margs: Any) -> None:
    """After a save returned, on every rank: hand it to the hook."""
    hook = _hook_for(margs)
    if hook is None:
        return
    iteration = call["iteration"]
    non_persistent = bool(call.get("non_persistent_ckpt", False))
    checkpoint_dir = release_dir(margs.save) if call.get("release") else iteration_dir(margs.save, iteration)
    if not non_persistent:
        if _LAST_EXPORTED == [
            checkpoint_dir
        ]:  # saved again (nothing trained since), or a wrapper of ours inside another
            log.info(
                "iteration %d was saved again to %s; its HF adapter is already exported", iteration, checkpoint_dir
            )
            return
        _LAST_EXPORTED[:] = [checkpoint_dir]
    hook.on_checkpoint_saved(
        iteration,
        checkpoint_dir,
        call["model"],
        finalized=not getattr(margs, "async_save", False),
        non_persistent=non_persistent,
    )


def _hook_for(margs: Any) -> AdapterExportHook | None:
    """The hook with `--export-hf-adapter` and `--save` (made at its first use: after the model is set up, or at the
    first save), else None."""
    global _HOOK
    if not getattr(margs, "export_hf_adapter", False) or not margs.save:
        return None
    if _HOOK is None:
        _HOOK = AdapterExportHook(config_from_args(margs))
        _at_exit(finalize)
    return _HOOK


def _at_exit(fn: Callable[[], Any]) -> None:
    """Run `fn` at this process's exit while thread pools still take work: `threading`'s exit hooks run before
    `atexit`'s, and `concurrent.futures` stops its executors in one of them (registered at its import, so run after
    ours), after which a last push could not be scheduled. Processes forked from this one (torch_dist's writers,
    data loader workers) run `threading`'s exit hooks too when they end: there `fn` does not run. Plain `atexit`
    where `threading` has no such hook."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        atexit.register(fn)
        return
    pid = os.getpid()
    register(lambda: fn() if os.getpid() == pid else None)


def finalize() -> list:
    """Complete pending exports (also run at interpreter exit); returns the adapters published on this rank."""
    if _HOOK is None:
        return []
    _HOOK.finalize()
    return _HOOK.published
