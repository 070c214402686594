"""`load_hf_adapter`: fill a Megatron model's adapter parameters from an HF PEFT directory (the reverse direction).

The same planner runs backwards: a placement says which slice of which HF tensor a slice of a local
shard holds, so each rank reads only those slices (safetensors slices are read lazily). The planner works
per expert, so a fused MoE adapter (peft target_parameters) is read whole and re-keyed per expert first.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from . import distributed as coll
from .core import options
from .core.experts import expert_of, unfuse_experts
from .core.patterns import PatternSet
from .core.plan import AdapterPlan, plan_adapter, plan_shard, resolve_target
from .dialects import collect, raise_refusals
from .errors import ExportError, NoAdaptersError, ShapeMismatchError
from .export import Naming, model_chunks, model_geometry, naming
from .io.hf_config import read_hf_config
from .io.peft_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_finite, file_tensors, read_adapter, weights_file
from .targets import check_targets


def _unfused_experts(adapter_dir: Path, config: dict[str, Any], names: Naming) -> dict[str, torch.Tensor] | None:
    """A fused expert adapter's tensors, read whole, with the experts re-keyed per expert; None for other adapters."""
    if not config.get("target_parameters"):
        return None
    tensors = dict(file_tensors(adapter_dir / ADAPTER_WEIGHTS))
    return unfuse_experts(tensors, names.arch, names.geometry.num_experts, config["target_parameters"], config["r"])


def _check_against_file(
    plan: AdapterPlan, config: dict[str, Any], shapes: dict[str, tuple[int, ...]], adapter_dir: Path, names: Naming
) -> None:
    problems = []
    missing, unexpected = sorted(set(plan.shapes) - set(shapes)), sorted(set(shapes) - set(plan.shapes))
    experts = names.geometry.num_experts or 0
    extra = sorted({e for e in (expert_of(names.arch, k) for k in unexpected) if e is not None and e >= experts})
    if extra:
        has = f"{experts} experts (0..{experts - 1})" if experts else "no experts"
        problems.append(
            f"the file adapts experts {extra}, the Megatron model has {has}; load it into a model with the expert "
            f"count of the adapter's base model"
        )
    if missing:
        problems.append(f"the model's adapter needs {len(missing)} tensor(s) the file lacks, e.g. {missing[:3]}")
    if unexpected:
        problems.append(
            f"the file has {len(unexpected)} tensor(s) the model's adapter does not target, e.g. {unexpected[:3]}"
        )
    problems += [
        f"{k}: the model expects shape {plan.shapes[k]}, the file has {shapes[k]}"
        for k in sorted(set(plan.shapes) & set(shapes))
        if plan.shapes[k] != shapes[k]
    ][:5]
    rank_pattern, alpha_pattern = (
        PatternSet(config.get("rank_pattern"), "rank_pattern"),
        PatternSet(config.get("alpha_pattern"), "alpha_pattern"),
    )
    for module, settings in sorted(plan.modules.items()):
        r = rank_pattern.get(module, config.get("r"))
        alpha = alpha_pattern.get(module, config.get("lora_alpha"))
        if r is None or alpha is None:
            problems.append(f"{ADAPTER_CONFIG} lacks r or lora_alpha")
            break
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        if not math.isclose(scale, settings.alpha / settings.r, rel_tol=1e-6):
            problems.append(
                f"{module}: the adapter scales by {scale:g}, the model's adapter by "
                f"{settings.alpha / settings.r:g}; configure the model's LoRA scale to match"
            )
    if bool(config.get("use_dora")) != plan.use_dora:
        problems.append(f"use_dora is {bool(config.get('use_dora'))} in the adapter, {plan.use_dora} in the model")
    if problems:
        raise ShapeMismatchError(f"{adapter_dir} does not fit the model's adapter: " + "; ".join(problems[:8]))


