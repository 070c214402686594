"""The planner: shard metadata -> HF placements, and the checks that every HF tensor is filled exactly once."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice, repeat
from operator import add, itemgetter

import torch

from ..errors import DialectError, ExportError, ShapeMismatchError
from .archs import ArchMap, Layout, ModuleMap
from .geometry import GDN_FIELDS, HYBRID_FIELDS, LAYER_SYMBOLS, ModelGeometry
from .peft_names import PEFT_PREFIX, hf_key
from .shards import Placement, ShardSpec, SpecTable, StampedPlacements, spec_column
from .splits import mamba_in_parts, row_blocks

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
OUTPUT_LAYER = "output_layer"


@dataclass(frozen=True)
class Target:
    """The HF modules one Megatron adapter (or CanonicalLoRA part) feeds, with their HF shapes."""

    hf_modules: tuple[str, ...]
    layout: Layout
    in_features: int
    out_features: tuple[int, ...]
    megatron_out: int
    """Rows of the fused Megatron output (padded vocabulary for the output layer)."""


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float


@dataclass
class AdapterPlan:
    """Everything the writer needs: HF tensor shapes, where each shard goes, per-module LoRA settings."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    placements: Sequence[list[Placement]]
    """One list per input spec, in input order; empty for replicas (a StampedPlacements, when the specs were given as
    a SpecTable: each shard's list made when asked for)."""
    modules: dict[str, LoraSettings]
    use_dora: bool
    num_layers: int
    layers_of: dict[str, frozenset[int]] = dataclasses.field(default_factory=dict)
    """Hybrid models: the layers whose HF block has a module of this short name (others: every layer)."""
    renamed_prefix: str = ""
    """A prefix of the HF names that transformers 5 renames when loading (ArchMap.renamed_prefix)."""


_MLA_SHAPES = {
    "linear_q_proj": lambda g: (g.hidden_size, (g.num_attention_heads * g.head_dim,)),
    "linear_q_down_proj": lambda g: (g.hidden_size, (g.q_lora_rank,)),
    "linear_q_up_proj": lambda g: (g.q_lora_rank, (g.num_attention_heads * g.head_dim,)),
    "linear_kv_down_proj": lambda g: (g.hidden_size, (g.kv_lora_rank + g.qk_pos_emb_head_dim,)),
    "linear_kv_up_proj": lambda g: (g.kv_lora_rank, (g.num_attention_heads * (g.qk_head_dim + g.v_head_dim),)),
}
"""(in_features, out_features) of multi-latent attention's linears; a q/k head is `head_dim` = nope + rope wide."""


def _linear_shapes(module: ModuleMap, geometry: ModelGeometry) -> tuple[int, tuple[int, ...]]:
    g = geometry
    kind = module.megatron.rsplit(".", 1)[-1]
    ffn = getattr(g, module.width)
    if module.width != "ffn_hidden_size" and not (g.num_experts and ffn):
        raise ShapeMismatchError(
            f"found adapters on {module.megatron.replace('{e}', '<e>')}, but the model geometry has no experts of "
            f"that kind "
            f"(num_experts {g.num_experts}, {module.width} {ffn}); pass the MoE base model's config or these sizes"
        )
    if kind in _MLA_SHAPES:
        if not g.mla:
            raise ShapeMismatchError(
                f"found adapters on multi-latent attention ({module.megatron}), but the model geometry has no MLA "
                "sizes (kv_lora_rank...); pass the base model's config (deepseek_v3) or a model built with MLA"
            )
        if kind in ("linear_q_down_proj", "linear_q_up_proj") and g.q_lora_rank is None:
            raise ShapeMismatchError(
                f"found adapters on {module.megatron}, but the model geometry has no query latent (q_lora_rank is "
                "unset); pass the base model's config"
            )
        return _MLA_SHAPES[kind](g)
    if kind == "linear_qkv":
        if (module.layout == "qkv_gated") != g.attention_output_gate:
            raise ShapeMismatchError(
                f"the {module.megatron} name map expects attention "
                f"{'with' if module.layout == 'qkv_gated' else 'without'} an output gate, the Megatron model's "
                f"attention_output_gate is {g.attention_output_gate}; pass the model_type of the family the model "
                "was converted from"
            )
        return g.hidden_size, (
            g.num_attention_heads * g.head_dim * (2 if g.attention_output_gate else 1),
            g.num_query_groups * g.head_dim,
            g.num_query_groups * g.head_dim,
        )
    if kind == "linear_proj":
        return g.num_attention_heads * (g.v_head_dim if g.mla else g.head_dim), (g.hidden_size,)
    if kind == "linear_fc1":
        if (module.layout == "gate_up") != g.gated_linear_unit:
            want = "a gated (SwiGLU)" if module.layout == "gate_up" else "a non-gated"
            have = "gated" if g.gated_linear_unit else "non-gated"
            raise ShapeMismatchError(
                f"the architecture name map expects {want} MLP, the Megatron model's linear_fc1 is {have}; "
                "pass the model_type of the family the model was converted from"
            )
        return g.hidden_size, (ffn,) * len(module.hf)
    if kind == "linear_fc2":
        return ffn, (g.hidden_size,)
    if kind in ("in_proj", "out_proj"):
        return _gdn_shapes(kind, g) if module.megatron.startswith("self_attention.") else _mamba_shapes(kind, g)
    if kind == "router":
        if not g.num_experts:
            raise ShapeMismatchError("found a router adapter, but the model geometry has no experts (num_experts)")
        return g.hidden_size, (g.num_experts,)
    raise DialectError(f"no shape rule for Megatron module kind {kind!r}")


