"""`export_checkpoint`: an HF PEFT adapter from a saved Megatron checkpoint, reading adapter bytes only."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import operator
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from ..core.archs import NON_GATED
from ..core.geometry import (
    FAMILY_FIELDS,
    MAX_SIZE,
    OPTIONAL,
    ModelGeometry,
    valid,
)
from ..core.plan import AdapterPlan, BulkCopy, apply_placements, plan_adapter
from ..core.registry import BRIDGE_LORA, MODELOPT, ROW_PARALLEL
from ..core.shards import Placement, StampedPlacements
from ..dialects import name_modules, raise_refusals
from ..dialects.bridge import DORA_BIAS, DORA_ROW_PARALLEL, PARTIAL_OUTPUT
from ..errors import DialectError, NoAdaptersError, ShapeMismatchError
from ..export import ExportOptions, naming, paused_collection, stage_adapter, writes_fused
from ..io import safetensors_out
from ..io.atomic_dir import check_output, discard, publish, staging_dir
from ..io.checkpoints import ITERATION_PLACEHOLDER, iteration_dirs
from ..io.hf_config import parse_dtype, read_hf_config
from ..io.peft_dir import check_finite
from .checkpoint import (
    CheckpointError,
    Segments,
    TorchDistReader,
    checkpoint_format,
    locate,
    modelopt_alpha,
    read_settings,
    row_slabs,
)
from .dcp_metadata import TensorEntry
from .keys import (
    AdapterKey,
    OfflineShard,
    check_shape,
    classify,
    may_classify_all,
    offline_shards,
    specs_of,
    stored_per_rank,
)
from .legacy import LegacyReader, legacy_shard

log = logging.getLogger("megatron_peft_export")


@dataclass(frozen=True, kw_only=True)
class CheckpointFacts:
    """Explicit values for what a checkpoint may not record; each wins over the checkpoint's own."""

    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    head_dim: int | None = None
    ffn_hidden_size: int | None = None
    gated_linear_unit: bool | None = None
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    tp_size: int | None = None
    """Tensor-parallel size the checkpoint was saved at (undoes the save-time gate/up interleave)."""
    etp_size: int | None = None
    """Expert tensor-parallel size of the save (default: tp_size)."""
    lora_alpha: float | None = None
    """HF lora_alpha for every module (ModelOpt: scale * r), when the checkpoint does not record it."""


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    tensors: int
    bytes: int
    seconds: float

    def line(self) -> str:
        return f"wrote {self.path}: {self.tensors} tensors, {self.bytes / 2**20:.2f} MiB in {self.seconds:.2f} s"


# geometry field -> (Megatron-LM args name, Megatron-Bridge run_config model name)
_RECORDED = {
    "num_layers": ("num_layers", "num_layers"),
    "hidden_size": ("hidden_size", "hidden_size"),
    "num_attention_heads": ("num_attention_heads", "num_attention_heads"),
    "num_query_groups": ("num_query_groups", "num_query_groups"),
    "head_dim": ("kv_channels", "kv_channels"),
    "ffn_hidden_size": ("ffn_hidden_size", "ffn_hidden_size"),
    "gated_linear_unit": ("swiglu", "gated_linear_unit"),
    "num_experts": ("num_experts", "num_moe_experts"),
    "moe_ffn_hidden_size": ("moe_ffn_hidden_size", "moe_ffn_hidden_size"),
    "moe_shared_expert_intermediate_size": (
        "moe_shared_expert_intermediate_size",
        "moe_shared_expert_intermediate_size",
    ),
    "tp_size": ("tensor_model_parallel_size", "tensor_model_parallel_size"),
    "etp_size": ("expert_tensor_parallel_size", "expert_tensor_parallel_size"),
}


