"""The synchronous exports of a live model, `export_adapter` and `export_adapters`: collective, on every rank.

A model exported again unchanged is not walked again, nor planned again on the writer: its walk is the one the
training hook's change check keeps current (`host_snapshot.live_snapshots`), and the writer keeps its plan of the same
walks (`export._planned`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import distributed as coll
from .core.options import check_value, find_option
from .export import ExportOptions, run_export
from .host_snapshot import live_snapshots
from .io.atomic_dir import publish
from .multi_adapter import ALL, Selection, run_multi_export


def export_adapter(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    output_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    adapter_name: str = "default",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    model_type: str | None = None,
    group: Any = None,
    allow_nonfinite: bool = False,
    collective_timeout: float | None = None,
    expert_layout: str = "auto",
    pad_rank_to: int | None = None,
) -> Path | None:
    """Write `model`'s adapter as an HF PEFT directory. Collective: call it on every rank.

    `model` is this rank's megatron-core model, a wrapped one (DDP, Float16Module), or its list of
    virtual-pipeline chunks. Rank 0 writes; it returns the directory there and None elsewhere.
    `model_type` picks the HF name map when `base_model_name_or_path` is not a local directory.
    A failure on any rank raises the same ExportError on every rank. `expert_layout` writes MoE experts
    per expert (transformers v4, vLLM) or fused (v5); see ExportOptions. NaN or Inf in the adapter is an
    error (NonFiniteError) unless `allow_nonfinite`. `collective_timeout` (seconds) bounds every wait of the
    gloo group made when the default group is not gloo (a gloo default group keeps its own timeout).
    `pad_rank_to` pads every module to that rank (same outputs, see core/rank_padding); several named
    adapters at once: `export_adapters`.
    """
    if collective_timeout is not None:
        check_value(find_option("collective_timeout"), collective_timeout)
    options = ExportOptions(
        base_model_name_or_path=base_model_name_or_path,
        adapter_name=adapter_name,
        dtype=dtype,
        overwrite=overwrite,
        model_type=model_type,
        expert_layout=expert_layout,
        allow_nonfinite=allow_nonfinite,
        pad_rank_to=pad_rank_to,
    )
    layout = coll.RankLayout.from_megatron()
    group = group if group is not None else coll.export_group(collective_timeout)
    snapshot = live_snapshots(model, layout, options).first  # the model's walk when it is still current
    return run_export(
        snapshot,
        output_dir,
        options,
        layout,
        group,
        finish=lambda tmp: publish(tmp, output_dir, overwrite),
        source="a live Megatron model",
    )


def export_adapters(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    output_dir: str | os.PathLike,
    *,
    adapter_names: Selection = ALL,
    base_model_name_or_path: str | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    model_type: str | None = None,
    pad_rank_to: int | None = None,
    group: Any = None,
    **options: Any,
) -> Path | None:
    """Write several named adapters of `model` in peft's multi-adapter layout. Collective: call it on every rank.

    `adapter_names`: "all" (every enabled adapter; disabled ones are skipped with a warning) or a list.
    The adapter named "default" (else the first listed) goes to the root of `output_dir`, each other one
    to `output_dir/<name>/`, all published at once. Rank 0 returns the directory, the others None.
    The other arguments are `export_adapter`'s; further keyword arguments are ExportOptions fields.
    """
    opts = ExportOptions(
        base_model_name_or_path=base_model_name_or_path,
        dtype=dtype,
        overwrite=overwrite,
        model_type=model_type,
        pad_rank_to=pad_rank_to,
        **options,
    )
    layout = coll.RankLayout.from_megatron()
    group = group if group is not None else coll.export_group()
    snapshots = live_snapshots(model, layout, opts, adapter_names)  # the model's walk when it is still current
    return run_multi_export(
        snapshots,
        output_dir,
        opts,
        layout,
        group,
        finish=lambda tmp: publish(tmp, output_dir, overwrite),
        source="a live Megatron model",
    )