def _mamba_shapes(kind: str, g: ModelGeometry) -> tuple[int, tuple[int, ...]]:
    missing = [name for name in HYBRID_FIELDS if getattr(g, name) is None]
    if missing:
        raise ShapeMismatchError(
            f"found adapters on a Mamba mixer's {kind}, but the model geometry has no Mamba sizes "
            f"({', '.join(missing)}); expected a hybrid model (megatron MambaModel, HF nemotron_h) and the base "
            "model's config"
        )
    if kind == "out_proj":
        return g.mamba_d_inner, (g.hidden_size,)
    return g.hidden_size, (sum(mamba_in_parts(g)),)


def _gdn_shapes(kind: str, g: ModelGeometry) -> tuple[int, tuple[int, ...]]:
    missing = [name for name in GDN_FIELDS if getattr(g, name) is None]
    if missing:
        raise ShapeMismatchError(
            f"found adapters on a gated delta-net's {kind}, but the model geometry has no gated delta-net sizes "
            f"({', '.join(missing)}); expected a Qwen3-Next model and the base model's config"
        )
    nk, nv = g.linear_num_key_heads, g.linear_num_value_heads
    if nv % nk:
        raise ShapeMismatchError(
            f"expected linear_num_value_heads ({nv}) to be a multiple of linear_num_key_heads ({nk})"
        )
    v_dim = nv * g.linear_value_head_dim
    if kind == "out_proj":
        return v_dim, (g.hidden_size,)
    return g.hidden_size, (2 * nk * g.linear_key_head_dim + 2 * v_dim, 2 * nv)


def _check_layer_kind(module_path: str, layer: int, module: ModuleMap, geometry: ModelGeometry) -> None:
    """On a hybrid model, a linear must sit in a layer of its kind (a Mamba in_proj in an `M` layer...)."""
    pattern = geometry.layer_pattern
    if pattern is None or not module.layer_symbol or pattern[layer] == module.layer_symbol:
        return
    raise ShapeMismatchError(
        f"{module_path} belongs to a {LAYER_SYMBOLS[module.layer_symbol]} layer, but layer {layer} of the hybrid "
        f"pattern {pattern!r} is {pattern[layer]!r} ({LAYER_SYMBOLS[pattern[layer]]}); pass the base model whose "
        "layer pattern the Megatron model was built with"
    )


@functools.cache
def _expert_pattern(megatron: str) -> re.Pattern:
    """A per-expert module path (`mlp.experts.local_experts.{e}.linear_fc1`) as a pattern capturing the expert, compiled
    once."""
    return re.compile(re.escape(megatron).replace(r"\{e\}", r"(\d+)"))


def _match_module(arch: ArchMap, suffix: str) -> tuple[ModuleMap, int | None] | None:
    """The ModuleMap for a path inside a layer, and the expert index when the map is per expert."""
    for module in arch.modules:
        if "{e}" not in module.megatron:
            if module.megatron == suffix:
                return module, None
            continue
        match = _expert_pattern(module.megatron).fullmatch(suffix)
        if match:
            return module, int(match.group(1))
    return None


def _no_hf_name(module_path: str, arch: ArchMap) -> ShapeMismatchError:
    """The adapter does not fit the model the name map is for."""
    return ShapeMismatchError(
        f"no HF name for Megatron module {module_path!r} in the {arch.name} name map "
        f"(known: {', '.join(m.megatron for m in arch.modules)}, {OUTPUT_LAYER})"
    )


@dataclass(frozen=True)
class _Kind:
    """What a module path inside a layer maps to, whatever the layer: the HF names inside the layer and the shapes."""

    module: ModuleMap
    names: tuple[str, ...]
    layout: Layout
    in_features: int
    out_features: tuple[int, ...]
    megatron_out: int


def _layer_kind(suffix: str, part: str | None, module_path: str, geometry: ModelGeometry, arch: ArchMap) -> _Kind:
    """The part of `resolve_target` that depends on the path inside the layer (and the expert) alone."""
    found = _match_module(arch, suffix)
    if found is None:
        raise _no_hf_name(module_path, arch)
    module, expert = found
    if module.refused:
        raise DialectError(module.refused)
    in_features, outs = _linear_shapes(module, geometry)
    if expert is not None and expert >= geometry.num_experts:
        raise ShapeMismatchError(f"{module_path}: expert {expert} is past the model's {geometry.num_experts} experts")
    names = tuple(name.replace("{e}", str(expert)) for name in module.hf)
    if part is None:
        return _Kind(module, names, module.layout, in_features, outs, sum(outs))
    if part not in module.parts:
        raise DialectError(f"{module_path}: unknown sub-adapter {part!r}; expected one of {module.parts}")
    i = module.parts.index(part)
    return _Kind(module, (names[i],), "plain", in_features, (outs[i],), outs[i])