def _recorded(settings, hf_config: dict | None, facts: CheckpointFacts) -> dict[str, Any]:
    """Each fact from the first source that has it: explicit flags, Megatron-LM args, Bridge run_config, HF config."""
    args, model = settings.args, _section(settings.run_config, "model")
    hf = ModelGeometry.from_hf_config(hf_config).__dict__ if hf_config else {}
    values = {}
    for name in _RECORDED:
        arg_name, bridge_name = _RECORDED[name]
        from_args = getattr(args, arg_name, None)
        if name == "num_query_groups" and args is not None and not getattr(args, "group_query_attention", True):
            from_args = None
        candidates = (
            (_flag(name), getattr(facts, name, None)),
            (f"the checkpoint's args.{arg_name}", from_args),
            (f"run_config.yaml's model.{bridge_name}", model.get(bridge_name)),
            ("the base model's config.json", hf.get(name) if name != "gated_linear_unit" else None),
        )
        source, values[name] = next(((s, v) for s, v in candidates if v is not None), (None, None))
        if values[name] is not None and not _plausible(name, values[name]):
            raise CheckpointError(
                f"{source} gives {name} = {values[name]!r:.40}; expected "
                + ("true or false" if name == "gated_linear_unit" else f"an integer from 1 to {MAX_SIZE}")
                + f". Pass {_flag(name)}"
            )
    values.update(_family_values(settings, model, hf))
    if values["kv_lora_rank"] is not None and values["qk_head_dim"] and values["qk_pos_emb_head_dim"]:
        values["head_dim"] = values["qk_head_dim"] + values["qk_pos_emb_head_dim"]  # MLA: kv_channels is unused
    if values["num_query_groups"] is None:
        values["num_query_groups"] = values["num_attention_heads"]
    if values["head_dim"] is None and values["hidden_size"] and values["num_attention_heads"]:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if values["gated_linear_unit"] is None and hf_config is not None:  # the name map's MLP
        values["gated_linear_unit"] = hf_config.get("model_type") not in NON_GATED
    return values


_ARG_NAMES = {"num_moe_experts": "num_experts"}
"""TransformerConfig names that Megatron-LM's args spell otherwise (the family readers read a TransformerConfig)."""


def _family_values(settings, model: dict, hf: dict) -> dict[str, Any]:
    """The family-only sizes (core/geometry.py's FAMILY_FIELDS) as the checkpoint records them (Megatron-LM's args,
    else Bridge's run_config model section, read like a TransformerConfig), each `fallback` one the HF config's where
    the checkpoint does not give it; all the HF config's when the checkpoint records no layer count."""
    args, recorded = settings.args, [f for f in FAMILY_FIELDS if f.recorded]
    names = {n for f in recorded for n in f.reads}
    if args is not None:
        found = {n: getattr(args, _ARG_NAMES.get(n, n), None) for n in names}
    else:
        found = {n: model.get(n) for n in names}
    if not _plausible("num_layers", found["num_layers"]):
        return {f.name: hf.get(f.name) for f in recorded}
    found["moe_layer_freq"] = 1 if found["moe_layer_freq"] is None else found["moe_layer_freq"]
    try:
        values = {f.name: f.megatron(SimpleNamespace(**found)) for f in recorded}
    except (TypeError, ValueError, ZeroDivisionError, ShapeMismatchError) as exc:
        raise CheckpointError(
            f"the checkpoint's recorded family settings (MoE layers, multi-latent attention, hybrid sizes) are "
            f"malformed ({exc}); expected megatron's moe_layer_freq, MLA and hybrid sizes. Pass --base-model with the "
            "HF base model's directory"
        ) from None
    for f in recorded:
        if f.fallback and values[f.name] is None:
            values[f.name] = hf.get(f.name)
    bad = [f"{n}={v!r:.40}" for n, v in values.items() if not valid(n, v)]
    if bad:
        raise CheckpointError(f"the checkpoint records {', '.join(bad)}; expected positive sizes. Pass --base-model")
    return values


def _plausible(name: str, value: Any) -> bool:
    if name == "gated_linear_unit":
        return isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIZE


def _section(run_config: dict | None, name: str) -> dict:
    """A section of Bridge's run_config.yaml (a mapping), or {} when absent."""
    section = (run_config or {}).get(name)
    if section is not None and not isinstance(section, dict):
        raise CheckpointError(f"run_config.yaml: expected {name} to be a mapping, found {type(section).__name__}")
    return section or {}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _geometry(values: dict[str, Any], vocab: int | None) -> ModelGeometry:
    # attention sinks and window layers are not in Megatron-LM's args: unknown offline (not compared)
    unrecorded = ("vocab_size", "attention_sinks", "window_layers")
    geometry_fields = [f.name for f in fields(ModelGeometry) if f.name not in unrecorded]
    # dense models have no expert sizes, GQA models no MLA sizes, non-hybrid ones no Mamba sizes or layer pattern
    optional = OPTIONAL
    missing = [n for n in geometry_fields if values.get(n) is None and n not in optional]
    if missing:
        raise CheckpointError(
            f"the checkpoint does not record {', '.join(missing)}; pass --base-model with the HF base model's "
            f"directory, or " + ", ".join(_flag(n) for n in missing)
        )
    return ModelGeometry(**{n: values[n] for n in geometry_fields}, vocab_size=vocab)


_BRIDGE_MAMBA_SPLIT = re.compile(r"^(?P<module>.+\.mixer\.in_proj)\.adapter\.linear_out\.weight\.(?:z|x|B|C|dt)$")


def _refuse_split_mamba_keys(shapes: dict[str, tuple[int, ...]], directory: Path) -> None:
    modules = sorted({m["module"] for key in shapes if (m := _BRIDGE_MAMBA_SPLIT.match(key))})
    if modules:
        raise DialectError(
            f"{directory}: nemotron_h: Megatron-Bridge saved the LoRA B of Mamba in_proj split into z, x, B, C and dt "
            f"tensors ({name_modules(modules)}), which the offline export does not read; export this adapter live "
            "(export_adapter or the training hook), or train without LoRA on in_proj"
        )


def _adapter_keys(shapes: dict[str, tuple[int, ...]], adapter_name: str, directory: Path) -> list[AdapterKey]:
    _refuse_split_mamba_keys(shapes, directory)
    found = [k for k in (classify(key) for key in shapes) if k is not None]
    for key in found:
        check_shape(key, shapes[key.key], str(directory))
    if not found:
        raise NoAdaptersError(
            f"{directory}: no adapter tensors among its {len(shapes)} tensors; expected ModelOpt (lora_a_/lora_b_) "
            f"or Megatron-Bridge (.adapter.) keys"
        )
    dialects = {k.dialect for k in found}
    if len(dialects) > 1:
        raise DialectError(f"{directory}: adapters of several dialects ({', '.join(sorted(dialects))}); expected one")
    names = {k.adapter_name for k in found if k.adapter_name is not None}
    if names and adapter_name not in names:
        raise NoAdaptersError(
            f"{directory}: no adapter named {adapter_name!r}; the checkpoint has {sorted(names)}. Pass --adapter-name"
        )
    return [k for k in found if k.adapter_name in (None, adapter_name)]


def _alpha(key: AdapterKey, shapes, settings, facts: CheckpointFacts, adapter_name: str, directory: Path) -> float:
    if facts.lora_alpha is not None:
        return facts.lora_alpha
    if key.dialect == MODELOPT.family:
        a_key = key.key.replace(".lora_b_", ".lora_a_")
        if a_key not in shapes:
            raise CheckpointError(f"{directory}: {key.key} has no LoRA A ({a_key}); is the checkpoint complete?")
        alpha = modelopt_alpha(settings.modelopt_peft or [], adapter_name, key.module, shapes[a_key][-2])
    else:
        alpha = _section(settings.run_config, "peft").get("alpha")
    if alpha is None:
        source = "modelopt_state/" if key.dialect == MODELOPT.family else "run_config.yaml (peft.alpha)"
        raise CheckpointError(
            f"{directory}: the LoRA scale of {key.module} is not recorded (no {source}); pass --lora-alpha"
        )
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        raise CheckpointError(
            f"{directory}: the recorded LoRA alpha of {key.module} is {alpha!r:.40}; expected a finite number. "
            f"Pass --lora-alpha"
        )
    return float(alpha)


