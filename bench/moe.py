"""Live export at real MoE tensor counts: 48 layers x 128 experts (Qwen3-30B-A3B) and 61 x 256 (DeepSeek-V3), tiny
hidden sizes.

ModelOpt LoRA (rank 2) on every routed expert's fc1 and fc2 (SequentialMLP experts), hidden 8: the bytes are small,
so per-tensor and per-module costs show. One rank (world 1), one forked process per size. In that process, each
path is measured against its floor:

- live ``export_adapter`` (first, then warm; per_expert and fused) against ``safetensors.torch.save_file`` of the
  same HF tensors (read back from the written adapter, per layout) plus fsync; the hook exports the default layout;
- the hook: its first save (the walk, on the training thread) and its later saves' stall, against a host copy
  of the same adapter parameters (``p.detach().to("cpu", copy=True)``) of every adapter parameter.

The growth exponent is the log-log slope of each path between the two sizes. ``--quick`` runs 4 x 16 and 8 x 16.
``--only moe_hook`` measures the hook and its copy floor alone (no ``export_adapter``), against adapter parameters.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

from .common import median, timed

SHAPES = {"48x128": (48, 128, 8, 2), "61x256": (61, 256, 8, 2), "4x64 h1024 r64": (4, 64, 1024, 64)}
"""layers, experts, hidden size (= expert ffn size), LoRA rank. The first two: real tensor counts (the growth exponent
is taken between them); the last: real bytes (a 235 MB float32 adapter on 1.6 GB of expert weights)."""
QUICK_SHAPES = {"4x16": (4, 16, 8, 2), "8x16": (8, 16, 8, 2)}


def select(shapes: dict, names: str | None) -> dict:
    """The shapes named in `names` (comma-separated, from SHAPES or QUICK_SHAPES, spaces as _), or `shapes` when
    None."""
    if not names:
        return shapes
    known = {name.replace(" ", "_"): (name, shape) for name, shape in {**SHAPES, **QUICK_SHAPES}.items()}
    return dict(known[name] for name in names.split(","))


def _config(layers: int, experts: int, hidden: int = 8):
    from tests.support.tiny_moe import TinyMoEConfig

    return TinyMoEConfig(
        num_layers=layers,
        num_experts=experts,
        hidden_size=hidden,
        num_attention_heads=1,
        num_query_groups=1,
        kv_channels=hidden,
        moe_ffn_hidden_size=hidden,
        ffn_hidden_size=hidden,
        vocab_size=16,
        seq_length=4,
    )


def build(layers: int, experts: int, *, ep: int = 1, hidden: int = 8, rank: int = 2):
    """This rank's model at expert-parallel size `ep` (its local experts); LoRA values depend on the rank."""
    import torch

    from tests.support import tiny_moe
    from tests.support.tiny_gpt import apply_modelopt_lora

    tiny_moe.init_moe_parallel(ep=ep)
    model = apply_modelopt_lora(
        tiny_moe.build_moe_gpt(_config(layers, experts, hidden)), rank=rank, targets=tiny_moe.ROUTED_EXPERT_TARGETS
    )
    generator = torch.Generator().manual_seed(3 + torch.distributed.get_rank())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.uniform_(-0.05, 0.05, generator=generator)
    return model


def _fsync_dir(directory: Path) -> None:
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _worker(rank, world, shape: tuple, reps: int, scratch: str, hook_only: bool = False):
    from torch.overrides import _pop_mode_temporarily

    from .common import return_freed_memory

    return_freed_memory()
    scratch = Path(scratch)
    layers, experts, hidden, lora_rank = shape
    model = build(layers, experts, hidden=hidden, rank=lora_rank)
    # The tests' CPU shim (a torch function mode that rewrites "cuda" devices) taxes every torch call; megatron needed
    # it to build the model, a real (GPU) process has no such mode, so the measurements below run without it.
    with _pop_mode_temporarily():
        return _measure_hook(model, scratch, reps) if hook_only else _measure(model, scratch, reps)


class _Scratch:
    def __init__(self, scratch: Path) -> None:
        self.scratch, self.count = scratch, 0

    def __call__(self) -> Path:
        self.count += 1
        return self.scratch / f"out_{self.count}"


def _hook_save(hook, model, fresh, cpu: list | None = None) -> float:
    """The training thread's time in one `on_checkpoint_saved` (its CPU time appended to `cpu`); the export is then
    waited for, untimed."""
    from .common import timed_both

    directory = fresh()
    directory.mkdir()
    seconds, thread_cpu, _ = timed_both(hook.on_checkpoint_saved, fresh.count, directory, model)
    if cpu is not None:
        cpu.append(thread_cpu)
    hook.finalize()
    shutil.rmtree(directory)
    return seconds


def _copy_floor(params) -> list:
    """The host-copy floor: a copy of every adapter parameter, with Python's cyclic collector paused as the hook's
    training-thread save pauses it (the copies are 10^5 new objects: collections over the model's would be timed)."""
    from megatron_peft_export.export import paused_collection

    with paused_collection():
        return [p.detach().to("cpu", copy=True) for p in params]


