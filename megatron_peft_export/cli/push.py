"""`megatron-peft-export push PATH --repo-id OWNER/NAME`: upload adapters to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import logging

from ..core.names import check_name
from ..core.options import add_arguments, from_args
from ..io.checkpoints import ITERATION_GLOB
from ..io.hf_config import read_hf_config
from ..io.peft_dir import ADAPTER_CONFIG, read_adapter
from ..services.hub import PushConfig, find_adapters, push_adapters, uploadable
from ..targets import BaseModel, base_model, check_targets

log = logging.getLogger("megatron_peft_export")
_EXAMPLES = """examples:
  megatron-peft-export push runs/llama/iter_0000500/hf_adapter --repo-id my-org/llama-lora
  megatron-peft-export push runs/llama --repo-id my-org/llama-lora --strategy all_checkpoints --private

The token comes from HF_TOKEN or the stored login (`hf auth login`); there is no token flag."""


def register(commands) -> None:
    parser = commands.add_parser(
        "push",
        help="upload adapters to the Hugging Face Hub",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PATH is an adapter directory, or a training save directory: then its latest adapter "
        f"(<save>/{ITERATION_GLOB}/<dir-name>), or every adapter with --strategy all_checkpoints, each also under "
        "iter_XXXXXXX/ in the repo. "
        "One commit; the repository (and branch) is created when missing.",
    )
    parser.add_argument("path", help="adapter directory or training save directory")
    add_arguments(parser, "cli:push")  # the push options, --dir-name and --allow-nonfinite (core/options.py)
    parser.add_argument(
        "--allow-target-mismatch",
        action="store_true",
        help="push adapters whose target_modules miss modules their weights are for, or match nothing in the base "
        "model (by default refused)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = PushConfig(**from_args(args, "push", "cli:push"))
    adapters = find_adapters(args.path, check_name(args.dir_name, "--dir-name"))
    latest = adapters[-1]
    checkpoints = [a for a in adapters if a.iteration is not None] if config.strategy == "all_checkpoints" else []
    bases: dict[str | None, BaseModel | None] = {}  # every adapter of a save directory names the same base model
    # nothing but regular files; nothing malformed, contradictory or NaN
    for path in sorted({a.path for a in (latest, *checkpoints)}):
        files = uploadable(path)  # links, FIFOs, devices refused before anything is read
        for adapter in [
            path,
            *(path / name.split("/")[0] for name, _ in files if name.endswith(f"/{ADAPTER_CONFIG}")),
        ]:  # and peft's multi-adapter subfolders
            settings, shapes = read_adapter(
                adapter,
                values=True,
                allow_nonfinite=args.allow_nonfinite,
                remedy="pass --allow-nonfinite to push it anyway",
            )
            if not args.allow_target_mismatch:
                # the first whose config.json is here
                for name in (
                    args.base_model,
                    settings.get("base_model_name_or_path"),
                ):
                    if name not in bases:
                        bases[name] = _base_model(name)
                    if bases[name] is not None:
                        break
                check_targets(
                    settings,
                    shapes,
                    str(adapter),
                    bases[name],
                    remedy="; pass --allow-target-mismatch to push it anyway",
                )
    url = push_adapters(config, latest, checkpoints)
    where = f"{config.repo_id}@{config.revision or 'main'}"
    folders = f" and {len(checkpoints)} iteration folder(s)" if checkpoints else ""
    print(f"pushed {latest.path} (iteration {latest.iteration}){folders} to {where}: {url}")
    return 0


def _base_model(name: str | None) -> BaseModel | None:
    """The base model's module names, when its config.json is on this machine (a directory, or a Hub id in the local
    cache)."""
    from ..services.verify import resolve_base_model

    local = resolve_base_model(name) if isinstance(name, str) else None
    found = base_model(read_hf_config(local), name) if local else None
    if found is None and name is not None:
        log.info(
            "base model %r: no config.json on this machine; target_modules checked against the adapter's own "
            "weights only",
            name,
        )
    return found