def _torch_dist_shards(directory: Path, hf_config, options: ExportOptions, facts: CheckpointFacts):
    reader = TorchDistReader(directory)
    shapes = reader.tensor_shapes()
    as_bytes = sorted(key for key in may_classify_all(reader.byte_keys) if classify(key) is not None)
    if as_bytes:
        raise CheckpointError(
            f"{directory / '.metadata'}: refused, adapter tensor {as_bytes[0]} is declared as pickled bytes "
            f"(BytesStorageMetadata), "
            "not as a tensor; torch.distributed.checkpoint stores tensors as tensors, so the checkpoint is corrupt "
            "or crafted"
        )
    keys = _adapter_keys(shapes, options.adapter_name, directory)
    reader.check_stored([k.key for k in keys])
    settings = read_settings(directory)
    values = _recorded(settings, hf_config, facts)
    names = naming(options.model_type, hf_config, _geometry(values, None))
    experts = names.geometry.num_experts
    needs_tp = any(stored_per_rank(k, names.geometry.gated_linear_unit) for k in keys)
    needs_tp = needs_tp or any(_row_parallel_dora(k) for k in keys)  # exportable from a TP 1 save only
    if needs_tp and values["tp_size"] is None:
        raise CheckpointError(
            f"{directory}: the tensor-parallel size of the save is not recorded and gate/up rows must be "
            f"de-interleaved with it; pass --tp-size"
        )
    shards: list[OfflineShard] = []
    refused: list[tuple[str, str]] = []
    for key in keys:
        alpha = _alpha(key, shapes, settings, facts, options.adapter_name, directory)
        tp_save = (values["etp_size"] or values["tp_size"]) if key.routed_expert else values["tp_size"]
        found = offline_shards(
            key,
            shapes[key.key],
            alpha=alpha,
            tp_save=tp_save or 1,
            gated=names.geometry.gated_linear_unit,
            dtype=reader.dtype(key.key),
            num_experts=experts,
        )
        refused += _refused_dora(key, found, tp_save or 1, settings)
        if (
            key.dialect == BRIDGE_LORA.family
            and key.routed_expert
            and key.module.endswith("linear_fc2")
            and (tp_save or 1) > 1
        ):
            refused += [
                (PARTIAL_OUTPUT.replace("{size}", str(tp_save)), s.module) for s in found
            ]  # what the live export refuses
        shards += found
    raise_refusals(refused, prefix=f"{directory}: ")
    vocab = (shapes.get("output_layer.weight") or (None,))[0] or _vocab(settings)
    return reader, shards, keys[0].dialect, names, vocab


def _row_parallel_dora(key: AdapterKey) -> bool:
    return (
        key.dialect == BRIDGE_LORA.family
        and key.role == "magnitude"
        and key.module.rsplit(".", 1)[-1] in ROW_PARALLEL  # all a checkpoint says about the base
    )


def _refused_dora(key: AdapterKey, shards: list[OfflineShard], tp_save: int, settings) -> list[tuple[str, str]]:
    """Bridge DoRA that no peft DoRA adapter reproduces (dialects/bridge.py): on row-parallel linears saved at TP > 1,
    and on
    linear_qkv with a bias inside its output (recorded in Bridge's run_config)."""
    if key.dialect != BRIDGE_LORA.family or key.role != "magnitude":
        return []
    model = _section(settings.run_config, "model")
    if _row_parallel_dora(key) and tp_save > 1:
        reason = DORA_ROW_PARALLEL.replace("{size}", str(tp_save))
    elif key.module.endswith("linear_qkv") and (model.get("add_qkv_bias") or model.get("add_bias_linear")):
        reason = DORA_BIAS
    else:
        return []
    return [(reason, s.module) for s in shards]


