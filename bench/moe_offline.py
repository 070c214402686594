"""Offline export at real MoE tensor counts: a torch_dist checkpoint of bench/moe.py's model (ModelOpt LoRA on every
routed expert), saved by megatron's ``dist_checkpointing.save`` at EP=1 or EP=2, exported by ``export_checkpoint``
in a fresh process with the page cache evicted, against the read floor (the adapter's byte ranges read with plain
``readinto``) and the read+write floor (those bytes written to one new file and fsynced); peak RSS above the start.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tests.support.checkpoint_args import recorded_args

from .common import evict_page_cache, peak_rss, return_freed_memory, timed

ITERATION = 3


def write_checkpoint(rank, world, layers: int, experts: int, save_dir: str, hidden: int = 8, rank_r: int = 2):
    """Build bench/moe.py's model at EP=`world` and save it as Megatron-LM does (args in common.pt, ModelOpt state)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    from megatron_peft_export.io.checkpoints import TRACKER, iteration_dir
    from tests.support.training import _in_process_write_results, _may_fork

    from .moe import _config, build

    return_freed_memory()
    cfg = _config(layers, experts, hidden)
    model = build(layers, experts, ep=world, hidden=hidden, rank=rank_r)
    args = recorded_args(
        cfg,
        tensor_model_parallel_size=1,
        expert_tensor_parallel_size=1,
        num_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
    )
    directory = iteration_dir(Path(save_dir), ITERATION)
    directory.mkdir(parents=True, exist_ok=True)
    _in_process_write_results()
    with _may_fork():
        dist_checkpointing.save(
            {"model": model.sharded_state_dict(), "args": args, "iteration": ITERATION}, str(directory)
        )
        save_sharded_modelopt_state([model], str(directory))
    dist.barrier()
    if rank == 0:
        (Path(save_dir) / TRACKER).write_text(str(ITERATION))


def measure(variant: str, directory: str, output: str) -> dict:
    """One cold measurement in a fresh process: the offline export (per_expert layout) or one of its floors
    (bench/offline.py's raw read and read+write of the adapter's byte ranges)."""
    import hashlib

    import torch

    if variant != "export":
        from .offline import _measure

        cpu = time.process_time()
        result = _measure(variant, directory, output)
        return dict(result, cpu_seconds=result.get("cpu_seconds", time.process_time() - cpu))
    from megatron_peft_export.export import ExportOptions
    from megatron_peft_export.offline.export import export_checkpoint

    torch.set_num_threads(1)
    return_freed_memory()
    directory, output = Path(directory), Path(output)
    options = ExportOptions(model_type="mixtral", expert_layout="per_expert")
    evict_page_cache(directory)
    with peak_rss() as peak:
        cpu = time.process_time()
        seconds, summary = timed(export_checkpoint, directory, output, options=options, quiet=True)
        cpu = time.process_time() - cpu
    digest = hashlib.sha256((output / "adapter_model.safetensors").read_bytes()).hexdigest()
    shutil.rmtree(output)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": peak[0], "bytes": summary.bytes, "sha256": digest}


VARIANTS = ("export", "raw_read", "read_write_floor")


def _in_new_interpreter(variant: str, directory: str, output: str) -> dict:
    """`measure` in a new Python process (not forked): a forked child inherits its parent's freed but resident heap
    and reuses it without its resident set growing, so its peak RSS above the start read 246 MB at 61x256 where a new
    process reads ~515 MB."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = (
        "import json, sys; from bench.moe_offline import measure; print('RESULT' + json.dumps(measure(*sys.argv[1:4])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, variant, directory, output],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=7200,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode or not lines:
        raise RuntimeError(f"measure({variant}) failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT") :])


def run_shape(label: str, shape: tuple, reps: int, scratch: Path, log) -> dict:
    """Write the shape's checkpoint, then measure the export and its floors `reps` times each, interleaved."""
    from tests.support.multiprocess import run_ranks

    from .common import directory_bytes, median, rotated
    from .offline import _adapter_ranges

    layers, experts, hidden, rank_r = shape
    save = scratch / f"moe_offline_{label}"
    shutil.rmtree(save, ignore_errors=True)
    seconds, _ = timed(run_ranks, write_checkpoint, 1, layers, experts, str(save), hidden, rank_r, timeout=7200)
    directory = save / f"iter_{ITERATION:07d}"
    ranges = _adapter_ranges(directory)
    log(
        f"moe offline {label}: wrote {directory_bytes(directory) / 1e9:.2f} GB, {len(ranges)} stored items in "
        f"{seconds:.0f} s"
    )
    samples = {v: [] for v in VARIANTS}
    for rep in range(reps):
        for variant in rotated(list(VARIANTS), rep):
            out = str(scratch / "moe_offline_out")
            samples[variant].append(_in_new_interpreter(variant, str(directory), out))
    shutil.rmtree(save, ignore_errors=True)
    row = {"shape": label, "stored_items": len(ranges), "adapter_bytes": sum(n for _, _, n in ranges)}
    for variant, results in samples.items():
        row[variant] = median([r["seconds"] for r in results])
        row[f"{variant}_samples"] = [r["seconds"] for r in results]
        row[f"{variant}_peak_rss"] = median([r["peak_rss"] for r in results])
        row[f"{variant}_cpu"] = median([r["cpu_seconds"] for r in results])
        row[f"{variant}_cpu_samples"] = [r["cpu_seconds"] for r in results]
        row[f"{variant}_sha256"] = sorted({r["sha256"] for r in results if "sha256" in r})
    row["export_over_read_write_floor"] = row["export"] / row["read_write_floor"]
    row["peak_rss_over_adapter_bytes"] = row["export_peak_rss"] / row["adapter_bytes"]
    log(
        f"  export {row['export']:.2f} s, raw read {row['raw_read']:.3f} s, read+write floor "
        f"{row['read_write_floor']:.3f} s ({row['export_over_read_write_floor']:.1f}x), export CPU "
        f"{row['export_cpu']:.2f} s, floor CPU {row['read_write_floor_cpu']:.2f} s, peak RSS "
        f"{row['export_peak_rss'] / 1e6:.0f} MB for {row['adapter_bytes'] / 1e6:.0f} MB of adapter"
    )
    return row


def run(reps: int, scratch: Path, log, shapes: dict) -> dict:
    """`--only moe_offline`: the offline export alone per shape against its floors, and its growth exponents
    between the first and last tensor-count shape (hidden 8)."""
    import math

    rows = [
        dict(run_shape(label.replace(" ", "_"), shape, reps, scratch, log), hidden=shape[2])
        for label, shape in shapes.items()
    ]
    counted = [r for r in rows if r["hidden"] == 8]
    slopes = {}
    if len(counted) >= 2:
        a, b = counted[0], counted[-1]
        span = math.log(b["stored_items"] / a["stored_items"])
        for key in ("export", "export_cpu", "read_write_floor", "export_peak_rss"):
            slopes[key] = math.log(b[key] / a[key]) / span
    return {"rows": rows, "growth_exponent": slopes}