def _measure_hook(model, scratch: Path, reps: int) -> dict:
    """The hook alone: its first save (after `prepare`, and without), and its later saves' stall, against the host-copy
    floor."""
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook

    from .common import adapter_parameters, timed_both

    params = adapter_parameters(model)
    fresh = _Scratch(scratch)
    out = {"adapter_params": len(params), "hf_tensors": len(params)}
    cpu = {"hook_first_prepared": [], "hook_first": [], "hook": [], "floor_copy": []}
    prepared = AdapterExportHook(HookConfig(model_type="mixtral"))
    out["prepare"], _ = timed(prepared.prepare, model)  # the walk, before training
    out["hook_first_prepared"] = _hook_save(prepared, model, fresh, cpu["hook_first_prepared"])
    del prepared
    hook = AdapterExportHook(HookConfig(model_type="mixtral"))
    out["hook_first"] = _hook_save(hook, model, fresh, cpu["hook_first"])
    samples = {"floor_copy": [], "hook": []}
    for _ in range(reps):
        wall, thread_cpu, _ = timed_both(_copy_floor, params)
        samples["floor_copy"].append(wall)
        cpu["floor_copy"].append(thread_cpu)
        samples["hook"].append(_hook_save(hook, model, fresh, cpu["hook"]))
    out.update({k: median(v) for k, v in samples.items()})
    out["cpu"] = {k: median(v) for k, v in cpu.items()}
    out["samples"] = samples
    out["walks"] = hook._snapshots.walks  # 1: the later saves found the model unchanged
    return out


def _measure(model, scratch: Path, reps: int) -> dict:
    from safetensors.torch import load_file, save_file

    from megatron_peft_export import export_adapter
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook

    from .common import adapter_parameters

    params = adapter_parameters(model)
    out = {"adapter_params": len(params)}
    fresh = _Scratch(scratch)

    out["export_first"], first_dir = timed(
        export_adapter, model, fresh(), model_type="mixtral", expert_layout="per_expert"
    )
    tensors = {"per_expert": load_file(first_dir / "adapter_model.safetensors")}
    shutil.rmtree(first_dir)
    fused_dir = export_adapter(model, fresh(), model_type="mixtral", expert_layout="fused")
    tensors["fused"] = load_file(fused_dir / "adapter_model.safetensors")
    shutil.rmtree(fused_dir)
    out["hf_tensors"], out["fused_tensors"] = len(tensors["per_expert"]), len(tensors["fused"])

    def floor_write(layout="per_expert"):
        directory = fresh()
        directory.mkdir()
        save_file(tensors[layout], directory / "adapter_model.safetensors")
        _fsync_dir(directory)
        shutil.rmtree(directory)

    def warm(layout):
        directory = export_adapter(model, fresh(), expert_layout=layout, model_type="mixtral")
        shutil.rmtree(directory)

    hook = AdapterExportHook(HookConfig(model_type="mixtral"))

    def hook_save():
        return _hook_save(hook, model, fresh)

    out["hook_first"] = hook_save()
    samples = {k: [] for k in ("floor_write", "per_expert", "floor_write_fused", "fused", "floor_copy", "hook")}
    cpu = {k: [] for k in ("floor_write", "per_expert", "floor_write_fused", "fused")}

    def both(key, fn, *args):  # wall time, and the process's CPU time (what the call cost on a shared machine)
        started = time.process_time()
        samples[key].append(timed(fn, *args)[0])
        cpu[key].append(time.process_time() - started)

    for _ in range(reps):
        both("floor_write", floor_write)
        both("per_expert", warm, "per_expert")
        both("floor_write_fused", floor_write, "fused")
        both("fused", warm, "fused")
        samples["floor_copy"].append(timed(_copy_floor, params)[0])
        samples["hook"].append(hook_save())
    out.update({k: median(v) for k, v in samples.items()})
    out["cpu"] = {k: median(v) for k, v in cpu.items()}
    out["samples"] = samples
    return out


def _ep2_worker(rank, world, shape: tuple, reps: int, scratch: str):
    """Warm live exports (per_expert) of the shape at EP=`world` (each rank holds experts / world): the median."""
    from torch.overrides import _pop_mode_temporarily

    from megatron_peft_export import export_adapter

    from .common import return_freed_memory

    return_freed_memory()
    layers, experts, hidden, lora_rank = shape
    model = build(layers, experts, ep=world, hidden=hidden, rank=lora_rank)
    samples, cpu = [], []
    with _pop_mode_temporarily():
        for n in range(reps + 1):
            out = Path(scratch) / f"ep_{n}"
            started = time.process_time()
            seconds, _ = timed(export_adapter, model, out, model_type="mixtral", expert_layout="per_expert")
            cpu.append(time.process_time() - started)
            samples.append(seconds)
            if rank == 0:
                shutil.rmtree(out)
    return {"first": samples[0], "warm": median(samples[1:]), "samples": samples, "cpu": median(cpu[1:])}


