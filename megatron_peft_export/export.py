"""`export_adapter`: the collective live export of a Megatron model's adapter to an HF PEFT directory."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import distributed as coll
from .atomic_dir import staging_dir, write_and_publish
from .core.geometry import ModelGeometry
from .core.peft_format import adapter_config, model_card
from .core.plan import AdapterPlan, allocate, apply_placements, plan_adapter
from .core.shards import ShardSpec
from .dialects import LocalShard, collect
from .errors import DialectError, ExportError, NoAdaptersError
from .hf_config import choose_arch, parse_dtype, read_hf_config

log = logging.getLogger("megatron_peft_export")
WRITER = 0


@dataclass
class _Report:
    """What a rank tells the others before any byte moves."""

    error: str | None = None
    dialects: set[str] = field(default_factory=set)
    adapter_names: set[str] = field(default_factory=set)
    specs: list[ShardSpec] = field(default_factory=list)
    geometry: ModelGeometry | None = None
    megatron_vocab: int | None = None
    hf_config: dict[str, Any] | None = None


def _chunks(model: Any) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _megatron_config(chunk: torch.nn.Module) -> tuple[Any, int | None]:
    """The TransformerConfig and padded vocabulary of a (possibly wrapped) megatron-core model."""
    while not hasattr(chunk, "config") and hasattr(chunk, "module"):
        chunk = chunk.module
    if not hasattr(chunk, "config"):
        raise ExportError(f"expected a megatron-core model (with .config), found {type(chunk).__name__}")
    return chunk.config, getattr(chunk, "vocab_size", None)


def _local_report(chunks, layout: coll.RankLayout, adapter_name: str, base: str | None) -> tuple[_Report, list[LocalShard]]:
    report = _Report()
    try:
        config, report.megatron_vocab = _megatron_config(chunks[0])
        report.geometry = ModelGeometry.from_megatron(config)
        found = collect(chunks, adapter_name, layout.tp_rank, layout.tp_size)
        report.dialects, report.adapter_names = found.dialects, found.adapter_names
        # Replicas (other TP ranks' copies, other data-parallel replicas) are never sent.
        shards = [s for s in found.shards if not s.spec.is_replica] if layout.is_data_parallel_source else []
        report.specs = [s.spec for s in shards]
        if layout.rank == WRITER:
            report.hf_config = read_hf_config(base)
    except ExportError as exc:
        report.error = str(exc)
        shards = []
    return report, shards


def _plan(reports: list[_Report], adapter_name: str, model_type: str | None) -> tuple[AdapterPlan, str, list[tuple[int, int, ShardSpec]]]:
    """Identical on every rank (same inputs, pure code), so every rank raises the same error."""
    dialects = set().union(*(r.dialects for r in reports))
    if not dialects:
        raise NoAdaptersError(
            "no adapter tensors found on any rank; expected ModelOpt LoRA (lora_a_<name>/lora_b_<name>) or "
            "Megatron-Bridge LoRA/CanonicalLoRA/DoRA (adapter.linear_in/linear_out). Apply the adapter before exporting."
        )
    if len(dialects) > 1:
        raise DialectError(f"found adapters of several dialects ({', '.join(sorted(dialects))}); expected one per model")
    ordered = [(rank, i, spec) for rank, r in enumerate(reports) for i, spec in enumerate(r.specs)]
    if not ordered:
        names = sorted(set().union(*(r.adapter_names for r in reports)))
        raise NoAdaptersError(f"no adapter named {adapter_name!r}; the model has adapters {names}. Pass adapter_name=")
    first = reports[WRITER]
    arch = choose_arch(model_type, first.hf_config)
    geometry = first.geometry
    if first.hf_config is not None:
        hf = ModelGeometry.from_hf_config(first.hf_config, geometry.gated_linear_unit)
        geometry.check_matches(hf, "the base model's config.json")
        geometry = ModelGeometry(**{**geometry.__dict__, "vocab_size": hf.vocab_size})
    plan = plan_adapter([spec for _, _, spec in ordered], geometry, arch, first.megatron_vocab)
    return plan, dialects.pop(), ordered


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
) -> Path | None:
    """Write `model`'s adapter as an HF PEFT directory. Collective: call it on every rank.

    `model` is this rank's megatron-core model, a wrapped one (DDP, Float16Module), or its list of
    virtual-pipeline chunks. Rank 0 writes; it returns the directory there and None elsewhere.
    `model_type` picks the HF name map when `base_model_name_or_path` is not a local directory.
    A failure on any rank raises the same ExportError on every rank.
    """
    layout = coll.RankLayout.from_megatron()
    group = group if group is not None else coll.export_group()
    out_dtype = parse_dtype(dtype)
    report, shards = _local_report(_chunks(model), layout, adapter_name, base_model_name_or_path)
    reports = coll.all_gather(report, group)
    coll.agree(report.error, group)
    plan, dialect, ordered = _plan(reports, adapter_name, model_type)
    tmp = coll.broadcast_outcome(lambda: staging_dir(output_dir, overwrite), WRITER, group)

    if layout.rank != WRITER:
        for shard in shards:
            coll.send(shard.tensor, WRITER, group)
        coll.broadcast_outcome(lambda: None, WRITER, group)
        return None

    tensors = allocate(plan, out_dtype)
    for n, (rank, i, spec) in enumerate(ordered):
        data = shards[i].tensor.detach().to("cpu") if rank == WRITER else coll.receive(spec.shape, getattr(torch, spec.dtype), rank, group)
        apply_placements(tensors, plan.placements[n], data)
    config = adapter_config(plan, base_model_name_or_path)
    card = model_card(config, dialect=dialect, source="a live Megatron model", num_tensors=len(tensors))
    out = coll.broadcast_outcome(
        lambda: write_and_publish(tmp, output_dir, tensors=tensors, config=config, card=card, overwrite=overwrite), WRITER, group
    )
    log.info("exported %d %s adapter tensors to %s", len(tensors), dialect, out)
    return out
