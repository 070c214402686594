"""The main job: LoRA-train a tiny megatron-core GPT on CPU, exporting a Hugging Face PEFT adapter at every checkpoint.

From the repository root (after ``pip install -e '.[test]'``):

    .venv/bin/python examples/train_tiny_gpt.py                          # one process
    .venv/bin/torchrun --nproc-per-node 2 examples/train_tiny_gpt.py     # TP=2 over gloo

Checkpoints go to ``<save>/iter_XXXXXXX/`` (Megatron-LM's torch_dist layout), each with an
``hf_adapter/`` written by ``AdapterExportHook`` with verification on: the training model's logits
on a probe are captured at each save (``hf_adapter/verification/reference.safetensors``) and, once
the adapter is published, checked against the HF base + adapter loaded with transformers and peft
(``hf_adapter/verification.json``); one line per checkpoint gives the verdict. At the end rank 0
also loads the last adapter with ``peft.PeftModel.from_pretrained`` onto the HF twin of the base
model and compares its logits with the Megatron model's on unseen sequences.
"""

import argparse
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.support
# Known noise on CPU: megatron/modelopt "not installed / not tested" notices, deprecations.
warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|modelopt)\.")
warnings.filterwarnings("ignore", category=FutureWarning)

import peft  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from megatron_peft_export.config import HookConfig, VerifyConfig  # noqa: E402
from megatron_peft_export.hook import AdapterExportHook  # noqa: E402

# The CPU shims live in test support on purpose: they patch torch for CPU-only runs, never part of the package.
from tests.support import tiny_gpt, training  # noqa: E402
from tests.support.cpu_shims import install_cpu_shims  # noqa: E402

PARITY_ATOL = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--save", type=Path, default=Path("runs/tiny_gpt"), help="checkpoint directory (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=40, help="training iterations (default: %(default)s)")
    parser.add_argument(
        "--save-interval", type=int, default=10, help="save every N iterations, and at the end (default: %(default)s)"
    )
    parser.add_argument(
        "--base-model-dir", type=Path, help="where to write the HF twin of the base model (default: <save>/hf_base)"
    )
    parser.add_argument("--tp", type=int, help="tensor-parallel size (default: the world size)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser.parse_args(argv)


def init_distributed() -> None:
    """gloo from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), else a world of one."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def fresh_save_dir(save: Path, base_dir: Path) -> None:
    """Rank 0: remove the checkpoints (iter_*, tracker) and base model of an earlier run, nothing else."""
    if save.is_dir():
        for old in save.iterdir():
            if re.fullmatch(r"iter_\d{7}", old.name) or old.name == training.TRACKER:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    shutil.rmtree(base_dir, ignore_errors=True)
    save.mkdir(parents=True, exist_ok=True)


def peft_vs_megatron(base_dir: Path, adapter_dir: Path, tokens: torch.Tensor, megatron_logits: torch.Tensor):
    """Load base + adapter the way a user would; return (max |HF+PEFT - Megatron|, max |adapter effect|)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        base_logits = base(input_ids=tokens).logits
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        peft_logits = model(input_ids=tokens).logits
    diff = (peft_logits - megatron_logits).abs().max().item()
    return diff, (peft_logits - base_logits).abs().max().item()


def main(argv=None) -> int:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    if "OMP_NUM_THREADS" not in os.environ:  # tiny matmuls: extra intra-op threads only contend (5 s vs 30 s here)
        torch.set_num_threads(1)
    install_cpu_shims()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    tc = training.TrainConfig(tp=args.tp or world)
    base_dir = args.base_model_dir or args.save / "hf_base"
    say(
        f"world {world}: TP={tc.tp}, DP={world // tc.tp}; {args.steps} steps, saving every {args.save_interval} to "
        f"{args.save}"
    )

    if rank == 0:  # the hook reads the base config.json at the first save
        fresh_save_dir(args.save, base_dir)
        tiny_gpt.hf_llama_twin(tc.model).save_pretrained(base_dir)
    dist.barrier()

    # verification of every adapter against the training model: the base model is local, so it is required to run
    hook = AdapterExportHook(HookConfig(base_model_name_or_path=str(base_dir), verify=VerifyConfig(required=True)))
    trained = {}

    def on_save(iteration, checkpoint_dir, model):
        hook.on_checkpoint_saved(iteration, checkpoint_dir, model)
        trained["model"] = model
        if not args.quiet:
            say(f"  saved {checkpoint_dir} (HF adapter exporting in the background)")

    start = time.perf_counter()
    losses = training.run_training(
        tc,
        steps=args.steps,
        save_interval=args.save_interval,
        save_dir=args.save,
        on_save=on_save,
        log=None if args.quiet else say,
    )
    hook.finalize()
    elapsed = time.perf_counter() - start

    tokens = training.synthetic_batch(tc.model, iteration=10_000, batch_size=4)[:, :-1]  # unseen sequences
    megatron_logits = tiny_gpt.megatron_logits(trained["model"].module, tokens)  # collective: all ranks
    status = 0
    if rank == 0:
        last = hook.published[-1]
        diff, effect = peft_vs_megatron(base_dir, last, tokens, megatron_logits)
        say(f"trained {args.steps} steps in {elapsed:.1f} s: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        say(f"{len(hook.published)} HF adapters: {args.save}/iter_*/hf_adapter (base model: {base_dir})")
        results = hook.verification.results
        for result in results:
            measured = (
                ""
                if result.max_abs_diff is None
                else f": max |diff| {result.max_abs_diff:.1e} against the training model's logits"
            )
            say(f"  {Path(result.adapter).parent.name}: verification {result.status}{measured}")
        if len(results) != len(hook.published) or any(r.status != "passed" for r in results):
            say(
                f"FAILED: {sum(r.status == 'passed' for r in results)} of {len(hook.published)} adapters passed "
                f"verification"
            )
            status = 1
        if diff <= PARITY_ATOL:
            say(
                f"the last, {last}, loads with peft.PeftModel.from_pretrained and matches the Megatron "
                f"logits to {diff:.1e} max abs diff (the adapter moves them by up to {effect:.2f})"
            )
        else:
            say(f"FAILED: the last adapter, {last}, loaded with peft, is {diff:.1e} off the Megatron logits")
            status = 1
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
