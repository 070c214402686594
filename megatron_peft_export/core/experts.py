"""transformers v5's fused expert parameters, as peft (>= 0.19.1) targets them with `target_parameters`.

A layer's experts live in 3-D parameters such as `mlp.experts.gate_up_proj` [experts, 2*ffn, hidden].
peft's LoRA on such a parameter is one lora_A of [experts * r, in], expert-major (rows e*r + j), and
one lora_B of [out, r * experts], rank-major (columns j*experts + e); a 2-D parameter (a router's weight) has
plain [r, in] and [out, r]. Several targeted parameters of
one module nest: the first registered is innermost (`mlp.experts.base_layer.lora_A`), the last is
`mlp.experts.lora_A`. The planner works per expert (transformers v4's and vLLM's layout); this module
re-keys its result into the fused one, and back for import.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import ShapeMismatchError, UnsupportedModelError
from .archs import ArchMap
from .peft_names import PEFT_PREFIX, hf_key
from .plan import AdapterPlan
from .splits import stack_experts, unstack_experts

_LAYER = re.compile(r"^((?:model|backbone)\.layers\.\d+)\.(.+)$")
"""An HF module path: its layer's prefix (`backbone.layers.{i}`: Nemotron-H's checkpoints) and the path inside it."""


def fused_prefixes(arch: ArchMap, targeted: list[str]) -> dict[str, str]:
    """Parameter (inside a layer) -> peft's module path for it, nesting `base_layer` by registration order."""
    prefixes = {}
    by_module = defaultdict(list)
    for fused in arch.fused_experts:
        if fused.parameter in targeted:
            by_module[fused.parameter.rsplit(".", 1)[0]].append(fused.parameter)
    for module, parameters in by_module.items():
        for i, parameter in enumerate(parameters):
            prefixes[parameter] = module + ".base_layer" * (len(parameters) - 1 - i)
    return prefixes