def _in_layer(kind: _Kind, layer: int, module_path: str, geometry: ModelGeometry, arch: ArchMap) -> Target:
    """`kind` in layer `layer` (checked against the model's layers and, hybrid models, the layer's kind)."""
    if layer >= geometry.num_layers:
        raise ShapeMismatchError(f"{module_path}: layer {layer} is past the model's {geometry.num_layers} layers")
    _check_layer_kind(module_path, layer, kind.module, geometry)
    prefix = arch.layer_prefix.format(i=layer)
    names = tuple(f"{prefix}.{name}" for name in kind.names)
    return Target(names, kind.layout, kind.in_features, kind.out_features, kind.megatron_out)


def resolve_target(
    module_path: str, part: str | None, geometry: ModelGeometry, arch: ArchMap, megatron_vocab: int | None = None
) -> Target:
    """Map a Megatron module path (global layer index) to the HF modules it feeds."""
    if module_path == OUTPUT_LAYER:
        padded = megatron_vocab or geometry.vocab_size
        vocab = geometry.vocab_size or padded
        if part is not None or vocab is None:
            raise DialectError(f"cannot map {module_path} (part {part}); the output layer has one plain adapter")
        return Target((arch.output_layer,), "plain", geometry.hidden_size, (vocab,), padded)
    match = _LAYER_RE.match(module_path)
    if match is None:
        raise _no_hf_name(module_path, arch)
    kind = _layer_kind(match.group(2), part, module_path, geometry, arch)
    return _in_layer(kind, int(match.group(1)), module_path, geometry, arch)


def _check_divides(spec: ShardSpec, target: Target, geometry: ModelGeometry, tp_size: int) -> None:
    units = {
        "qkv": ("query groups", geometry.num_query_groups),
        "gate_up": ("the MLP width", target.out_features[0]),
        "qkv_gated": ("query groups", geometry.num_query_groups),
        "gdn_in": ("gated delta-net key heads", geometry.linear_num_key_heads or 0),
        "mamba_in": ("Mamba heads and groups", math.gcd(geometry.mamba_num_heads or 0, geometry.mamba_num_groups or 0)),
    }
    what, count = units.get(target.layout, ("output rows", target.megatron_out))
    if count % tp_size:
        raise ShapeMismatchError(
            f"{spec.describe()}: {what} ({count}) is not divisible by the tensor-parallel size {tp_size}"
        )


def plan_shard(spec: ShardSpec, target: Target, geometry: ModelGeometry) -> list[Placement]:
    """Where each slice of one shard goes in the HF tensors. Raises on shapes that contradict the geometry."""
    if spec.is_replica:
        return []
    tp_rank, tp_size = (0, 1) if spec.split_dim is None else (spec.tp_rank, spec.tp_size)
    shape = spec.global_shape
    if spec.role == "lora_A":
        if len(shape) != 2 or shape[1] != target.in_features:
            raise ShapeMismatchError(
                f"{spec.describe()}: expected lora_A of global shape (r, {target.in_features}), found {shape}; "
                f"check hidden size, heads and ffn size"
            )
        dim = 0 if spec.split_dim is None else spec.split_dim
        rows = spec.shape[dim]
        return [Placement(hf_key(m, "lora_A"), shape, dim, tp_rank * rows, 0, rows) for m in target.hf_modules]
    want_dims = 2 if spec.role == "lora_B" else 1
    if len(shape) != want_dims or spec.split_dim not in (None, 0):
        raise ShapeMismatchError(
            f"{spec.describe()}: expected a {want_dims}-D {spec.role} split on dim 0 or replicated, found "
            f"split_dim {spec.split_dim}"
        )
    _check_divides(spec, target, geometry, tp_size)
    if shape[0] != target.megatron_out:
        raise ShapeMismatchError(
            f"{spec.describe()}: expected {target.megatron_out} output rows in total "
            f"({' + '.join(map(str, target.out_features))} "
            f"for {', '.join(target.hf_modules)}), found {shape[0]} = {spec.shape[0]} x tp {tp_size}; check heads, "
            f"query groups and ffn size"
        )
    return [
        Placement(hf_key(target.hf_modules[i], spec.role), (target.out_features[i],) + shape[1:], 0, dst, src, rows)
        for i, dst, src, rows in row_blocks(
            target.layout, target.out_features, target.megatron_out, geometry, tp_rank, tp_size
        )
    ]


