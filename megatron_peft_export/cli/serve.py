"""`megatron-peft-export serve PATH --url URL`: load a finished adapter into a running vLLM server."""

from __future__ import annotations

import argparse
import sys

from ..core.options import add_arguments, from_args
from ..io.checkpoints import ITERATION_GLOB
from ..services.delivery import ServeConfig, deliver
from ..services.hub import find_adapters

_EXAMPLES = """examples:
  megatron-peft-export serve runs/llama/iter_0000500/hf_adapter --url http://localhost:8000
  megatron-peft-export serve runs/llama --url http://rollout:8000 --name policy --keep 3

The server runs with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora. Its API key (its --api-key) comes
from the environment variable --api-key-env names (default VLLM_API_KEY); there is no key flag.
exit status: 0 loaded, 1 not loaded (the check failed, or the server refused or did not answer), 2 bad input"""


def register(commands) -> None:
    parser = commands.add_parser(
        "serve",
        help="load an adapter into a running vLLM server (runtime LoRA API)",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PATH is an adapter directory, or a training save directory: then its newest adapter "
        f"(<save>/{ITERATION_GLOB}/<dir-name>). The adapter is checked against the server's vLLM version first; it "
        f"is served as NAME-iter_XXXXXXX and as NAME, which moves to it; older NAME-{ITERATION_GLOB} beyond --keep are "
        "unloaded. "
        "What happened is written to serving.json in the adapter directory.",
    )
    parser.add_argument("path", help="adapter directory or training save directory")
    add_arguments(parser, "cli:serve")  # the serve options and --dir-name (core/options.py)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    values = from_args(args, "serve", "cli:serve")
    config = ServeConfig(**values)
    adapter = find_adapters(args.path, args.dir_name)[-1]
    result = deliver(adapter.path, adapter.iteration, config)
    if result.status != "loaded":
        print(f"{adapter.path}: {result.status}: {' '.join(result.message.split())}", file=sys.stderr)
        return 1
    print(f"{adapter.path}: served by {config.url} as {', '.join(result.names)} (vLLM {result.vllm})")
    return 0