def _slopes(rows: list[dict]) -> dict:
    """Log-log slope of each path's time against HF tensors between the first and last tensor-count shape."""
    counted = [r for r in rows if SHAPES.get(r["shape"], QUICK_SHAPES.get(r["shape"]))[2] == 8]
    if len(counted) < 2:
        return {}
    a, b = counted[0], counted[-1]
    span = math.log(b["hf_tensors"] / a["hf_tensors"])
    slopes = {}
    for key in ("export_first", "per_expert", "fused", "hook_first", "hook", "floor_write", "floor_copy", "ep2"):
        slopes[key] = math.log(b[key] / a[key]) / span
    for key in ("export", "read_write_floor"):
        if "offline" in a and "offline" in b:
            slopes[f"offline {key}"] = math.log(b["offline"][key] / a["offline"][key]) / span
    return slopes


def run(reps: int, scratch: Path, log, shapes: dict = SHAPES, offline=None, hook_only: bool = False) -> dict:
    """`--only moe`: the live paths per shape; `offline(label, shape, reps, scratch, log)` (moe_offline.run_shape,
    passed in by run.py: that module builds its checkpoints with this one's models) adds the offline export."""
    if hook_only:
        return _run_hook(reps, scratch, log, shapes)
    from tests.support.multiprocess import run_ranks

    rows = []
    for label, shape in shapes.items():
        directory = scratch / f"moe_{label.replace(' ', '_')}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        log(f"moe {label}: {shape[0]} layers x {shape[1]} experts, hidden {shape[2]}, rank {shape[3]}, {reps} reps")
        (row,) = run_ranks(_worker, 1, shape, reps, str(directory), timeout=7200)
        ranks = run_ranks(_ep2_worker, 2, shape, reps, str(directory), timeout=7200)
        ep2 = ranks[0]
        shutil.rmtree(directory, ignore_errors=True)
        row.update(shape=label, ep2=ep2["warm"], ep2_first=ep2["first"], ep2_samples=ep2["samples"])
        row["ep2_over_ep1"] = row["ep2"] / row["per_expert"]
        # CPU time (warm, median) of each EP=2 rank's export: its busiest rank and both together against EP=1's
        row["ep2_cpu_per_rank"] = [r["cpu"] for r in ranks]
        row["ep2_cpu_max_over_ep1"] = max(row["ep2_cpu_per_rank"]) / row["cpu"]["per_expert"]
        row["ep2_cpu_total_over_ep1"] = sum(row["ep2_cpu_per_rank"]) / row["cpu"]["per_expert"]
        log(
            f"  {row['hf_tensors']} HF tensors: export first {row['export_first']:.2f} s, per_expert "
            f"{row['per_expert']:.2f} s (EP=2: {row['ep2']:.2f} s; CPU per rank "
            f"{', '.join(f'{c:.2f}' for c in row['ep2_cpu_per_rank'])} s, EP=1 {row['cpu']['per_expert']:.2f} s), "
            f"fused {row['fused']:.2f} s, write floor {row['floor_write']:.2f} s; hook first "
            f"{row['hook_first']:.2f} s, "
            f"stall {row['hook']:.3f} s, copy floor {row['floor_copy']:.3f} s"
        )
        if offline is not None:
            row["offline"] = offline(label.replace(" ", "_"), shape, reps, scratch, log)
        rows.append(row)
    return {"rows": rows, "growth_exponent": _slopes(rows)}


def _run_hook(reps: int, scratch: Path, log, shapes: dict) -> dict:
    """`--only moe_hook`: the hook alone per shape (prepare, first save with and without it, later stall, copy
    floor), and the growth exponents between the first and last shape."""
    from tests.support.multiprocess import run_ranks

    rows = []
    for label, shape in shapes.items():
        directory = scratch / f"moe_hook_{label.replace(' ', '_')}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        log(f"moe_hook {label}: {shape[0]} layers x {shape[1]} experts, {reps} reps")
        (row,) = run_ranks(_worker, 1, shape, reps, str(directory), True, timeout=7200)
        shutil.rmtree(directory, ignore_errors=True)
        row["shape"] = label
        rows.append(row)
        log(_summary(row))
    slopes = {}
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        for key in ("hook_first", "hook", "floor_copy", "prepare", "hook_first_prepared"):
            slopes[key] = math.log(b[key] / a[key]) / math.log(b["hf_tensors"] / a["hf_tensors"])
    return {"rows": rows, "growth_exponent": slopes}


def _summary(row: dict) -> str:
    prepared = f"; prepare {row['prepare']:.2f} s, then first save {row['hook_first_prepared']:.3f} s"
    return (
        f"  {row['adapter_params']} adapter params: hook first {row['hook_first']:.2f} s, stall {row['hook']:.3f} s, "
        f"copy floor {row['floor_copy']:.3f} s (stall {row['hook'] / row['floor_copy']:.2f}x the floor){prepared}"
    )