class _Planner:
    """`resolve_target` then `plan_shard` for many shards: what depends on the module kind, the expert and the shard's
    shape and TP coordinates is computed once per distinct combination (a few hundred at 10^5 MoE shards, which
    differ only in layer and expert), then each shard's placements are stamped out with its layer's HF prefix. A
    shard whose layer does not fit (past the model's layers, or of another kind in a hybrid pattern) and every
    first shard of a combination take the full computation, so errors are never cached: they name the shard."""

    def __init__(self, geometry: ModelGeometry, arch: ArchMap, megatron_vocab: int | None) -> None:
        self._geometry, self._arch, self._vocab = geometry, arch, megatron_vocab
        self._kinds: dict[tuple[str, str | None], _Kind] = {}
        self._stamps: dict[tuple, tuple[str | None, tuple[str, ...], list[tuple]]] = {}
        """Per combination: the kind's layer symbol, its HF names inside the layer, and its placements with each key
        after the layer's prefix (`lora_A.weight` of `mlp.gate_proj`: `mlp.gate_proj.lora_A.weight`)."""
        self._heads: dict[int, str] = {}
        """Layer -> its HF prefix and a dot (`model.layers.3.`)."""

    def plan(self, spec: ShardSpec) -> tuple[tuple[str, ...], list[Placement]]:
        """The HF modules the shard feeds, and its placements."""
        match = _LAYER_RE.match(spec.module)
        if match is None:
            target = resolve_target(spec.module, spec.part, self._geometry, self._arch, self._vocab)
            return target.hf_modules, plan_shard(spec, target, self._geometry)
        at, suffix = match.groups()
        layer = int(at)
        key = (suffix, spec.part, spec.role, spec.shape, spec.split_dim, spec.tp_rank, spec.tp_size)
        stamp = self._stamps.get(key)
        pattern = self._geometry.layer_pattern
        if (
            stamp is None
            or layer >= self._geometry.num_layers  # what `_in_layer` checks of a layer: re-planned, to raise
            or not (pattern is None or not stamp[0] or pattern[layer] == stamp[0])
        ):
            return self._plan(spec, suffix, layer, key if stamp is None else None)
        head = self._heads.get(layer)
        if head is None:
            head = self._heads[layer] = self._arch.layer_prefix.format(i=layer) + "."
        key_head = PEFT_PREFIX + head
        return tuple([head + name for name in stamp[1]]), [
            Placement(key_head + tail, *rest) for tail, *rest in stamp[2]
        ]

    def _plan(
        self, spec: ShardSpec, suffix: str, layer: int, key: tuple | None
    ) -> tuple[tuple[str, ...], list[Placement]]:
        """`resolve_target` and `plan_shard` of a shard in a layer (its kind computed once); with `key`, stamp its
        combination."""
        kind = self._kinds.get((suffix, spec.part))
        if kind is None:
            kind = self._kinds[suffix, spec.part] = _layer_kind(
                suffix, spec.part, spec.module, self._geometry, self._arch
            )
        target = _in_layer(kind, layer, spec.module, self._geometry, self._arch)
        planned = plan_shard(spec, target, self._geometry)
        if key is not None:
            index = {hf_key(m, spec.role): i for i, m in enumerate(target.hf_modules)}
            tail = [hf_key(name, spec.role).removeprefix(PEFT_PREFIX) for name in kind.names]
            slices = [(tail[index[p.key]], p.shape, p.dim, p.dst_start, p.src_start, p.length) for p in planned]
            self._stamps[key] = (kind.module.layer_symbol, kind.names, slices)
        return target.hf_modules, planned


def _check_coverage(
    shapes: dict[str, tuple[int, ...]], first: dict[str, Placement], more: dict[str, list[Placement]]
) -> None:
    """Every HF tensor filled exactly once by its placements: `first[key]`, or all of them `more[key]` when several."""
    problems = []
    for key, shape in shapes.items():
        placements = more.get(key)
        if placements is None:  # the common case: one shard fills the tensor
            p = first[key]
            if p.dst_start == 0 and p.length == shape[p.dim]:
                continue
            placements = [p]
        placements = sorted(placements, key=lambda p: p.dst_start)
        dims = {p.dim for p in placements}
        if len(dims) != 1:
            problems.append(f"{key}: shards split along different dims {sorted(dims)}")
            continue
        covered = 0
        for p in placements:
            if p.dst_start != covered:
                what = "overlap" if p.dst_start < covered else "gap"
                problems.append(f"{key}: {what} at index {min(p.dst_start, covered)} of dim {p.dim}")
                break
            covered += p.length
        else:
            if covered != shape[placements[0].dim]:
                problems.append(
                    f"{key}: filled {covered} of {shape[placements[0].dim]} along dim {placements[0].dim} (shards "
                    f"missing)"
                )
    if problems:
        raise ShapeMismatchError(
            "the adapter shards do not tile the HF tensors exactly once: " + "; ".join(problems[:10])
        )


