"""Megatron-LM: `--export-hf-adapter` and friends, and a wrapper around `save_checkpoint_and_time`.

Two added lines in a stock `pretrain_gpt.py`, before `pretrain(...)`:

    from megatron_peft_export.integrations import megatron_lm
    megatron_lm.install()

`install()` wraps `megatron.training.training.save_checkpoint_and_time` (called through the module,
so the wrapper is seen by the training loop) and chains `add_args` in front of whatever
`extra_args_provider` the script passes (ModelOpt's, for example). Scripts that build their own
provider can use `add_args` or `chain(...)` directly instead.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import inspect
from typing import Any, Callable

from ..config import HookConfig
from ..errors import ExportError
from ..multi_adapter import check_selection
from ..names import check_name
from ..field_docs import field_docs
from ..hook import AdapterExportHook, iteration_dir
from .hub import STRATEGIES, PushConfig
from .verify_hook import add_verify_args, verify_config_from_args

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
_DEFAULTS = HookConfig()


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """An `extra_args_provider`: the hook's options as Megatron-LM style flags."""
    group = parser.add_argument_group("HF adapter export (megatron-peft-export)")
    group.add_argument("--export-hf-adapter", action="store_true", help="Write an HF PEFT adapter next to every checkpoint.")
    group.add_argument("--hf-adapter-base-model", default=None, help="HF base model (local directory or Hub id) for the adapter config.")
    group.add_argument("--hf-adapter-dir-name", default=_DEFAULTS.subdir, type=_checked(check_name, "--hf-adapter-dir-name"),
                       help="Directory name inside each iter_* checkpoint directory.")
    group.add_argument("--hf-adapter-every-n-saves", type=int, default=_DEFAULTS.every_n_saves, help="Export every n-th persistent save.")
    group.add_argument("--hf-adapter-name", default=_DEFAULTS.adapter_name, type=_checked(check_name, "--hf-adapter-name"), help="Which named adapter to export.")
    group.add_argument("--hf-adapter-names", default=None, type=_checked(lambda v, what: check_selection(_names(v)) and v, "--hf-adapter-names"),
                       help="Several named adapters in peft's multi-adapter layout: 'all' or a comma-separated list.")
    group.add_argument("--hf-adapter-pad-rank-to", type=int, default=None, help="Pad every module to this rank (same outputs): one rank for hot-swapping and servers.")
    group.add_argument("--hf-adapter-dtype", default=None, choices=["bfloat16", "float16", "float32"], help="Output dtype (default: the adapter's).")
    group.add_argument("--hf-adapter-model-type", default=None, help="HF model_type for the names when the base model is not a local directory.")
    group.add_argument("--hf-adapter-expert-layout", default="auto", choices=["auto", "per_expert", "fused"], help="MoE experts: per-expert modules or fused target_parameters.")
    group.add_argument("--hf-adapter-on-error", default=_DEFAULTS.on_error, choices=["warn", "raise"], help="warn: keep training; raise: stop every rank.")
    group.add_argument("--hf-adapter-max-pending", type=int, default=_DEFAULTS.max_pending, help="Exports in flight at once before a save waits.")
    group.add_argument("--hf-adapter-collective-timeout", type=float, default=_DEFAULTS.collective_timeout,
                       help="Seconds an export waits for another rank before every surviving rank gives the export up.")
    group.add_argument("--hf-adapter-allow-nonfinite", action="store_true", help="Export adapters holding NaN or Inf (by default such an export fails).")
    add_verify_args(group)
    push = field_docs(PushConfig)  # the token: HF_TOKEN or `hf auth login`, never a flag
    group.add_argument("--hf-adapter-push-repo-id", default=None, help="Push adapters to the Hugging Face Hub: " + push["repo_id"])
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
            repo_id=args.hf_adapter_push_repo_id, strategy=args.hf_adapter_push_strategy,
            private=args.hf_adapter_push_private, revision=args.hf_adapter_push_revision,
        ) if getattr(args, "hf_adapter_push_repo_id", None) else None,
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


def install() -> None:
    """Wrap Megatron-LM's checkpoint save and argument parsing; idempotent.

    The hook is made at the first save with `--export-hf-adapter` and finalized at interpreter exit
    (or by `finalize()`).
    """
    from megatron.training import arguments, initialize, training

    arguments.parse_args = _chain_parse_args(arguments.parse_args)
    if hasattr(initialize, "parse_args"):
        initialize.parse_args = _chain_parse_args(initialize.parse_args)
    original = training.save_checkpoint_and_time
    if getattr(original, "_hf_adapter_wrapped", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_checkpoint_and_time(*args: Any, **kwargs: Any) -> Any:
        global _HOOK
        result = original(*args, **kwargs)
        margs = training.get_args()
        if getattr(margs, "export_hf_adapter", False):
            if _HOOK is None:
                _HOOK = AdapterExportHook(config_from_args(margs))
                atexit.register(finalize)
            call = signature.bind(*args, **kwargs)
            iteration = call.arguments["iteration"]
            _HOOK.on_checkpoint_saved(
                iteration, iteration_dir(margs.save, iteration), call.arguments["model"],
                finalized=not getattr(margs, "async_save", False),
                non_persistent=bool(call.arguments.get("non_persistent_ckpt", False)),
            )
        return result

    save_checkpoint_and_time._hf_adapter_wrapped = True
    training.save_checkpoint_and_time = save_checkpoint_and_time


def finalize() -> list:
    """Complete pending exports (also run at interpreter exit); returns the adapters published on this rank."""
    if _HOOK is None:
        return []
    _HOOK.finalize()
    return _HOOK.published
