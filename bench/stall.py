"""Training stall per save at TP=2: the hook against a synchronous export and against the floor (a host copy).

On both ranks, for each adapter size and repetition, in a rotating order:
- floor: ``p.detach().to("cpu", copy=True)`` of every adapter parameter the rank holds;
- hook: ``AdapterExportHook.on_checkpoint_saved`` (the call only; the export goes on in the background and is
  waited for, untimed, before the next variant, so no export from an earlier variant overlaps). The hook's first
  save (process groups, the walk that finds the adapter, host buffers) is a warm-up, reported on its own;
- sync: ``export_adapter`` on the training thread (exchange, gather to rank 0, convert, write, fsync, publish).
The stall of one save is the slower rank's time (training steps are collective, so all ranks wait for it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .common import Geometry, adapter_parameters, build_lora_model, median, rotated, timed, wide

# ModelOpt LoRA rank 256 on all four linears of 1, 8 and 80 layers (hidden 1024, ffn 1280):
# 12 MB, 99 MB, 986 MB of float32 adapter.
SIZES = {"10MB": wide(1), "100MB": wide(8), "1GB": wide(80)}
VARIANTS = ("floor", "hook", "sync")


def _worker(rank, world, geometry: Geometry, reps: int, scratch: str):
    import torch.distributed as dist

    from megatron_peft_export import export_adapter
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook

    scratch = Path(scratch)
    model = build_lora_model(geometry, tp=world)
    params = adapter_parameters(model)
    hook = AdapterExportHook(HookConfig())
    save = [0]

    def checkpoint_dir() -> Path:
        save[0] += 1
        directory = scratch / f"iter_{save[0]:07d}"
        if rank == 0:
            directory.mkdir(parents=True)
        dist.barrier()
        return directory

    def floor(directory):
        return [p.detach().to("cpu", copy=True) for p in params]

    def hook_save(directory):
        hook.on_checkpoint_saved(save[0], directory, model)

    def sync(directory):
        export_adapter(model, directory / "hf_adapter_sync")

    variants = {"floor": floor, "hook": hook_save, "sync": sync}
    first = {}
    for name in VARIANTS:  # warm-up: the hook's process groups and first walk, gloo connections, allocator
        first[name], _ = timed(variants[name], checkpoint_dir())
        hook.finalize()
    records, hf_file_bytes = [], None
    for rep in range(reps):
        for name in rotated(list(VARIANTS), rep):
            directory = checkpoint_dir()
            seconds, result = timed(variants[name], directory)
            del result
            background, _ = timed(hook.finalize)  # the hook's export, waited for outside the stall
            records.append({"variant": name, "rep": rep, "seconds": seconds, "until_published": seconds + background})
            dist.barrier()
            if rank == 0:
                written = directory / "hf_adapter" / "adapter_model.safetensors"
                hf_file_bytes = written.stat().st_size if written.exists() else hf_file_bytes
                shutil.rmtree(directory)
    return {
        "records": records,
        "first_hook_save": first["hook"],
        "adapter_param_bytes": sum(p.numel() * p.element_size() for p in params),
        "hf_file_bytes": hf_file_bytes,
    }


def run(reps_per_size: dict[str, int], scratch: Path, log) -> list[dict]:
    from tests.support.multiprocess import run_ranks

    rows = []
    for label, reps in reps_per_size.items():
        geometry = SIZES[label]
        directory = scratch / f"stall_{label}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        log(f"stall {label}: adapter {geometry.adapter_bytes / 1e6:.0f} MB, TP=2, {reps} reps")
        results = run_ranks(_worker, 2, geometry, reps, str(directory), timeout=3600)
        shutil.rmtree(directory, ignore_errors=True)
        per_variant = {}
        for name in VARIANTS:
            per_rep = []
            for rep in range(reps):
                times = [next(r for r in res["records"] if r["variant"] == name and r["rep"] == rep) for res in results]
                per_rep.append(
                    {
                        "seconds": max(t["seconds"] for t in times),
                        "until_published": max(t["until_published"] for t in times),
                    }
                )
            per_variant[name] = {
                "seconds": median([r["seconds"] for r in per_rep]),
                "samples": [r["seconds"] for r in per_rep],
                "until_published": median([r["until_published"] for r in per_rep]),
            }
        rows.append(
            {
                "size": label,
                "adapter_bytes": geometry.adapter_bytes,
                "base_bytes": geometry.base_bytes,
                "rank_adapter_param_bytes": [r["adapter_param_bytes"] for r in results],
                "hf_file_bytes": results[0]["hf_file_bytes"],
                "variants": per_variant,
                "first_hook_save": max(r["first_hook_save"] for r in results),
                "hook_over_floor": per_variant["hook"]["seconds"] / per_variant["floor"]["seconds"],
                "sync_over_hook": per_variant["sync"]["seconds"] / per_variant["hook"]["seconds"],
            }
        )
        log(
            f"  floor {per_variant['floor']['seconds']:.4f} s, hook {per_variant['hook']['seconds']:.4f} s, sync "
            f"{per_variant['sync']['seconds']:.3f} s"
        )
    return rows