def _legacy_shards(directory: Path, hf_config, options: ExportOptions, facts: CheckpointFacts):
    reader = LegacyReader(directory)
    settings = reader.settings()
    values = _recorded(settings, hf_config, dataclasses.replace(facts, tp_size=facts.tp_size or reader.tp_size))
    names = naming(options.model_type, hf_config, _geometry(values, None))
    found = reader.adapter_keys(names.geometry.num_layers)
    for key, _, shape, _ in found:
        check_shape(key, shape, str(directory))
    shapes = {key.key: shape for key, _, shape, _ in found}
    keys = _adapter_keys(
        {key.key.split(":", 2)[2]: shape for key, _, shape, _ in found}, options.adapter_name, directory
    )
    wanted = {k.adapter_name for k in keys}
    pairs = [
        (
            key,
            legacy_shard(
                key,
                tp,
                reader.tp_size,
                shape,
                _alpha(key, shapes, settings, facts, options.adapter_name, directory),
                dtype,
            ),
        )
        for key, (tp, _), shape, dtype in found
        if key.adapter_name in wanted
    ]
    raise_refusals(
        (item for key, s in pairs for item in _refused_dora(key, [s], reader.tp_size, settings)),
        prefix=f"{directory}: ",
    )
    shards = [s for _, s in pairs]
    return reader, [s for s in shards if not s.spec.is_replica], keys[0].dialect, names, _vocab(settings)


def _vocab(settings) -> int | None:
    """Megatron-LM's padded vocabulary from the checkpoint's args, when it is a plausible size."""
    vocab = getattr(settings.args, "padded_vocab_size", None)
    return vocab if _plausible("padded_vocab_size", vocab) else None


def export_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    options: ExportOptions = ExportOptions(),
    facts: CheckpointFacts = CheckpointFacts(),
    quiet: bool = False,
) -> ExportSummary:
    """Convert the adapter of one saved checkpoint (an iteration directory, or a save directory via its tracker)."""
    with paused_collection():
        return _export_checkpoint(checkpoint, output_dir, options, facts, quiet)


def _export_checkpoint(
    checkpoint: str | Path, output_dir: str | Path, options: ExportOptions, facts: CheckpointFacts, quiet: bool
) -> ExportSummary:
    started = time.perf_counter()
    directory = locate(checkpoint)
    reading = [(Path(checkpoint), "the checkpoint being read"), *options.inputs()]
    check_output(output_dir, options.overwrite, reading=reading, checkpoint=directory)  # before anything is read
    collect = _torch_dist_shards if checkpoint_format(directory) == "torch_dist" else _legacy_shards
    reader, shards, dialect, names, vocab = collect(
        directory, read_hf_config(options.base_model_name_or_path), options, facts
    )
    plan = plan_adapter(specs_of(shards), names.geometry, names.arch, vocab)
    writes_fused(options.expert_layout, names.arch)
    by_key = _by_key(shards)
    tensors, buffer, where = safetensors_out.allocate_plan_payload(plan, parse_dtype(options.dtype))
    torch_dist = isinstance(reader, TorchDistReader)
    direct = _direct_segments(reader, by_key, shards, plan, tensors, where) if torch_dist else {}
    read_bytes = 0
    copies = BulkCopy(16 << 20)  # queued copies, done together by torch._foreach_copy_ (at every 16 MiB, at the end)
    loaded = reader.load_many(list(by_key), direct=direct, payload=buffer) if direct else reader.load_many(list(by_key))
    if not quiet:  # no bar at all when quiet: a disabled one still makes tqdm's lock (~6 ms, once per process)
        loaded = tqdm(loaded, total=len(by_key), desc=f"reading adapter tensors of {directory.name}", unit="tensor")
    for key, data in loaded:
        if data is None:  # copied into the payload by the reader
            read_bytes += reader.entry(key).nbytes
            continue
        read_bytes += data.numel() * data.element_size()
        for n in by_key[key]:
            apply_placements(tensors, plan.placements[n], _shard_data(data, shards[n]), copies)
    copies.flush()
    # The checkpoint's metadata and shard records are not needed past here: released before the file is written,
    # so the peak memory is the payload and the plan, not those as well (~100 MB at 61x256 experts).
    del reader, shards, by_key, direct
    check_finite(tensors, allow=options.allow_nonfinite)
    tmp = staging_dir(output_dir, options.overwrite, reading=reading, checkpoint=directory)
    try:
        stage_adapter(tmp, plan, tensors, options, names, dialect=dialect, source=f"checkpoint {directory}")
        path = publish(tmp, output_dir, options.overwrite)
    except BaseException:
        discard(tmp)
        raise
    return ExportSummary(path, len(tensors), read_bytes, time.perf_counter() - started)