def plan_adapter(
    specs: Sequence[ShardSpec], geometry: ModelGeometry, arch: ArchMap, megatron_vocab: int | None = None
) -> AdapterPlan:
    """Plan every shard of every rank, then check the whole: coverage, ranks, alphas, DoRA everywhere or nowhere.

    Planned in bulk (`_plan_in_bulk`: per combination of module kind and shard shape, then arrays of keys); whatever
    that path does not accept as whole and consistent is planned shard by shard (`_plan_each`), which names what is
    wrong."""
    bulk = _plan_in_bulk(specs, geometry, arch, megatron_vocab)
    if bulk is None:
        placements, shapes, dtypes, alphas = _plan_each(specs, geometry, arch, megatron_vocab)
        modules = _module_settings(shapes, alphas)
    else:
        placements, shapes, dtypes, first_alpha, use_dora, ranks = bulk
        modules = _one_setting(first_alpha, ranks) or _module_settings_in_bulk(shapes, first_alpha)
    use_dora = any(k.endswith("lora_magnitude_vector") for k in shapes) if bulk is None else use_dora
    if use_dora:
        missing = [m for m in modules if hf_key(m, "magnitude") not in shapes]
        if missing:
            raise DialectError(
                f"DoRA magnitude found for some modules but not for {', '.join(missing[:5])}; expected it on every "
                f"adapted module"
            )
    return AdapterPlan(
        shapes,
        dtypes,
        placements,
        modules,
        use_dora,
        geometry.num_layers,
        _layers_of(arch, geometry),
        arch.renamed_prefix,
    )


