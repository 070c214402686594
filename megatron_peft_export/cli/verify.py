"""`megatron-peft-export verify`: an adapter against the training model's reference logits, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..field_docs import field_docs
from ..io.checkpoints import iteration_of
from ..io.peft_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..verify import PRECISIONS, RESULT_FILE, VerificationResult, VerifyConfig, check_result_path, verify_adapter

EXAMPLES = """examples:
  megatron-peft-export verify /ckpt/iter_0000200/hf_adapter --base-model /models/Llama-3.1-8B
  megatron-peft-export verify out/adapter --base-model /models/base --reference ref.safetensors --dtype bfloat16
  --max-abs-diff 0.5
  megatron-peft-export verify out/adapter --base-model /models/base --wandb-project my-proj --wandb-exp-name sft
  --wandb-artifact

exit status: 0 verified, 1 verification failed, 2 bad input (no adapter, base model or reference) or the result cannot
be written"""
_FLOATS = ("max_abs_diff", "mean_abs_diff", "min_top1_agreement", "min_topk_agreement", "max_kl_divergence")
_STRINGS = ("tokenizer", "wandb_project", "wandb_entity", "wandb_exp_name", "wandb_save_dir")


def register(commands) -> None:
    docs = field_docs(VerifyConfig)
    parser = commands.add_parser(
        "verify",
        help="check an HF adapter against the training model's reference logits (transformers + peft)",
        description="Load the base model with transformers and the adapter with peft, fail on any adapter key peft "
        "ignores, "
        "and compare the logits on the probe with the reference the training hook captured at save time.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "adapter_dir",
        metavar="ADAPTER_DIR",
        help=f"HF PEFT adapter directory ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS})",
    )
    parser.add_argument(
        "--base-model",
        required=True,
        metavar="HF_DIR",
        help="local HF base model directory (or a Hub id already in the local cache)",
    )
    parser.add_argument(
        "--reference",
        metavar="FILE",
        help="reference logits (safetensors); default: ADAPTER_DIR/verification/reference.safetensors",
    )
    parser.add_argument(
        "--output", metavar="FILE", help=f"where to write the result; default: ADAPTER_DIR/{RESULT_FILE}"
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(PRECISIONS), help=docs["dtype"])
    parser.add_argument("--device", default="cpu", help=docs["device"])
    parser.add_argument("--top-k", type=int, default=VerifyConfig.top_k, help=docs["top_k"])
    for name in _FLOATS:
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=None, help=docs[name])
    for name in _STRINGS:
        parser.add_argument("--" + name.replace("_", "-"), default=None, help=docs[name])
    parser.add_argument("--wandb-artifact", action="store_true", help=docs["wandb_artifact"])
    parser.add_argument("--quiet", action="store_true", help="print only the one-line summary")
    parser.set_defaults(run=run)


def _iteration(adapter_dir: Path, result: VerificationResult) -> int:
    if result.iteration is not None:
        return result.iteration
    found = iteration_of(adapter_dir)
    return 0 if found is None else found


def run(args: argparse.Namespace) -> int:
    config = VerifyConfig(
        base_model=args.base_model,
        dtype=args.dtype,
        device=args.device,
        top_k=args.top_k,
        wandb=bool(args.wandb_project),
        wandb_artifact=args.wandb_artifact,
        **{n: getattr(args, n) for n in _FLOATS + _STRINGS},
    )
    adapter_dir = Path(args.adapter_dir)
    output = check_result_path(
        Path(args.output) if args.output else adapter_dir / RESULT_FILE
    )  # before the verification runs
    result = verify_adapter(adapter_dir, args.base_model, config, reference_path=args.reference)
    result.write(adapter_dir, output)
    print(result.summary)
    if not args.quiet:
        for warning in result.warnings:
            print(f"warning: {warning}")
    if config.wandb:
        from ..integrations.wandb_log import WandbLogger

        logger = WandbLogger(config)
        logger.log(result, _iteration(adapter_dir, result), adapter_dir)
        logger.finish()
    return 0 if result.passed else 1