def _direct_segments(
    reader: TorchDistReader,
    by_key: dict[str, range | list[int]],
    shards: list[OfflineShard],
    plan: AdapterPlan,
    tensors: safetensors_out.Payload,
    where: dict[str, tuple[int, int]],
) -> dict[str, Segments]:
    """Keys whose placements are byte ranges: key -> its Segments (a chunk, start in the chunk's bytes, start in the
    payload, length), for the reader to copy straight into the payload (no tensor per key, shard or placement).

    A key qualifies when its chunks are slabs along its first dimension (each a run of its bytes in C order), every
    placement of its shards is along dim 0 of an HF tensor of its dtype (rows of the same width), so each placement is
    one run of the key's bytes into one run of the payload. The segments are the placements' own copies, so the plan's
    coverage check (every HF row filled exactly once) is what proves every payload byte written. Other keys (a dtype
    cast, chunks split across columns) are placed by `apply_placements` as before."""
    direct = {}
    placements, entries = plan.placements, tensors.entries
    dtypes = set(map(_FIRST, entries.values()))
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    arrays = _stamped_arrays(placements) if isinstance(placements, StampedPlacements) else None
    for key, positions in by_key.items():
        if isinstance(positions, range):
            mine = shards[positions.start : positions.stop]
        else:
            mine = [shards[n] for n in positions]
        if arrays is None:
            placed: Any = _select(placements, positions)
        else:
            placed = _Stamped(placements, np.asarray(positions, dtype=np.int64), arrays)
        slabs = reader.slabs(key)
        segments = (
            None if slabs is None else _key_segments(reader.entry(key), mine, placed, entries, where, dtype, slabs)
        )
        if segments is not None:
            direct[key] = segments
    return direct


class _StampedArrays(NamedTuple):
    """A StampedPlacements' columns as arrays, made once per export: each shard's combination and first key, and
    every combination's placements but their keys as rows (dim, destination start, source start, length), each
    combination's first row and count."""

    combination: np.ndarray
    firsts: np.ndarray
    rows: np.ndarray
    first_row: np.ndarray
    count: np.ndarray


def _stamped_arrays(table: StampedPlacements) -> _StampedArrays:
    count = np.fromiter(map(len, table.rests), dtype=np.int64, count=len(table.rests))
    rows = [(dim, dst, src, length) for found in table.rests for _, dim, dst, src, length in found]
    return _StampedArrays(
        np.array(table.combination_of, dtype=np.int64),
        np.array(table.firsts, dtype=np.int64),
        np.array(rows, dtype=np.int64).reshape(len(rows), 4),
        np.cumsum(count) - count,
        count,
    )


class _Stamped(NamedTuple):
    """The placements of the shards at `positions` of a StampedPlacements (`_key_segments` reads their columns with
    `_columns`, without a Placement object each)."""

    table: StampedPlacements
    positions: np.ndarray
    arrays: _StampedArrays