def load_hf_adapter(
    model: Any,
    adapter_dir: str | Path,
    *,
    adapter_name: str = "default",
    model_type: str | None = None,
    base_model_name_or_path: str | None = None,
    group: Any = None,
    allow_nonfinite: bool = False,
) -> None:
    """Fill the LoRA parameters of a model that already has adapters (ModelOpt or Bridge) from an HF PEFT directory.

    Collective: every rank calls it with its model (any TP/PP/VPP/DP layout). A mismatch of targets,
    ranks, scales or shapes, a malformed file, or NaN/Inf values (unless `allow_nonfinite`) raises the
    same error on every rank, before any parameter is written. The keyword options are the schema's
    (`core/options.py`, surface `load_hf_adapter`), checked here before anything is read.
    """
    _check_options(
        adapter_name=adapter_name,
        model_type=model_type,
        base_model_name_or_path=base_model_name_or_path,
        allow_nonfinite=allow_nonfinite,
    )
    adapter_dir = Path(adapter_dir)
    layout = coll.RankLayout.from_megatron()
    group = group if group is not None else coll.export_group()
    error, local, unfused, refused = None, [], None, []
    try:
        chunks = model_chunks(model)
        geometry, vocab = model_geometry(chunks[0])
        found = collect(chunks, adapter_name, layout.tp_rank, layout.tp_size)
        refused = found.refused
        # Every copy is filled; a replicated tensor is planned as TP rank 0's copy.
        local = [
            (dataclasses.replace(s.spec, tp_rank=0) if s.spec.is_replica else s.spec, s.tensor) for s in found.shards
        ]
        # malformed or hostile files, lying headers, contradicting shapes: AdapterFileError
        config, shapes = read_adapter(adapter_dir)
        check_targets(config, shapes, str(adapter_dir))  # a tensor peft would ignore is no adapter to import
        names = naming(model_type, read_hf_config(base_model_name_or_path), geometry)
        unfused = _unfused_experts(adapter_dir, config, names)
        if unfused is not None:
            shapes = {key: tuple(t.shape) for key, t in unfused.items()}
    except ExportError as exc:
        error = exc
    coll.agree(error, group)
    gathered = coll.all_gather(([spec for spec, _ in local], refused), group)
    raise_refusals(
        item for _, rank_refused in gathered for item in rank_refused
    )  # the model would not compute the file's adapter
    specs = _unique(spec for rank_specs, _ in gathered for spec in rank_specs)
    if not specs:
        raise NoAdaptersError(
            f"the model has no adapter named {adapter_name!r} to load {adapter_dir} into; apply the adapter "
            f"(ModelOpt or Bridge) first"
        )
    plan = plan_adapter(specs, names.geometry, names.arch, vocab)
    _check_against_file(plan, config, shapes, adapter_dir, names)
    error, values = None, []
    try:
        values = _read_values(adapter_dir, local, unfused, names, vocab)
        check_finite(
            ((f"{spec.module} {spec.role}", value) for (spec, _), value in zip(local, values)),
            allow=allow_nonfinite,
            remedy="pass allow_nonfinite=True to load it anyway",
        )
        _check_shared(local, values)
    except Exception as exc:  # every rank must reach the agreement below
        error = exc
    coll.agree(error, group)
    with torch.no_grad():
        for (_, tensor), value in zip(local, values):
            tensor.copy_(value)


def _read_values(adapter_dir: Path, local: list, unfused: dict | None, names: Naming, vocab: int | None) -> list:
    """This rank's value of each of its LoRA tensors, read from the file (or the unfused experts) by its plan."""
    with weights_file(adapter_dir / ADAPTER_WEIGHTS) as f:
        read = (lambda key, index: unfused[key][index]) if unfused is not None else f.get_slice
        return [
            _read_shard(
                read,
                spec,
                tensor,
                plan_shard(
                    spec, resolve_target(spec.module, spec.part, names.geometry, names.arch, vocab), names.geometry
                ),
            )
            for spec, tensor in local
        ]


def _check_options(**given: Any) -> None:
    for option in options.options(surface=options.IMPORT):
        options.check_value(option, given[option.name])


def _check_shared(local: list, values: list[torch.Tensor]) -> None:
    """A tensor found for several modules (a Bridge adapter shared by the grouped experts of an EP rank) takes one
    value."""
    first: dict[int, tuple[str, torch.Tensor]] = {}
    for (spec, tensor), value in zip(local, values):
        module, seen = first.setdefault(id(tensor), (spec.module, value))
        if not torch.equal(seen, value):
            raise ShapeMismatchError(
                f"{spec.module} and {module} have different {spec.role} in the adapter, but the model holds one "
                f"for both (a Megatron-Bridge "
                "adapter shared by the experts of an EP rank); load it into per-expert adapters "
                "(share_expert_adapters=False), or make them equal"
            )


def _unique(specs) -> list:
    return list(dict.fromkeys(specs))


def _read_shard(read, spec, tensor: torch.Tensor, placements) -> torch.Tensor:
    """This shard's values, read slice by slice (`read(key, index)`); slices that land on the same local rows must
    agree."""
    value = torch.empty_like(tensor, device="cpu")
    written: dict[tuple[int, int, int], str] = {}
    for p in placements:
        index = [slice(None)] * len(p.shape)
        index[p.dim] = slice(p.dst_start, p.dst_start + p.length)
        data = read(p.key, tuple(index))
        region = (p.dim, p.src_start, p.length)
        target = value.narrow(p.dim, p.src_start, p.length)
        if region in written and not torch.equal(target, data.to(value.dtype)):
            raise ShapeMismatchError(
                f"{p.key} and {written[region]} differ, but the Megatron module {spec.module} holds one tensor for "
                f"both "
                "(a fused linear has one LoRA A); load such adapters into CanonicalLoRA, or make them equal"
            )
        written[region] = p.key
        target.copy_(data)
    return value
