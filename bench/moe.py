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
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from .common import median, timed

SHAPES = {"48x128": (48, 128), "61x256": (61, 256)}
QUICK_SHAPES = {"4x16": (4, 16), "8x16": (8, 16)}


def _config(layers: int, experts: int):
    from tests.support.tiny_moe import TinyMoEConfig

    return TinyMoEConfig(
        num_layers=layers,
        num_experts=experts,
        hidden_size=8,
        num_attention_heads=1,
        num_query_groups=1,
        kv_channels=8,
        moe_ffn_hidden_size=8,
        ffn_hidden_size=8,
        vocab_size=16,
        seq_length=4,
    )


def build(layers: int, experts: int):
    import torch

    from tests.support import tiny_moe
    from tests.support.tiny_gpt import apply_modelopt_lora

    tiny_moe.init_moe_parallel()
    model = apply_modelopt_lora(
        tiny_moe.build_moe_gpt(_config(layers, experts)), rank=2, targets=tiny_moe.ROUTED_EXPERT_TARGETS
    )
    generator = torch.Generator().manual_seed(3)
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


def _worker(rank, world, layers: int, experts: int, reps: int, scratch: str):
    from torch.overrides import _pop_mode_temporarily

    from .common import return_freed_memory

    return_freed_memory()
    scratch = Path(scratch)
    model = build(layers, experts)
    # The tests' CPU shim (a torch function mode that rewrites "cuda" devices) taxes every torch call; megatron needed
    # it to build the model, a real (GPU) process has no such mode, so the measurements below run without it.
    with _pop_mode_temporarily():
        return _measure(model, scratch, reps)


def _measure(model, scratch: Path, reps: int) -> dict:
    from safetensors.torch import load_file, save_file

    from megatron_peft_export import export_adapter
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook

    from .common import adapter_parameters

    params = adapter_parameters(model)
    out = {"adapter_params": len(params)}
    count = [0]

    def fresh() -> Path:
        count[0] += 1
        return scratch / f"out_{count[0]}"

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
        directory = fresh()
        directory.mkdir()
        seconds, _ = timed(hook.on_checkpoint_saved, count[0], directory, model)
        hook.finalize()
        shutil.rmtree(directory)
        return seconds

    out["hook_first"] = hook_save()
    samples = {k: [] for k in ("floor_write", "per_expert", "floor_write_fused", "fused", "floor_copy", "hook")}
    for _ in range(reps):
        samples["floor_write"].append(timed(floor_write)[0])
        samples["per_expert"].append(timed(warm, "per_expert")[0])
        samples["floor_write_fused"].append(timed(floor_write, "fused")[0])
        samples["fused"].append(timed(warm, "fused")[0])
        samples["floor_copy"].append(timed(lambda: [p.detach().to("cpu", copy=True) for p in params])[0])
        samples["hook"].append(hook_save())
    out.update({k: median(v) for k, v in samples.items()})
    out["samples"] = samples
    return out


def run(reps: int, scratch: Path, log, shapes: dict = SHAPES) -> dict:
    from tests.support.multiprocess import run_ranks

    rows = []
    for label, (layers, experts) in shapes.items():
        directory = scratch / f"moe_{label}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        log(f"moe {label}: {layers} layers x {experts} experts, {reps} reps")
        (row,) = run_ranks(_worker, 1, layers, experts, reps, str(directory), timeout=7200)
        shutil.rmtree(directory, ignore_errors=True)
        row["shape"] = label
        rows.append(row)
        log(
            f"  {row['hf_tensors']} HF tensors: export first {row['export_first']:.2f} s, per_expert "
            f"{row['per_expert']:.2f} s, "
            f"fused {row['fused']:.2f} s, write floor {row['floor_write']:.2f} s; hook first "
            f"{row['hook_first']:.2f} s, "
            f"stall {row['hook']:.3f} s, copy floor {row['floor_copy']:.3f} s"
        )
    slopes = {}
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        for key in ("export_first", "per_expert", "fused", "hook_first", "hook", "floor_write", "floor_copy"):
            slopes[key] = math.log(b[key] / a[key]) / math.log(b["hf_tensors"] / a["hf_tensors"])
    return {"rows": rows, "growth_exponent": slopes}
