"""`megatron-peft-export push PATH --repo-id OWNER/NAME`: upload adapters to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from ..adapter_files import read_adapter
from ..field_docs import field_docs
from ..integrations.hub import STRATEGIES, PushConfig, find_adapters, push_adapters, uploadable
from ..names import check_name

_EXAMPLES = """examples:
  megatron-peft-export push runs/llama/iter_0000500/hf_adapter --repo-id my-org/llama-lora
  megatron-peft-export push runs/llama --repo-id my-org/llama-lora --strategy all_checkpoints --private

The token comes from HF_TOKEN or the stored login (`hf auth login`); there is no token flag."""


def register(commands) -> None:
    docs = field_docs(PushConfig)
    parser = commands.add_parser(
        "push", help="upload adapters to the Hugging Face Hub", epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PATH is an adapter directory, or a training save directory: then its latest adapter "
        "(<save>/iter_*/<dir-name>), or every adapter with --strategy all_checkpoints, each also under iter_XXXXXXX/ in the repo. "
        "One commit; the repository (and branch) is created when missing.",
    )
    parser.add_argument("path", help="adapter directory or training save directory")
    parser.add_argument("--repo-id", required=True, help=docs["repo_id"])
    parser.add_argument("--private", action="store_true", help=docs["private"])
    parser.add_argument("--revision", help=docs["revision"])
    parser.add_argument("--strategy", choices=STRATEGIES, default="end",
                        help="end and every_save push the latest adapter at the repo root; all_checkpoints also every iteration in its own folder (default: end)")
    parser.add_argument("--commit-message", help=docs["commit_message"])
    parser.add_argument("--base-model", help=docs["base_model"])
    parser.add_argument("--endpoint", help=docs["endpoint"])
    parser.add_argument("--retries", type=int, default=3, help=docs["retries"])
    parser.add_argument("--dir-name", default="hf_adapter", help="adapter directory name inside each iteration of a save directory (default: hf_adapter)")
    parser.add_argument("--allow-nonfinite", action="store_true", help="push adapters whose tensors hold NaN or Inf (by default refused)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = PushConfig(
        repo_id=args.repo_id, strategy=args.strategy, private=args.private, revision=args.revision,
        commit_message=args.commit_message, base_model=args.base_model, endpoint=args.endpoint, retries=args.retries,
    )
    adapters = find_adapters(args.path, check_name(args.dir_name, "--dir-name"))
    latest = adapters[-1]
    checkpoints = [a for a in adapters if a.iteration is not None] if config.strategy == "all_checkpoints" else []
    for path in sorted({a.path for a in (latest, *checkpoints)}):  # nothing but regular files; nothing malformed, contradictory or NaN
        files = uploadable(path)  # links, FIFOs, devices refused before anything is read
        for adapter in [path, *(path / name.split("/")[0] for name, _ in files if name.endswith("/adapter_config.json"))]:  # and peft's multi-adapter subfolders
            read_adapter(adapter, values=True, allow_nonfinite=args.allow_nonfinite, remedy="pass --allow-nonfinite to push it anyway")
    url = push_adapters(config, latest, checkpoints)
    where = f"{config.repo_id}@{config.revision or 'main'}"
    folders = f" and {len(checkpoints)} iteration folder(s)" if checkpoints else ""
    print(f"pushed {latest.path} (iteration {latest.iteration}){folders} to {where}: {url}")
    return 0
