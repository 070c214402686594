"""`megatron-peft-export serve PATH --url URL`: load a finished adapter into a running vLLM server."""

from __future__ import annotations

import argparse
import sys

from ..delivery import ServeConfig, deliver
from ..integrations.hub import find_adapters
from ..io.checkpoints import ITERATION_GLOB

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
    parser.add_argument("--url", required=True, help="the vLLM server's base URL (http://host:port)")
    parser.add_argument("--name", default="adapter", help="the stable served name (default: adapter)")
    parser.add_argument("--keep", type=int, default=2, help="per-iteration names kept loaded (default: 2)")
    parser.add_argument("--api-key-env", default="VLLM_API_KEY", help="environment variable with the server's API key")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: 30)")
    parser.add_argument("--retries", type=int, default=3, help="attempts of a request without answer (default: 3)")
    parser.add_argument("--max-lora-rank", type=int, help="the server's --max-lora-rank, if it does not report it")
    parser.add_argument("--dir-name", default="hf_adapter", help="adapter directory name in each iteration")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = ServeConfig(
        url=args.url,
        name=args.name,
        keep=args.keep,
        api_key_env=args.api_key_env,
        timeout=args.timeout,
        retries=args.retries,
        max_lora_rank=args.max_lora_rank,
    )
    adapter = find_adapters(args.path, args.dir_name)[-1]
    result = deliver(adapter.path, adapter.iteration, config)
    if result.status != "loaded":
        print(f"{adapter.path}: {result.status}: {' '.join(result.message.split())}", file=sys.stderr)
        return 1
    print(f"{adapter.path}: served by {config.url} as {', '.join(result.names)} (vLLM {result.vllm})")
    return 0
