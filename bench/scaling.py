"""Live export against world size: ``export_adapter`` of one fixed adapter at TP = 1, 2 and 4 processes.

Each world is a fresh set of forked ranks (gloo on localhost, one intra-op thread each; 4 ranks share the 2
cores). In every world: build the model, one export whose peak RSS is measured per rank (fresh processes,
glibc returning freed memory at once so the high-water mark is the export's own), then timed exports.
The time of one export is the slowest rank's (the writer's). World sizes are interleaved across repetitions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .common import Geometry, build_lora_model, median, peak_rss, return_freed_memory, rotated, timed, wide

ADAPTER = wide(8)
"""99 MB of float32 adapter (64 tensors), rank 256 on all four linears of 8 layers."""
TIMED_EXPORTS = 2


def _worker(rank, world, geometry: Geometry, scratch: str):
    import torch.distributed as dist

    from megatron_peft_export import export_adapter

    return_freed_memory()
    model = build_lora_model(geometry, tp=world)
    out = Path(scratch) / f"world{world}"

    def export(n):
        dist.barrier()
        seconds, _ = timed(export_adapter, model, out / f"export_{n}")
        dist.barrier()
        if rank == 0:
            shutil.rmtree(out / f"export_{n}")
        return seconds

    with peak_rss() as peak:
        first = export(0)
    return {"peak_rss": peak[0], "first": first, "seconds": [export(n + 1) for n in range(TIMED_EXPORTS)]}


def run(reps: int, worlds: list[int], scratch: Path, log, geometry: Geometry = ADAPTER) -> list[dict]:
    from tests.support.multiprocess import run_ranks

    samples = {w: [] for w in worlds}
    for rep in range(reps):
        for world in rotated(list(worlds), rep):
            directory = scratch / "scaling"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            samples[world].append(run_ranks(_worker, world, geometry, str(directory), timeout=3600))
            shutil.rmtree(directory, ignore_errors=True)
        log(f"scaling: rep {rep + 1}/{reps} done")
    rows = []
    for world in worlds:
        runs = samples[world]
        times = [max(ranks[r]["seconds"][n] for r in range(world)) for ranks in runs for n in range(TIMED_EXPORTS)]
        writer = [ranks[0]["peak_rss"] for ranks in runs]
        others = [max(ranks[r]["peak_rss"] for r in range(1, world)) for ranks in runs] if world > 1 else []
        rows.append(
            {
                "world": world,
                "tp": world,
                "adapter_bytes": geometry.adapter_bytes,
                "seconds": median(times),
                "samples": times,
                "writer_peak_rss": median(writer),
                "other_ranks_peak_rss": median(others) if others else None,
            }
        )
        log(
            f"  world {world}: export {rows[-1]['seconds']:.3f} s, writer peak "
            f"+{rows[-1]['writer_peak_rss'] / 1e6:.0f} MB"
        )
    return rows