def fuse_experts(
    plan: AdapterPlan, tensors: dict[str, torch.Tensor], arch: ArchMap, num_experts: int
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Per-expert LoRA tensors -> peft's fused target_parameters tensors.

    Returns the tensors and, per targeted parameter, the per-expert HF modules it replaces.
    """
    out = dict(tensors)
    replaced: dict[str, list[str]] = defaultdict(list)
    layers = _fused_layers(plan, arch)
    targeted = sorted(
        {p for params in layers.values() for p in params}, key=[f.parameter for f in arch.fused_experts].index
    )
    prefixes = fused_prefixes(arch, targeted)
    for layer, params in layers.items():
        for fused in (f for f in arch.fused_experts if f.parameter in params):
            count = num_experts if "{e}" in fused.per_expert[0] else 1  # a 2-D parameter is one "expert" to peft
            modules = [[f"{layer}.{m.replace('{e}', str(e))}" for m in fused.per_expert] for e in range(count)]
            missing = next((m for per_expert in modules for m in per_expert if m not in plan.modules), None)
            if missing is not None:
                raise ShapeMismatchError(
                    f"the fused expert layout needs every expert adapted; {missing} has no adapter. "
                    + _per_expert_advice(arch)
                )
            a = [[out.pop(hf_key(m, "lora_A")) for m in per_expert] for per_expert in modules]  # [expert][HF module]
            b = [[out.pop(hf_key(m, "lora_B")) for m in per_expert] for per_expert in modules]
            for per_expert in modules:
                replaced[fused.parameter] += per_expert
            _check_stackable(a, b, modules, f"{layer}.{fused.parameter}", arch)
            module = f"{layer}.{prefixes[fused.parameter]}"
            out[hf_key(module, "lora_A")], out[hf_key(module, "lora_B")] = stack_experts(
                [x[0] for x in a], b, fused.rows
            )
    return out, {p: sorted(replaced[p]) for p in targeted}


def refuse_missing_layout(option: str, arch: ArchMap) -> bool:
    """Whether the family has only the fused layout (then `auto` means fused); refuses `per_expert` for such a family
    with its reason. The export calls this right after planning, before any byte moves."""
    if arch.per_expert and option == "per_expert":
        raise UnsupportedModelError(f"expert_layout='per_expert' is not available for {arch.name}: {arch.per_expert}")
    return bool(arch.per_expert)


def _per_expert_advice(arch: ArchMap) -> str:
    if arch.per_expert:
        return f"The {arch.name} family has no per-expert layout to fall back to: adapt every expert alike"
    return "Export with expert_layout='per_expert'"


def _check_stackable(
    a: list[list[torch.Tensor]], b: list[list[torch.Tensor]], modules: list[list[str]], where: str, arch: ArchMap
):
    """One fused parameter takes one rank and one lora_A per expert (gate and up of one fc1 share it), and lora_B of
    the same shape for every expert."""
    advice = _per_expert_advice(arch)
    ranks = sorted({per_expert[0].shape[0] for per_expert in a})
    first = torch.cat([per_expert[0] for per_expert in a])  # compared for all experts at once
    for j in range(1, len(a[0])):
        if not torch.equal(first, torch.cat([per_expert[j] for per_expert in a])):
            e = next(e for e, per_expert in enumerate(a) if not torch.equal(per_expert[0], per_expert[j]))
            raise ShapeMismatchError(
                f"{modules[e]}: one fused parameter needs one lora_A, found different ones. {advice}"
            )
    if len(ranks) != 1:
        raise ShapeMismatchError(f"{where}: experts have different ranks {ranks}. {advice}")
    rows = [t.shape[0] for t in b[0]]
    for per_expert in b:
        for j, t in enumerate(per_expert):
            if t.shape != (rows[j], ranks[0]):
                raise ShapeMismatchError(
                    f"experts disagree on the shape of lora_B ({list(t.shape)} vs {[rows[j], ranks[0]]}). {advice}"
                )


def unfuse_experts(
    tensors: Mapping[str, torch.Tensor], arch: ArchMap, num_experts: int | None, target_parameters: list[str], r: int
) -> dict[str, torch.Tensor]:
    """The inverse of `fuse_experts`: peft's fused target_parameters tensors -> per-expert LoRA tensors; others pass
    through.

    `r` is the adapter's rank (fused parameters take it); a fused lora_A holds experts x r rows, so a model with
    another expert count is refused here rather than mis-split.
    """
    known = [f.parameter for f in arch.fused_experts]
    unknown = sorted(set(target_parameters) - set(known))
    if unknown:
        raise ShapeMismatchError(
            f"the adapter targets parameters {unknown}, which the {arch.name} name map does not know as fused experts "
            f"(known: {known or 'none'}); pass the model_type of the family the adapter was trained on"
        )
    if not num_experts:
        raise ShapeMismatchError(
            f"the adapter has fused expert LoRA ({', '.join(target_parameters)}), but the Megatron model has no experts"
        )
    prefixes = fused_prefixes(arch, sorted(target_parameters, key=known.index))
    out = dict(tensors)
    for key, a in tensors.items():
        match = (
            _LAYER.match(key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight"))
            if key.endswith(".lora_A.weight")
            else None
        )
        fused = next((f for f in arch.fused_experts if match and prefixes.get(f.parameter) == match.group(2)), None)
        if fused is None:
            continue
        layer, b_key = match.group(1), key.removesuffix("lora_A.weight") + "lora_B.weight"
        b = out.pop(b_key, None)
        if b is None:
            raise ShapeMismatchError(f"{key} has no {b_key}; expected both for a LoRA on {layer}.{fused.parameter}")
        del out[key]
        count = (
            num_experts if "{e}" in fused.per_expert[0] else 1
        )  # a 2-D parameter (a router's weight) is one "expert" to peft
        if a.shape[0] != count * r or b.shape[1] != a.shape[0]:
            held = f"holds {a.shape[0] / r:g} experts" if count > 1 else "is not a rank-r LoRA"
            raise ShapeMismatchError(
                f"{layer}.{fused.parameter}: the adapter {held} (lora_A {list(a.shape)}, lora_B {list(b.shape)}, r "
                f"{r}), "
                f"the Megatron model has {num_experts} experts; load it into a model with the expert count of the "
                f"adapter's base model"
            )
        for e, (a_e, b_e) in enumerate(unstack_experts(a, b, r, len(fused.per_expert), fused.rows)):
            modules = [f"{layer}.{m.replace('{e}', str(e))}" for m in fused.per_expert]
            for module, b_rows in zip(modules, b_e):
                out[hf_key(module, "lora_A")] = a_e
                out[hf_key(module, "lora_B")] = b_rows
    return out


def expert_of(arch: ArchMap, key: str) -> int | None:
    """The expert index in a per-expert HF adapter key of this name map; None for other keys."""
    for module in arch.modules:
        for name in module.hf:
            if "{e}" in name:
                match = re.search(r"\." + re.escape(name).replace(r"\{e\}", r"(\d+)") + r"\.", key)
                if match:
                    return int(match.group(1))
    return None


@dataclass
class FusedLayout:
    """`fuse_experts`' result planned from the per-expert plan's shapes alone: the final tensors' shapes and dtypes (in
    `fuse_experts`' key order), the per-expert modules each fused parameter replaces, and where each per-expert
    tensor's values go in the final tensors. Filling views of the final tensors (`targets`) fills the file's payload
    directly: no per-expert tensors are made and nothing is stacked afterwards."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    replaced: dict[str, list[str]]
    views: dict[str, tuple[str, int, int, int]]
    """Per-expert key -> (fused key, expert, first row, rows): a lora_A is its expert's rows of the fused lora_A (a
    shared one, gate and up: one view twice), a lora_B its rows of the expert's columns of the fused lora_B."""
    experts: dict[str, int]
    """Fused key -> its expert count."""

    _runs: list | None = dataclasses.field(default=None, repr=False, compare=False)
    """`views` grouped per fused key and rows (the per-expert keys and their experts), made by the first `targets`."""

    def targets(self, written: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-expert plan's tensors as views of the final `written` ones (every plan key, nothing copied): per
        fused tensor and rows, every expert's view is made by one `unbind` (a lora_A as [experts, r, in], expert e's
        rows at [e]; a lora_B's rows as [experts, rows, r], expert e's columns at [e])."""
        if self._runs is None:
            runs: dict[tuple[str, int, int], tuple[list[str], list[int]]] = {}
            for key, (fused, e, start, rows) in self.views.items():
                keys, experts = runs.setdefault((fused, start, rows), ([], []))
                keys.append(key)
                experts.append(e)
            self._runs = [(*form, keys, experts) for form, (keys, experts) in runs.items()]
        out = {key: t for key, t in written.items() if key not in self.experts}
        for fused, start, rows, keys, experts in self._runs:
            shape, dim = self.stacking(fused)
            stacked = written[fused].view(shape)
            if dim == 0:
                views = stacked.unbind(0)
            else:  # rank-major columns: expert e's [rows, r] at [e] of [experts, out, r]
                views = stacked[start : start + rows].permute(2, 0, 1).unbind(0)
            out.update(zip(keys, map(views.__getitem__, experts)))
        return out

    def stacking(self, key: str) -> tuple[tuple[int, int, int], int]:
        """The fused tensor `key` as its experts' per-expert tensors stacked (peft's layout): the 3-D shape it is
        viewed as and the expert dim. A lora_A [experts * r, in] is expert-major, [experts, r, in] (dim 0); a lora_B
        [out, r * experts] is rank-major, [out, r, experts] (dim 2)."""
        count, (rows, cols) = self.experts[key], self.shapes[key]
        if key.endswith(".lora_A.weight"):
            return (count, rows // count, cols), 0
        return (rows, cols // count, count), 2


def _fused_layers(plan: AdapterPlan, arch: ArchMap) -> dict[str, set[str]]:
    """Layer prefix -> the fused parameters whose first per-expert module has an adapter there."""
    layers: dict[str, set[str]] = defaultdict(set)
    for fused in arch.fused_experts:
        first = fused.per_expert[0].replace("{e}", "0")
        for module in plan.modules:
            match = _LAYER.match(module)
            if match and match.group(2) == first:
                layers[match.group(1)].add(fused.parameter)
    return layers


def _sources(plan: AdapterPlan, keys: set[str]) -> dict[str, tuple]:
    """HF key (of `keys`) -> the shard slices that fill it (spec index, dim, destination, source, length), sorted."""
    found: dict[str, list] = defaultdict(list)
    for n, placements in enumerate(plan.placements):
        for p in placements:
            if p.key in keys:
                found[p.key].append((n, p.dim, p.dst_start, p.src_start, p.length))
    return {key: tuple(sorted(slices)) for key, slices in found.items()}


def _shared_a_keys(plan: AdapterPlan, arch: ArchMap) -> set[str]:
    """The lora_A keys of per-expert modules that share one fused parameter with another module (gate and up)."""
    names = [m for f in arch.fused_experts if len(f.per_expert) > 1 for m in f.per_expert]
    if not names:
        return set()
    suffixes = tuple("." + name.split("{e}")[-1].lstrip(".") + ".lora_A.weight" for name in names)
    return {key for key in plan.shapes if key.endswith(suffixes)}


def fused_layout(plan: AdapterPlan, arch: ArchMap, num_experts: int) -> FusedLayout | None:
    """The fused layout of `plan` by placement, or None when it is not the plain case (interleaved gate/up rows, an
    expert without adapter, ranks or lora_B shapes that differ between experts, a fused parameter's modules whose
    lora_A are not one shard slice, mixed dtypes): `fuse_experts` on the per-expert tensors then decides, and names
    what is wrong."""
    layers = _fused_layers(plan, arch)
    targeted = sorted({p for ps in layers.values() for p in ps}, key=[f.parameter for f in arch.fused_experts].index)
    prefixes, sources = fused_prefixes(arch, targeted), _sources(plan, _shared_a_keys(plan, arch))
    shapes, dtypes = dict(plan.shapes), dict(plan.dtypes)
    layout = FusedLayout(shapes, dtypes, {p: [] for p in targeted}, {}, {})
    for layer, params in layers.items():
        for fused in (f for f in arch.fused_experts if f.parameter in params):
            if fused.rows != "blocks":  # interleaved rows (GPT-OSS): fuse_experts places them row by row
                return None
            count = num_experts if "{e}" in fused.per_expert[0] else 1  # a 2-D parameter is one "expert" to peft
            modules = [[f"{layer}.{m.replace('{e}', str(e))}" for m in fused.per_expert] for e in range(count)]
            if any(m not in plan.modules for per_expert in modules for m in per_expert):
                return None
            a = [[hf_key(m, "lora_A") for m in per_expert] for per_expert in modules]
            b = [[hf_key(m, "lora_B") for m in per_expert] for per_expert in modules]
            if not _stackable(plan, sources, a, b):
                return None
            for per_expert in modules:
                layout.replaced[fused.parameter] += per_expert
            _place(layout, f"{layer}.{prefixes[fused.parameter]}", a, b)
    layout.replaced = {p: sorted(layout.replaced[p]) for p in targeted}
    return layout


def _stackable(plan: AdapterPlan, sources: dict[str, tuple], a: list[list[str]], b: list[list[str]]) -> bool:
    """One rank and one lora_A shard slice per expert (shared by its modules), lora_B of one shape per module, one
    dtype: what `_check_stackable` accepts, decided from the plan."""
    keys = [k for per_expert in a + b for k in per_expert]
    if any(k not in plan.shapes for k in keys) or len({plan.dtypes[k] for k in keys}) != 1:
        return False
    if len({plan.shapes[k] for per_expert in a for k in per_expert}) != 1:
        return False
    r = plan.shapes[a[0][0]][0]
    rows = [plan.shapes[k][0] for k in b[0]]
    if any(plan.shapes[k] != (rows[j], r) for per_expert in b for j, k in enumerate(per_expert)):
        return False
    return all(len({sources.get(k) for k in per_expert}) == 1 for per_expert in a)


def _place(layout: FusedLayout, module: str, a: list[list[str]], b: list[list[str]]) -> None:
    """Replace the per-expert keys `a`, `b` ([expert][HF module]) by the fused lora_A and lora_B of `module`."""
    shapes, dtypes = layout.shapes, layout.dtypes
    (r, features), rows = shapes[a[0][0]], [shapes[k][0] for k in b[0]]
    dtype, count = dtypes[a[0][0]], len(a)
    for key in (k for per_expert in a + b for k in per_expert):
        shapes.pop(key), dtypes.pop(key)
    fused_a, fused_b = hf_key(module, "lora_A"), hf_key(module, "lora_B")
    shapes[fused_a], shapes[fused_b] = (count * r, features), (sum(rows), r * count)
    dtypes[fused_a] = dtypes[fused_b] = dtype
    layout.experts[fused_a] = layout.experts[fused_b] = count
    for e, (per_a, per_b) in enumerate(zip(a, b)):
        for key in per_a:
            layout.views[key] = (fused_a, e, 0, r)
        start = 0
        for key, n in zip(per_b, rows):
            layout.views[key] = (fused_b, e, start, n)
            start += n
