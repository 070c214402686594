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
another wrapper of `save_checkpoint` sees the save twice. Scripts that build their own provider can use
`add_args` or `chain(...)` directly instead.

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

from ..config import HookConfig
from ..errors import ExportError
from ..field_docs import field_docs
from ..hook import AdapterExportHook
from ..io.checkpoints import ITERATION_PLACEHOLDER, iteration_dir, release_dir
from ..multi_adapter import check_selection
from ..names import check_name
from .hub import STRATEGIES, PushConfig
from .verify_hook import add_verify_args, verify_config_from_args

log = logging.getLogger("megatron_peft_export")
ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
_DEFAULTS = HookConfig()


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """An `extra_args_provider`: the hook's options as Megatron-LM style flags."""
    group = parser.add_argument_group("HF adapter export (megatron-peft-export)")
    group.add_argument(
        "--export-hf-adapter", action="store_true", help="Write an HF PEFT adapter next to every checkpoint."
    )
    group.add_argument(
        "--hf-adapter-base-model",
        default=None,
        help="HF base model (local directory or Hub id) for the adapter config.",
    )
    group.add_argument(
        "--hf-adapter-dir-name",
        default=_DEFAULTS.subdir,
        type=_checked(check_name, "--hf-adapter-dir-name"),
        help=f"Directory name inside each {ITERATION_PLACEHOLDER} checkpoint directory.",
    )
    group.add_argument(
        "--hf-adapter-every-n-saves",
        type=int,
        default=_DEFAULTS.every_n_saves,
        help="Export every n-th persistent save.",
    )
    group.add_argument(
        "--hf-adapter-name",
        default=_DEFAULTS.adapter_name,
        type=_checked(check_name, "--hf-adapter-name"),
        help="Which named adapter to export.",
    )
    group.add_argument(
        "--hf-adapter-names",
        default=None,
        type=_checked(lambda v, what: check_selection(_names(v)) and v, "--hf-adapter-names"),
        help="Several named adapters in peft's multi-adapter layout: 'all' or a comma-separated list.",
    )
    group.add_argument(
        "--hf-adapter-pad-rank-to",
        type=int,
        default=None,
        help="Pad every module to this rank (same outputs): one rank for hot-swapping and servers.",
    )
    group.add_argument(
        "--hf-adapter-dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="Output dtype (default: the adapter's).",
    )
    group.add_argument(
        "--hf-adapter-model-type",
        default=None,
        help="HF model_type for the names when the base model is not a local directory.",
    )
    group.add_argument(
        "--hf-adapter-expert-layout",
        default="auto",
        choices=["auto", "per_expert", "fused"],
        help="MoE experts: per-expert modules or fused target_parameters.",
    )
    group.add_argument(
        "--hf-adapter-on-error",
        default=_DEFAULTS.on_error,
        choices=["warn", "raise"],
        help="warn: keep training; raise: stop every rank.",
    )
    group.add_argument(
        "--hf-adapter-max-pending",
        type=int,
        default=_DEFAULTS.max_pending,
        help="Exports in flight at once before a save waits.",
    )
    group.add_argument(
        "--hf-adapter-collective-timeout",
        type=float,
        default=_DEFAULTS.collective_timeout,
        help="Seconds an export waits for another rank before every surviving rank gives the export up.",
    )
    group.add_argument(
        "--hf-adapter-allow-nonfinite",
        action="store_true",
        help="Export adapters holding NaN or Inf (by default such an export fails).",
    )
    add_verify_args(group)
    push = field_docs(PushConfig)  # the token: HF_TOKEN or `hf auth login`, never a flag
    group.add_argument(
        "--hf-adapter-push-repo-id", default=None, help="Push adapters to the Hugging Face Hub: " + push["repo_id"]
    )
    group.add_argument("--hf-adapter-push-strategy", default="every_save", choices=STRATEGIES, help=push["strategy"])
    group.add_argument("--hf-adapter-push-private", action="store_true", help=push["private"])
    group.add_argument("--hf-adapter-push-revision", default=None, help=push["revision"])
    return parser


def _checked(check: Callable[[str, str], Any], flag: str) -> Callable[[str], str]:
    """An argparse `type` that runs one of the config's checks, so a bad value fails when the flags are parsed."""

    def parse(value: str) -> str:
        try:
            return check(value, flag)
        except ExportError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def chain(*providers: ArgsProvider | None) -> ArgsProvider:
    """One extra_args_provider that applies several in order (None entries are skipped)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for p in providers:
            if p is not None:
                parser = p(parser) or parser
        return parser

    return provider


def config_from_args(args: argparse.Namespace) -> HookConfig:
    return HookConfig(
        enabled=bool(getattr(args, "export_hf_adapter", False)),
        base_model_name_or_path=args.hf_adapter_base_model,
        subdir=args.hf_adapter_dir_name,
        every_n_saves=args.hf_adapter_every_n_saves,
        adapter_name=args.hf_adapter_name,
        adapter_names=_names(getattr(args, "hf_adapter_names", None)),
        pad_rank_to=getattr(args, "hf_adapter_pad_rank_to", None),
        dtype=args.hf_adapter_dtype,
        model_type=args.hf_adapter_model_type,
        expert_layout=args.hf_adapter_expert_layout,
        on_error=args.hf_adapter_on_error,
        max_pending=args.hf_adapter_max_pending,
        collective_timeout=getattr(args, "hf_adapter_collective_timeout", _DEFAULTS.collective_timeout),
        allow_nonfinite=getattr(args, "hf_adapter_allow_nonfinite", False),
        verify=verify_config_from_args(args),
        push=PushConfig(
            repo_id=args.hf_adapter_push_repo_id,
            strategy=args.hf_adapter_push_strategy,
            private=args.hf_adapter_push_private,
            revision=args.hf_adapter_push_revision,
        )
        if getattr(args, "hf_adapter_push_repo_id", None)
        else None,
    )


def _names(value: str | None) -> str | list[str] | None:
    """--hf-adapter-names: 'all' or a comma-separated list."""
    if value is None or value == "all":
        return value
    return [n.strip() for n in value.split(",") if n.strip()]


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

    The hook is made at the first save with `--export-hf-adapter` and finalized at interpreter exit
    (or by `finalize()`).
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
    """After a save returned, on every rank: hand it to the hook (made at the first save)."""
    global _HOOK
    if not getattr(margs, "export_hf_adapter", False) or not margs.save:
        return
    if _HOOK is None:
        _HOOK = AdapterExportHook(config_from_args(margs))
        _at_exit(finalize)
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
    _HOOK.on_checkpoint_saved(
        iteration,
        checkpoint_dir,
        call["model"],
        finalized=not getattr(margs, "async_save", False),
        non_persistent=non_persistent,
    )


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
