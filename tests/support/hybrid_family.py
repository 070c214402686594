"""The export / offline / import steps of the hybrid family tests (Nemotron-H, Qwen3-Next), written once.

Each step runs on ranks started by `multiprocess.run_ranks`, builds the family's tiny megatron-core model
(tests/support/tiny_hybrid.py, tiny_qwen3_next.py) at a TP x EP layout with dyadic ModelOpt LoRA values, and returns
the whole-model delta of every HF module computed from megatron's own row layout (`megatron_to_hf_deltas`), for
comparison with peft's merged deltas (`assert_deltas_equal`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint_args import recorded_args


def _family(name: str):
    from . import tiny_hybrid, tiny_qwen3_next

    return {
        "nemotron_h": (tiny_hybrid, tiny_hybrid.build_hybrid),
        "qwen3_next": (tiny_qwen3_next, tiny_qwen3_next.build_next),
    }[name]


def _model(family: str, cfg, tp: int, ep: int, targets, seed: int | None):
    from . import tiny_hybrid as th
    from .tiny_gpt import apply_modelopt_lora

    module, build = _family(family)
    th.init_parallel(tp, ep)
    model = apply_modelopt_lora(build(cfg), rank=4, scale=2.0, targets=targets)
    if seed is None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora" in name:
                    param.zero_()
    else:
        th.fill_lora_dyadic(model, seed=seed)
    return model


def _deltas(family: str, model, cfg):
    """Every rank's deltas gathered; on rank 0 the HF modules' whole deltas."""
    import torch.distributed as dist

    from . import tiny_hybrid as th

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, th.local_deltas_by_tp(model))
    return _family(family)[0].megatron_to_hf_deltas(th.tp_shards(gathered), cfg) if dist.get_rank() == 0 else None


def live_export(rank, world, tmp, family: str, cfg, targets, tp: int = 1, ep: int = 1, hf: Any = None):
    """Export live into tmp/adapter against an HF base written from `hf` (default `cfg`); the deltas, or the error."""
    import torch.distributed as dist

    from megatron_peft_export import export_adapter

    model = _model(family, cfg, tp, ep, targets, seed=7)
    if rank == 0:
        _family(family)[0].save_hf_base(hf or cfg, Path(tmp) / "base")
    dist.barrier()
    try:
        export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(Path(tmp) / "base"))
    except Exception as exc:  # the same error on every rank
        return f"{type(exc).__name__}: {exc}"
    return _deltas(family, model, cfg)


def save_torch_dist(rank, world, tmp, family: str, cfg, targets, tp: int = 1, ep: int = 1, **args):
    """The live export's model (same values) saved as Megatron-LM saves it: torch_dist with `args` recorded,
    modelopt_state/."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    from megatron_peft_export.io.checkpoints import TRACKER, iteration_dir

    from .training import _in_process_write_results, _may_fork

    model = _model(family, cfg, tp, ep, targets, seed=7)
    directory = iteration_dir(Path(tmp) / "save", 5)
    directory.mkdir(parents=True, exist_ok=True)
    recorded = recorded_args(
        cfg,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        num_layers=len(cfg.pattern),
        **args,
    )
    _in_process_write_results()
    with _may_fork():
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 5, "args": recorded}, str(directory))
        save_sharded_modelopt_state([model], str(directory))
    if rank == 0:
        (Path(tmp) / "save" / TRACKER).write_text("5")
    dist.barrier()


def moe_args(cfg) -> dict:
    """The MoE sizes Megatron-LM records (its arg names)."""
    return dict(
        num_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
    )


def offline_cli(rank, world, argv):
    import contextlib
    import io

    from megatron_peft_export.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main([*argv, "--quiet"])
    return status, err.getvalue()


def offline_export(tmp: Path) -> None:
    """The offline CLI on tmp/save into tmp/offline; asserts it equals the live export tensor for tensor and moves it
    to tmp/adapter (the live one to tmp/live) for `assert_deltas_equal`."""
    from safetensors.torch import load_file

    from .multiprocess import run_ranks

    argv = ["export", str(tmp / "save"), "--output", str(tmp / "offline"), "--base-model", str(tmp / "base")]
    status, err = run_ranks(offline_cli, 1, argv)[0]
    assert status == 0, err
    live, offline = (load_file(tmp / d / "adapter_model.safetensors") for d in ("adapter", "offline"))
    assert live.keys() == offline.keys() and all(torch.equal(live[k], offline[k]) for k in live)
    (tmp / "adapter").rename(tmp / "live")
    (tmp / "offline").rename(tmp / "adapter")


def import_back(rank, world, tmp, family: str, cfg, targets, tp: int = 1, ep: int = 1):
    """A fresh model at this layout with zero adapters, filled from tmp/adapter: its HF modules' deltas."""
    from megatron_peft_export import load_hf_adapter

    model = _model(family, cfg, tp, ep, targets, seed=None)
    load_hf_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(Path(tmp) / "base"))
    return _deltas(family, model, cfg)


def assert_deltas_equal(family: str, tmp: Path, expected: dict[str, torch.Tensor], count: int) -> None:
    """peft's merged delta of every HF module equals `expected` exactly, and `count` modules changed."""
    found = _family(family)[0].peft_merged_deltas(tmp / "base", tmp / "adapter")
    assert sorted(found) == sorted(expected)
    assert len(expected) == count, sorted(expected)
    for name, delta in expected.items():
        assert torch.equal(found[name], delta), name
