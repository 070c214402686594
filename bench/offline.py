"""Offline export against checkpoint size: one fixed adapter inside torch_dist checkpoints whose base is 1x, 10x and
100x its size.

The checkpoints are what Megatron-LM writes: a real megatron-core GPT with ModelOpt LoRA on all four linears of
16 layers, saved at TP=2 by two ranks with ``dist_checkpointing.save`` (``args`` in common.pt, ModelOpt's PEFT
config under ``modelopt_state/``). The adapter's values are layout-independent (``fill_lora_random``), so the three
checkpoints hold the same adapter and must give byte-identical exports. The base grows through the vocabulary
(embedding and output layer, not adapted); base weights are random, so no layer of the storage stack can compress them.

Each measurement runs in a fresh process (forked before any torch work; no CPU shims, no process group, one
intra-op thread), with the checkpoint evicted from the page cache first (cold reads):
- export: ``export_checkpoint`` (read adapter keys, convert, write the HF adapter, fsync, publish);
- full load: ``dist_checkpointing.load_plain_tensors`` (every tensor of the checkpoint into memory), the
  alternative of loading the checkpoint and picking the adapter out;
- raw read: the adapter's byte ranges (from ``.metadata``) read with plain ``readinto``: the disk's floor for reading;
- read+write floor: the raw read, then those bytes written to one new file and fsynced: the least any exporter does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path

from tests.support.multiprocess import run_alone
from tests.support.tiny_gpt import TinyGPTConfig

from .common import (
    Geometry,
    build_lora_model,
    directory_bytes,
    evict_page_cache,
    median,
    peak_rss,
    return_freed_memory,
    rotated,
    timed,
)

ITERATION = 10
ADAPTER = Geometry(
    TinyGPTConfig(
        num_layers=16, hidden_size=256, ffn_hidden_size=320, num_attention_heads=4, num_query_groups=4, kv_channels=64
    ),
    rank=256,
)
"""49 MB of float32 adapter (128 tensors), 33 MB of base weights in its layers."""
MANY_TENSORS = dataclasses.replace(ADAPTER.resized(num_layers=80), rank=16)
"""15 MB in 640 tensors (rank 16 on all linears of 80 layers): the shape of real rank-16 adapters, where costs per
tensor dominate."""
VARIANTS = ("export", "full_load", "raw_read", "read_write_floor")


def with_base(geometry: Geometry, ratio: float) -> Geometry:
    """The geometry with the vocabulary that makes the base weights ``ratio`` times the adapter (vocab a multiple of
    128)."""
    without_vocab = geometry.resized(vocab_size=0).base_bytes
    vocab = max(
        128, round((ratio * geometry.adapter_bytes - without_vocab) / (4 * 2 * geometry.model.hidden_size) / 128) * 128
    )
    return geometry.resized(vocab_size=vocab)


def _write_checkpoint(rank, world, geometry: Geometry, save_dir: str):
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    from megatron_peft_export.io.checkpoints import TRACKER
    from tests.support.training import TrainConfig, _in_process_write_results, _may_fork, _megatron_args

    return_freed_memory()
    model = build_lora_model(geometry, tp=world, fill="global", seed=11)
    generator = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.uniform_(-0.1, 0.1, generator=generator)
    directory = Path(save_dir) / f"iter_{ITERATION:07d}"
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.sharded_state_dict(),
        "iteration": ITERATION,
        "checkpoint_version": 3.0,
        "args": _megatron_args(
            TrainConfig(model=geometry.model, tp=world, lora_rank=geometry.rank, lora_scale=geometry.scale)
        ),
    }
    _in_process_write_results()
    with _may_fork():
        dist_checkpointing.save(state, str(directory))
        save_sharded_modelopt_state([model], str(directory))
    dist.barrier()
    if rank == 0:
        (Path(save_dir) / TRACKER).write_text(str(ITERATION))


def _adapter_ranges(directory: Path) -> list[tuple[str, int, int]]:
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_peft_export.offline.keys import classify

    metadata = FileSystemReader(str(directory)).read_metadata()
    return sorted(
        (info.relative_path, info.offset, info.length)
        for index, info in metadata.storage_data.items()
        if classify(index.fqn) is not None
    )


def _measure(variant: str, directory: str, output: str):
    """One cold measurement in a fresh process (no CPU shims, no process group): seconds, peak RSS above the start,
    bytes, phase times."""
    import torch

    torch.set_num_threads(1)  # as every rank of the other benchmarks: 2 shared cores make OpenMP barriers stall
    directory, output = Path(directory), Path(output)
    return_freed_memory()
    phases = {}
    if variant == "export":
        from megatron_peft_export.offline import checkpoint as offline_checkpoint
        from megatron_peft_export.offline.export import export_checkpoint

        reader, reading = offline_checkpoint.TorchDistReader, [0.0]

        def timed_items(items):  # time spent inside the reader, to split reading from converting and writing
            while True:
                started = time.perf_counter()
                item = next(items, None)
                reading[0] += time.perf_counter() - started
                if item is None:
                    return
                yield item

        load_many = reader.load_many
        reader.load_many = lambda self, keys, *args, **kwargs: timed_items(load_many(self, keys, *args, **kwargs))
        evict_page_cache(directory)
        with peak_rss() as peak:
            seconds, summary = timed(export_checkpoint, directory, output, quiet=True)
        phases["reading"] = reading[0]
        moved = summary.bytes
        digest = hashlib.sha256((output / "adapter_model.safetensors").read_bytes()).hexdigest()
        shutil.rmtree(output)
        return {"seconds": seconds, "peak_rss": peak[0], "bytes": moved, "phases": phases, "sha256": digest}
    if variant == "full_load":
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        from tests.support.multiprocess import _free_port

        # megatron's loader wants a process group: a world of one, as a user's offline script would start
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        evict_page_cache(directory)
        with peak_rss() as peak:
            seconds, state = timed(dist_checkpointing.load_plain_tensors, str(directory))
        moved = sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "numel"))
        return {"seconds": seconds, "peak_rss": peak[0], "bytes": moved, "phases": phases}
    ranges = _adapter_ranges(directory)
    evict_page_cache(directory)

    def read_ranges():
        buffers = []
        for relative_path, offset, length in ranges:
            buffer = bytearray(length)
            with open(directory / relative_path, "rb", buffering=0) as f:
                f.seek(offset)
                f.readinto(buffer)
            buffers.append(buffer)
        return buffers

    def read_and_write():  # the least any exporter does: read the bytes, write them to one new file, fsync it
        buffers = read_ranges()
        with open(output / "copy.bin", "wb") as f:
            for buffer in buffers:
                f.write(buffer)
            f.flush()
            os.fsync(f.fileno())
        return buffers

    output.mkdir(parents=True, exist_ok=True)
    with peak_rss() as peak:
        cpu = time.process_time()
        seconds, buffers = timed(read_ranges if variant == "raw_read" else read_and_write)
        cpu = time.process_time() - cpu
    shutil.rmtree(output)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss": peak[0],
        "bytes": sum(len(b) for b in buffers),
        "phases": phases,
    }


def run(reps: int, ratios: list[int], scratch: Path, log, adapter: Geometry = ADAPTER) -> list[dict]:
    from tests.support.multiprocess import run_ranks

    checkpoints = {}
    for ratio in ratios:
        geometry = with_base(adapter, ratio)
        save_dir = scratch / f"offline_{ratio}x"
        shutil.rmtree(save_dir, ignore_errors=True)
        save_dir.mkdir(parents=True)
        seconds, _ = timed(run_ranks, _write_checkpoint, 2, geometry, str(save_dir), timeout=3600)
        directory = save_dir / f"iter_{ITERATION:07d}"
        checkpoints[ratio] = (geometry, directory)
        log(
            f"offline: wrote the {ratio}x checkpoint ({directory_bytes(directory) / 1e9:.2f} GB on disk, vocab "
            f"{geometry.model.vocab_size}) in {seconds:.1f} s"
        )
    samples = {(ratio, v): [] for ratio in ratios for v in VARIANTS}
    order = [(ratio, v) for ratio in ratios for v in VARIANTS]
    for rep in range(reps):
        for ratio, variant in rotated(order, rep):
            geometry, directory = checkpoints[ratio]
            result = run_alone(_measure, variant, str(directory), str(scratch / "offline_out"), timeout=3600)
            samples[(ratio, variant)].append(result)
        log(f"offline: rep {rep + 1}/{reps} done")
    rows = []
    for ratio in ratios:
        geometry, directory = checkpoints[ratio]
        ranges = _adapter_ranges(directory)
        row = {
            "ratio": ratio,
            "adapter_bytes": geometry.adapter_bytes,
            "base_bytes": geometry.base_bytes,
            "checkpoint_bytes": directory_bytes(directory),
            "vocab": geometry.model.vocab_size,
            "layers": geometry.layers,
            "lora_rank": geometry.rank,
            "adapter_tensors": 8 * geometry.layers,
            "stored_items": len(ranges),
            "stored_adapter_bytes": sum(n for _, _, n in ranges),
        }
        for variant in VARIANTS:
            results = samples[(ratio, variant)]
            row[variant] = {
                "seconds": median([r["seconds"] for r in results]),
                "samples": [r["seconds"] for r in results],
                "peak_rss": median([r["peak_rss"] for r in results]),
                "bytes": results[0]["bytes"],
            }
        row["export"]["reading_seconds"] = median([r["phases"]["reading"] for r in samples[(ratio, "export")]])
        row["export"]["sha256"] = sorted({r["sha256"] for r in samples[(ratio, "export")]})
        row["export_over_raw_read"] = row["export"]["seconds"] / row["raw_read"]["seconds"]
        row["export_over_read_write_floor"] = row["export"]["seconds"] / row["read_write_floor"]["seconds"]
        rows.append(row)
        log(
            f"  {ratio}x: export {row['export']['seconds']:.3f} s, full load {row['full_load']['seconds']:.2f} s, "
            f"raw read {row['raw_read']['seconds']:.3f} s"
        )
    first = rows[0]["export"]["seconds"]
    for row in rows:
        row["export_over_smallest"] = row["export"]["seconds"] / first
    digests = {d for row in rows for d in row["export"]["sha256"]}
    if len(digests) != 1:
        raise RuntimeError(f"the exports differ between checkpoints of the same adapter: {sorted(digests)}")
    for ratio in ratios:
        shutil.rmtree(scratch / f"offline_{ratio}x", ignore_errors=True)
    return rows