def _columns(
    placements: list[list[Placement]] | _Stamped,
) -> tuple[list[str], np.ndarray, set[tuple[int, ...]], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shards' placements as columns, in order: their keys, each shard's count of placements, their distinct shapes,
    and their dims, destination starts, source starts and lengths."""
    if not isinstance(placements, _Stamped):
        flat = list(itertools.chain.from_iterable(placements))
        counts = np.fromiter(map(len, placements), dtype=np.int64, count=len(placements))
        if not flat:
            return [], counts, set(), *(np.empty(0, dtype=np.int64) for _ in range(4))
        keys, shapes, *numbers = zip(*flat)
        return list(keys), counts, set(shapes), *(np.array(column, dtype=np.int64) for column in numbers)
    table, positions, arrays = placements
    combination = arrays.combination[positions]
    counts = arrays.count[combination]
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = arrays.rows[np.repeat(arrays.first_row[combination], counts) + within]
    first, last = (int(positions[0]), int(positions[-1])) if len(positions) else (0, -1)
    if last - first + 1 == len(positions) and (np.diff(positions) == 1).all():  # one run: its keys are one slice
        keys = table.keys[table.firsts[first] : table.firsts[last + 1]]
    else:
        keys = list(map(table.keys.__getitem__, (np.repeat(arrays.firsts[positions], counts) + within).tolist()))
    shapes = {rest[0] for c in set(combination.tolist()) for rest in table.rests[c]}
    return keys, counts, shapes, rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]


def _select(
    placements: list[list[Placement]] | _Stamped, indices: range | list[int]
) -> list[list[Placement]] | _Stamped:
    """The placements of the shards at `indices` among those given."""
    if isinstance(placements, _Stamped):
        return placements._replace(positions=placements.positions[indices])
    if isinstance(indices, range):
        return placements[indices.start : indices.stop]
    return [placements[n] for n in indices]


def _by_key(shards: list[OfflineShard]) -> dict[str, range | list[int]]:
    """Each key's shards' positions in `shards`: a range when they are one run of it (as `offline_shards` adds them)."""
    keys = [shard.key for shard in shards]
    cuts = [0, *(n for n in range(1, len(keys)) if keys[n] != keys[n - 1]), len(keys)]
    by_key: dict[str, range | list[int]] = {}
    for lo, hi in zip(cuts, cuts[1:]):
        if hi > lo:
            earlier = by_key.get(keys[lo])
            by_key[keys[lo]] = range(lo, hi) if earlier is None else [*earlier, *range(lo, hi)]
    return by_key


_FIRST = operator.itemgetter(0)
_INDEX, _ROWS = operator.attrgetter("index"), operator.attrgetter("rows")


def _key_segments(
    entry: TensorEntry,
    shards: list[OfflineShard],
    placements: list[list[Placement]] | _Stamped,
    entries,
    where,
    dtype: torch.dtype | None = None,
    slabs: np.ndarray | None = None,
) -> Segments | None:
    """One key's segments (`_direct_segments`) from its shards and their placements (lists, or a stamped plan's as
    columns: `_Stamped`), or None when a placement is not a run of its bytes. `entries` are the HF tensors' (dtype,
    shape), `where` their spans in the payload; `dtype` the dtype every HF tensor has, when they share one (else each
    placement's is looked up); `slabs` the key's chunks as `row_slabs` gives them, when the reader has them
    (`TorchDistReader.slabs`).

    Computed on arrays per form of shard (its stacked axes and row ranges: one or a few per key): every placement's
    runs of the key's bytes (`_form_runs`), then each run's chunk found by its start; a run crossing a chunk's end
    (chunks cut through a shard) is cut at the chunks' bounds."""
    size, itemsize = entry.size, entry.dtype.itemsize
    slabs = row_slabs(entry) if slabs is None else slabs
    if slabs is None:
        return None  # chunks that are not slabs along dim 0
    row_bytes = math.prod(size[1:]) * itemsize
    firsts = slabs[:, 0]
    order = np.argsort(firsts, kind="stable")
    starts = firsts[order] * row_bytes
    ends = starts + slabs[order, 1] * row_bytes
    forms = list(zip(map(len, map(_INDEX, shards)), map(_ROWS, shards)))
    if len(set(forms)) == 1:
        groups = {forms[0]: (shards, placements)}
    else:
        of_form: dict[tuple, list[int]] = {}
        for n, form in enumerate(forms):
            of_form.setdefault(form, []).append(n)
        groups = {form: ([shards[n] for n in found], _select(placements, found)) for form, found in of_form.items()}
    found = [_form_runs(entry, *form, *group, entries, where, dtype) for form, group in groups.items()]
    if any(runs is None for runs in found):
        return None
    src, dst, length = (np.concatenate([runs[n] for runs in found] or [np.empty(0, np.int64)]) for n in range(3))
    k = np.searchsorted(starts, src, side="right") - 1
    if len(k) and k.min() < 0:
        return None  # before the first chunk (chunks cover the key: checked when read)
    inside = length <= ends[k] - src
    segments = [(k[inside], src[inside] - starts[k[inside]], dst[inside], length[inside])]
    for at, to, n, first in zip(*(a[~inside].tolist() for a in (src, dst, length, k))):
        cut = _split(at, to, n, first, starts, ends)
        if cut is None:
            return None
        segments.append(tuple(np.array(column, dtype=np.int64) for column in zip(*cut)))
    chunk, src, dst, length = (np.concatenate([part[n] for part in segments]) for n in range(4))
    return Segments(order[chunk], src, dst, length)


def _form_runs(
    entry: TensorEntry,
    axes: int,
    rows: tuple[tuple[int, int], ...] | None,
    shards: list[OfflineShard],
    placements: list[list[Placement]] | _Stamped,
    entries,
    where,
    dtype: torch.dtype | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The runs of bytes (start in the key's bytes, start in the payload, length) of the placements of shards of one
    form (`axes` stacked axes indexed, `rows` their row ranges, OfflineShard.rows), None when a placement is not rows
    of the shard's width along dim 0 of an HF tensor of the key's dtype."""
    size, itemsize = entry.size, entry.dtype.itemsize
    local = size[axes:]
    if not local:
        return None
    keys, counts, shapes, dims, dst_starts, src_starts, lengths = _columns(placements)
    if not keys:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    width = math.prod(local[1:])
    if dims.any() or any(math.prod(shape[1:]) != width for shape in shapes):
        return None
    if dtype != entry.dtype if dtype is not None else set(map(_FIRST, map(entries.__getitem__, keys))) != {entry.dtype}:
        return None  # a dtype cast
    row = width * itemsize
    at = np.fromiter(map(_FIRST, map(where.__getitem__, keys)), dtype=np.int64, count=len(keys))
    strides = np.array([math.prod(size[d + 1 :]) for d in range(axes)], dtype=np.int64)
    index = np.fromiter(
        itertools.chain.from_iterable(map(_INDEX, shards)), dtype=np.int64, count=len(shards) * axes
    ).reshape(len(shards), axes)
    base = np.repeat(index @ strides * itemsize, counts)
    pieces = np.array(rows or ((0, local[0]),), dtype=np.int64)  # (start, length) of the shard's rows
    piece_at = np.cumsum(pieces[:, 1]) - pieces[:, 1]  # shard row where each piece starts
    first = src_starts[:, None]
    lo = np.maximum(first, piece_at)
    hi = np.minimum(first + lengths[:, None], piece_at + pieces[:, 1])
    keep = lo < hi
    src = base[:, None] + (pieces[:, 0] + lo - piece_at) * row
    dst = (at + dst_starts * row)[:, None] + (lo - first) * row
    return src[keep], dst[keep], ((hi - lo) * row)[keep]


def _split(
    src: int, dst: int, n: int, k: int, starts: np.ndarray, ends: np.ndarray
) -> list[tuple[int, int, int, int]] | None:
    """A run of a key's bytes from chunk k (in order of the chunks' starts) on, cut at the chunks' bounds: (chunk k,
    start in it, start in the payload, length) per part; None when it runs past the last chunk."""
    parts = []
    while n > 0:
        if k >= len(starts):
            return None
        take = min(n, int(ends[k]) - src)
        if take > 0:
            parts.append((k, src - int(starts[k]), dst, take))
            src, dst, n = src + take, dst + take, n - take
        k += 1
    return parts


def _shard_data(data: torch.Tensor, shard: OfflineShard) -> torch.Tensor:
    data = data[shard.index]
    if shard.rows is None:
        return data
    return torch.cat([data.narrow(0, start, length) for start, length in shard.rows])


def backfill(
    save_dir: str | Path,
    *,
    subdir: str = "hf_adapter",
    options: ExportOptions = ExportOptions(),
    facts: CheckpointFacts = CheckpointFacts(),
    quiet: bool = False,
) -> list[ExportSummary]:
    """Export every iteration of a save directory that has no `<iter>/<subdir>` yet, as the training hook would."""
    save_dir = Path(save_dir)
    todo = [d for d in iteration_dirs(save_dir) if not (d / subdir).exists()]
    if not todo and not iteration_dirs(save_dir):
        raise CheckpointError(
            f"{save_dir}: expected a save directory with {ITERATION_PLACEHOLDER} checkpoints, found none"
        )
    summaries = []
    for directory in todo:
        summaries.append(export_checkpoint(directory, directory / subdir, options=options, facts=facts, quiet=quiet))
        if not quiet:
            print(summaries[-1].line())
    return summaries