def _plan_each(
    specs: Sequence[ShardSpec], geometry: ModelGeometry, arch: ArchMap, megatron_vocab: int | None
) -> tuple[list[list[Placement]], dict[str, tuple[int, ...]], dict[str, str], dict[str, set[float]]]:
    """Shard by shard: the placements, shapes, dtypes and each HF module's alphas, raising every shard that does not
    fit and every tensor not filled exactly once."""
    errors: list[str] = []
    kind: type[ExportError] = DialectError  # ShapeMismatchError once any error is one
    placements: list[list[Placement]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    first: dict[str, Placement] = {}  # each key's first placement; all of them in `more` when it has several
    more: dict[str, list[Placement]] = {}
    alphas: dict[str, set[float]] = defaultdict(set)
    planner = _Planner(geometry, arch, megatron_vocab)
    for spec in specs:
        try:
            hf_modules, planned = planner.plan(spec)
        # collected, so one error names every tensor that does not fit
        except (ShapeMismatchError, DialectError) as exc:
            kind = ShapeMismatchError if isinstance(exc, ShapeMismatchError) else kind
            if str(exc) not in errors:
                errors.append(str(exc))
            placements.append([])
            continue
        placements.append(planned)
        for p in planned:
            if shapes.setdefault(p.key, p.shape) != p.shape:
                kind = ShapeMismatchError
                errors.append(f"{p.key}: shards disagree on the global shape ({shapes[p.key]} vs {p.shape})")
            dtypes.setdefault(p.key, spec.dtype)
            if p.key in first:
                more.setdefault(p.key, [first[p.key]]).append(p)
            else:
                first[p.key] = p
        for m in hf_modules:
            alphas[m].add(spec.alpha)
    if errors:
        raise kind(f"{len(errors)} adapter tensor(s) do not fit the model: " + " | ".join(errors[:10]), found=errors)
    _check_coverage(shapes, first, more)
    return placements, shapes, dtypes, alphas


_LAYER_LINES = re.compile(r"^(?:decoder\.layers\.(\d+)\.(.+)|.*)$", re.MULTILINE)
"""`_LAYER_RE` on each line of modules joined by newlines (a line it does not match gives two empty groups)."""


def _layers_and_suffixes(modules: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Of the modules `_LAYER_RE` matches: each one's layer and its path inside the layer. One search over the
    modules joined by newlines (10^4 distinct modules in an MoE adapter: a match object each cost twice as much), when
    none is empty or holds a newline (where `$` and `^` would read lines otherwise); else one match per module."""
    joined = "\n".join(modules)
    found = _LAYER_LINES.findall(joined) if all(modules) and joined.count("\n") == len(modules) - 1 else None
    if found is None or len(found) != len(modules):
        matches = dict(zip(modules, map(_LAYER_RE.match, modules)))
        layer_of = {m: int(match.group(1)) for m, match in matches.items() if match is not None}
        return layer_of, {m: match.group(2) for m, match in matches.items() if match is not None}
    layers = list(map(itemgetter(0), found))
    if all(layers):
        return dict(zip(modules, map(int, layers))), dict(zip(modules, map(itemgetter(1), found)))
    inside = [(m, at, rest) for m, (at, rest) in zip(modules, found) if at]
    return {m: int(at) for m, at, _ in inside}, {m: rest for m, _, rest in inside}


_SPEC_COLUMNS = ("part", "role", "shape", "split_dim", "tp_rank", "tp_size")
"""What a shard's placements depend on besides its module (whose layer is taken out: `_Planner`'s combination)."""


def _plan_in_bulk(
    specs: Sequence[ShardSpec], geometry: ModelGeometry, arch: ArchMap, megatron_vocab: int | None
) -> tuple[list[list[Placement]], dict[str, tuple[int, ...]], dict[str, str], dict[str, float], bool, dict] | None:
    """`_plan_each`'s placements, shapes and dtypes and each HF module's one alpha (and whether DoRA magnitudes are
    there), computed per combination (`_Planner`: module kind, part, role, shard shape, TP coordinates; a few hundred
    for 10^5 MoE shards) and stamped out per layer on arrays of keys. None, for `_plan_each` to name the problem, when
    a shard does not fit (a combination's first shard raises, or a layer is past the model's or of another kind), a
    tensor is not filled exactly once, its shards disagree on shape or dtype, or a module has several alphas; the
    checks are `_plan_each`'s, done once per distinct form."""
    planner = _Planner(geometry, arch, megatron_vocab)
    modules = spec_column(specs, "module")
    distinct = list(dict.fromkeys(modules))  # each module once (lora_A and lora_B share it)
    layer_of, suffix_of = _layers_and_suffixes(distinct)
    groups: dict[tuple, list[int]] = defaultdict(list)
    # each shard's combination as `_Planner` keys it, made as one tuple per shard from a pass per column
    combinations = zip(map(suffix_of.get, modules), *(spec_column(specs, name) for name in _SPEC_COLUMNS))
    for n, combination in enumerate(combinations):
        groups[combination].append(n)
    singles = [n for key in list(groups) if key[0] is None for n in groups.pop(key)]  # outside the layers
    alphas = spec_column(specs, "alpha")
    one_alpha = _one_alpha(alphas)
    hf_modules: list = [None] * len(specs)  # each shard's HF modules, when alphas differ (`_first_alphas`)
    first_alpha: dict[str, float] = {}  # each HF module's alpha, when there is one (`one_alpha`)
    heads = {layer: arch.layer_prefix.format(i=layer) + "." for layer in set(layer_of.values())}
    key_heads = {module: PEFT_PREFIX + heads[layer] for module, layer in layer_of.items()}
    named: dict[tuple[str, ...], list[int]] = {}  # HF names in a layer -> the layers of the last shards naming them
    pattern, num_layers = geometry.layer_pattern, geometry.num_layers
    dora = False
    forms: set[tuple] = set()  # every placement but its key (shape, dim, destination, source, length)
    ranks: dict[str, list] = {"lora_A": [set(), 0], "lora_B": [set(), 0]}  # per role: the ranks, the placements
    tails: list[list[str]] = []  # per combination: its placements' keys after the layer's (a shard alone: whole keys)
    rests: list[list[tuple]] = []  # per combination: its placements but their keys
    combination_of: list = [None] * len(specs)  # each shard's index in `tails` and `rests`
    try:
        for n in singles:
            hf_modules[n], placed = planner.plan(specs[n])
            combination_of[n] = len(tails)
            tails.append([p.key for p in placed])
            rests.append([p[1:] for p in placed])
            _count_ranks(ranks, specs[n].role, [p.shape for p in placed], 1)
            first_alpha.update(dict.fromkeys(hf_modules[n], one_alpha))
        for key, positions in groups.items():
            planner.plan(specs[positions[0]])  # the full computation, stamping the combination
            symbol, names, slices = planner._stamps[key]
            layers = list(map(layer_of.__getitem__, map(modules.__getitem__, positions)))
            found = set(layers)
            if max(found) >= num_layers or (
                pattern is not None and symbol and any(pattern[layer] != symbol for layer in found)
            ):
                return None  # `_in_layer` refuses one of them, by name
            deque(map(combination_of.__setitem__, positions, repeat(len(tails))), 0)
            tails.append([tail for tail, *_ in slices])
            rests.append([tuple(rest) for _, *rest in slices])
            _count_ranks(ranks, key[2], [shape for _, shape, *_ in slices], len(positions))
            module_heads = list(map(heads.__getitem__, layers))
            if one_alpha is None:
                for n, found_modules in zip(positions, zip(*[map(add, module_heads, repeat(name)) for name in names])):
                    hf_modules[n] = found_modules
            elif named.get(names) != layers:  # lora_A's and lora_B's combinations name the same modules
                named[names] = layers
                for name in names:
                    first_alpha.update(dict.fromkeys(map(add, module_heads, repeat(name)), one_alpha))
    except (ShapeMismatchError, DialectError):
        return None
    for found in rests:
        forms.update(found)
    dora = any(tail.endswith("lora_magnitude_vector") for found in tails for tail in found)
    # every key and placement made in the shards' order (the order the writer reads them in)
    counts = list(map(len, map(tails.__getitem__, combination_of)))
    spec_heads = map(key_heads.get, modules, repeat(""))  # a shard alone: its keys are whole
    keys = list(
        map(
            add,
            chain.from_iterable(map(repeat, spec_heads, counts)),
            chain.from_iterable(map(tails.__getitem__, combination_of)),
        )
    )
    if isinstance(specs, SpecTable):  # columns in, columns out: Placement objects made where asked for
        placements: Sequence[list[Placement]] = StampedPlacements(keys, counts, combination_of, rests)
        rest_shapes = [[rest[0] for rest in found] for found in rests]
        shapes = dict(zip(keys, chain.from_iterable(map(rest_shapes.__getitem__, combination_of))))
    else:
        made = map(add, zip(keys), chain.from_iterable(map(rests.__getitem__, combination_of)))
        placed = iter(list(map(tuple.__new__, repeat(Placement), made)))
        placements = list(map(list, map(islice, repeat(placed), counts)))
        shapes = dict(zip(keys, map(itemgetter(1), chain.from_iterable(placements))))
    spec_dtypes = spec_column(specs, "dtype")
    if len(set(spec_dtypes)) == 1:
        dtypes = dict.fromkeys(shapes, spec_dtypes[0])
    else:
        dtypes = dict(zip(keys, chain.from_iterable(map(repeat, spec_dtypes, counts))))
    if len(shapes) == len(keys):  # each tensor filled by one placement: it must be the whole tensor
        if not all(dst == 0 and length == shape[dim] for shape, dim, dst, _, length in forms):
            return None
    elif not _tiles(list(chain.from_iterable(placements)), keys, chain.from_iterable(map(repeat, spec_dtypes, counts))):
        return None
    if one_alpha is None:
        first_alpha = _first_alphas(alphas, hf_modules)
        if first_alpha is None:
            return None
    if len(shapes) != len(keys):
        ranks = {}  # several placements per key: counting placements is not counting keys
    return placements, shapes, dtypes, first_alpha, dora, ranks


def _count_ranks(ranks: dict[str, list], role: str, shapes: list[tuple[int, ...]], times: int) -> None:
    """Add the ranks of placements of `role` (lora_A [r, in], lora_B [out, r]) and their number, `times` each."""
    found = ranks.get(role)
    if found is not None:
        found[0].update(shape[0 if role == "lora_A" else 1] for shape in shapes)
        found[1] += len(shapes) * times


def _one_setting(alphas: dict[str, float], ranks: dict[str, list]) -> dict[str, LoraSettings] | None:
    """`_module_settings` when it has nothing to look up: every lora_A and lora_B of one rank, one alpha, and as many
    lora_A and lora_B tensors (one placement each) as modules, so each module has both (a module's keys are its
    own). Else None."""
    if not ranks or len(set(map(id, alphas.values()))) > 1:
        return None
    (a_ranks, a_count), (b_ranks, b_count) = ranks["lora_A"], ranks["lora_B"]
    if len(a_ranks) != 1 or a_ranks != b_ranks or not a_count == b_count == len(alphas):
        return None
    return dict.fromkeys(sorted(alphas), LoraSettings(next(iter(a_ranks)), next(iter(alphas.values()))))


def _one_alpha(alphas: list[float]) -> float | None:
    """The shards' one alpha, when all are equal, of one type and not zero (then which of their objects a module keeps
    makes no difference: `_plan_each` keeps the first shard's)."""
    if alphas and len(set(alphas)) == 1 and len(set(map(type, alphas))) == 1 and alphas[0] != 0:
        return alphas[0]
    return None


def _tiles(flat: list[Placement], keys: list[str], dtypes: Iterable[str]) -> bool:
    """Whether every key's placements agree on shape and dtype and fill its tensor exactly once (`_check_coverage`'s
    rule), checked once per distinct set of placement forms."""
    by_key: dict[str, list[tuple]] = defaultdict(list)
    for key, dtype, p in zip(keys, dtypes, flat):
        by_key[key].append((dtype, *p[1:]))
    for forms in set(map(tuple, by_key.values())):
        if len({(dtype, shape) for dtype, shape, *_ in forms}) != 1 or len({dim for _, _, dim, *_ in forms}) != 1:
            return False
        covered = 0
        for _, _, _, dst, _, length in sorted(forms, key=itemgetter(3)):
            if dst != covered:
                return False
            covered += length
        if covered != forms[0][1][forms[0][2]]:
            return False
    return True


def _first_alphas(alphas: list[float], hf_modules: list[tuple[str, ...]]) -> dict[str, float] | None:
    """Each HF module's alpha (the object of the first shard naming it, as `_plan_each`'s sets keep it), or None when
    a module has several."""
    pairs = list(zip(chain.from_iterable(hf_modules), chain.from_iterable(map(repeat, alphas, map(len, hf_modules)))))
    first = dict(reversed(pairs))
    if len(set(pairs)) != len(first):
        return None
    return first


def _layers_of(arch: ArchMap, geometry: ModelGeometry) -> dict[str, frozenset[int]]:
    """Short HF module name -> the layers of its kind in a hybrid model's pattern (none known: {})."""
    pattern = geometry.layer_pattern
    if pattern is None:
        return {}
    layers: dict[str, set[int]] = defaultdict(set)
    for module in arch.modules:  # a short name of several kinds of layer (Nemotron-H's up_proj: MLP and MoE) is all
        for hf in module.hf if module.layer_symbol else ():
            layers[hf.rsplit(".", 1)[-1]].update(i for i, symbol in enumerate(pattern) if symbol == module.layer_symbol)
    return {name: frozenset(found) for name, found in layers.items()}


def _module_settings(shapes: dict[str, tuple[int, ...]], alphas: dict[str, set[float]]) -> dict[str, LoraSettings]:
    modules: dict[str, LoraSettings] = {}
    settings: dict[tuple[int, int], LoraSettings] = {}  # one (immutable) LoraSettings per r and alpha object (by id:
    # 8 and 8.0, or 0.0 and -0.0, are equal but not the same value; each object lives on in its settings)
    problems = []
    for module in sorted(alphas):
        a, b = shapes.get(hf_key(module, "lora_A")), shapes.get(hf_key(module, "lora_B"))
        if a is None or b is None:
            problems.append(
                f"{module}: has {'lora_B' if a is None else 'lora_A'} but no {'lora_A' if a is None else 'lora_B'}"
            )
        elif a[0] != b[1]:
            problems.append(f"{module}: lora_A has rank {a[0]}, lora_B has rank {b[1]}")
        elif len(alphas[module]) != 1:
            problems.append(f"{module}: several scales {sorted(alphas[module])}")
        else:
            alpha = next(iter(alphas[module]))
            found = settings.get((a[0], id(alpha)))
            if found is None:
                found = settings[a[0], id(alpha)] = LoraSettings(a[0], alpha)
            modules[module] = found
    if problems:
        raise ShapeMismatchError("inconsistent adapter: " + "; ".join(problems[:10]))
    return modules


def _module_settings_in_bulk(shapes: dict[str, tuple[int, ...]], alphas: dict[str, float]) -> dict[str, LoraSettings]:
    """`_module_settings` of modules with one alpha each, on arrays: each module's lora_A and lora_B looked up and
    their ranks compared in one pass; `_module_settings` names any problem."""
    names = sorted(alphas)
    a = list(map(shapes.get, map(add, map(add, repeat(PEFT_PREFIX), names), repeat(".lora_A.weight"))))
    b = list(map(shapes.get, map(add, map(add, repeat(PEFT_PREFIX), names), repeat(".lora_B.weight"))))
    ranks = list(map(itemgetter(0), a)) if None not in a else None
    if ranks is None or None in b or ranks != list(map(itemgetter(1), b)):
        return _module_settings(shapes, {m: {alpha} for m, alpha in alphas.items()})
    objects = list(map(alphas.__getitem__, names))
    forms = list(zip(ranks, map(id, objects)))  # one (immutable) LoraSettings per r and alpha object, as there
    distinct = dict(zip(forms, zip(ranks, objects)))  # a few forms among 10^5 modules
    settings = {form: LoraSettings(r, alpha) for form, (r, alpha) in distinct.items()}
    return dict(zip(names, map(settings.__getitem__, forms)))


def allocate(plan: AdapterPlan, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Empty HF tensors for a plan, in each tensor's source dtype unless `dtype` overrides it."""
    return {
        key: torch.empty(shape, dtype=dtype or getattr(torch, plan.dtypes[key])) for key, shape in plan.shapes.items()
    }


def placement_views(
    tensors: dict[str, torch.Tensor], placements: list[Placement], shard: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(HF destination, shard source) views of a shard's placements, for one bulk copy (`BulkCopy`); a whole-tensor
    placement is not narrowed."""
    for p in placements:
        dst = tensors[p.key]
        if p.dst_start == 0 and p.src_start == 0 and p.length == dst.shape[p.dim] == shard.shape[p.dim]:
            yield dst, shard
        else:
            yield dst.narrow(p.dim, p.dst_start, p.length), shard.narrow(p.dim, p.src_start, p.length)


class BulkCopy:
    """Copies queued as (destination, source) views and done in few `torch._foreach_copy_` calls (a dtype cast, if
    any, is the copy's only arithmetic). Sources are held until `flush`, which `add` calls once they exceed
    `max_bytes`."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._dst: list[torch.Tensor] = []
        self._src: list[torch.Tensor] = []
        self._bytes = 0
        self._max_bytes = max_bytes

    def add(self, views: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for dst, src in views:
            self._dst.append(dst)
            self._src.append(src)
            self._bytes += src.numel() * src.element_size()
        if self._bytes >= self._max_bytes:
            self.flush()

    def flush(self) -> None:
        dst, src = self._dst, self._src
        self._dst, self._src, self._bytes = [], [], 0
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)


def apply_placements(
    tensors: dict[str, torch.Tensor], placements: list[Placement], shard: torch.Tensor, copies: BulkCopy | None = None
) -> None:
    """Copy a shard's slices into the HF tensors (a dtype cast, if any, is the copy's only arithmetic); with `copies`,
    queue them there for one bulk copy instead."""
    if copies is not None:
        copies.add(placement_views(tensors, placements, shard))
        return
    for p in placements:
        tensors[p.key].narrow(p.dim, p.dst_start, p.length).copy_(shard.narrow(p.dim, p.src_start, p.length))
