"""The adapter dialects, declared once: which tensors each adds to a Megatron linear, live and on disk (pure).

A dialect names each adapter tensor by its path under the adapted module (its `leaf`): the live parameter name and
the tail of the checkpoint key are the same string. A leaf holds `{name}` (ModelOpt's adapter name) or `{part}`
(CanonicalLoRA's sub-adapter). Beside the names: how a rank's tensor is split over tensor parallelism (what legacy
per-rank files hold) and how torch_dist stores the rows of a TP-split fused tensor. The live matching (`dialects/`)
and the checkpoint key classification (`offline/keys.py`, `offline/legacy.py`) read these declarations;
tests/core/test_registry.py walks every entry both ways.

Module paths are megatron's global ones (`decoder.layers.<i>.<rest>`, `output_layer`; routed experts
`mlp.experts.local_experts.<e>.<linear>`). A checkpoint key puts routed experts on a global expert axis
(`mlp.experts.experts.<linear>`), and a dialect with `layer_axis` puts every layer on a leading axis
(`decoder.layers.<rest>`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from .shards import Role

StoredRows = Literal["whole", "rank_blocks", "rank_halves"]
"""How torch_dist stores the rows of a tensor saved at TP > 1: as one whole tensor; as the TP ranks' shards one after
another (`[s0; s1; ...]`, e.g. `[g0; u0; g1; u1]` for a gate/up linear_fc1); or each shard's first halves, then
their second halves (`[s0 first half; s1 first half; ...; s0 second half; ...]`)."""

COLUMN_PARALLEL = (
    "linear_qkv",
    "linear_fc1",
    "output_layer",
    "in_proj",
    "linear_q_proj",
    "linear_q_down_proj",
    "linear_q_up_proj",
    "linear_kv_down_proj",
    "linear_kv_up_proj",
)
"""megatron's column-parallel linears (output rows split over TP), by module name (`in_proj`: Mamba mixers and gated
delta-nets). MLA's down projections are column-parallel in megatron's local spec; Transformer Engine's spec builds
them duplicated (TELinear, not split), which the live export reads from the weight's own TP attributes."""
ROW_PARALLEL = ("linear_proj", "linear_fc2", "out_proj")
"""megatron's row-parallel linears (input columns split over TP), by module name."""
RANK_BLOCK_FUSED = ("mixer.in_proj", "self_attention.in_proj")
"""Fused linears whose TP shards, concatenated, are not the TP 1 rows (Mamba in_proj: `[z_0; x_0; ...; z_1; ...]`,
gated delta-net in_proj: `[q_0; k_0; ...; q_1; ...]`); a gated linear_fc1 is one too."""
CANONICAL_PARTS = ("q", "k", "v", "gate", "up")
"""CanonicalLoRA's sub-adapters of the fused linears: one per HF module."""

EXPERTS_LIVE = ".mlp.experts.local_experts.{e}."
"""Where a routed expert's linears are in a module path (global expert index)."""
EXPERTS_SAVED = ".mlp.experts.experts."
"""Where megatron saves routed experts' tensors, on a leading global expert axis (SequentialMLP and grouped alike)."""


@dataclass(frozen=True)
class TensorDecl:
    """One adapter tensor of a dialect on one adapted linear."""

    role: Role
    leaf: str
    """Its path under the adapted module: the live parameter's name and the checkpoint key's tail."""
    column_split: int | None
    """The TP split dim of a rank's tensor when the base linear is column-parallel (None: every rank holds it all)."""
    row_split: int | None
    """The same when the base linear is row-parallel."""
    stored_rows: StoredRows = "whole"
    """How torch_dist stores its rows on a gated linear_fc1 or a Mamba in_proj (`rank_halves`: on the gate and up
    sub-adapters)."""

    def split_dim(self, module: str) -> int | None:
        return self.column_split if module.rsplit(".", 1)[-1] in COLUMN_PARALLEL else self.row_split

    def stored(self, module: str, part: str | None, gated: bool) -> StoredRows:
        """The stored row layout of this tensor on `module` (`part`: the CanonicalLoRA sub-adapter)."""
        if self.stored_rows == "rank_halves":
            return "rank_halves" if part in ("gate", "up") else "whole"
        fused = (gated and module.endswith("linear_fc1")) or module.endswith(RANK_BLOCK_FUSED)
        if self.stored_rows == "rank_blocks" and fused and part is None:
            return "rank_blocks"
        return "whole"


@dataclass(frozen=True)
class Dialect:
    """One adapter implementation: its tensors on an adapted linear and how its checkpoints name them."""

    name: str
    """The variant: modelopt, bridge-lora, bridge-canonical, bridge-dora."""
    family: str
    """What exports report (model card, CLI): `modelopt` or `megatron-bridge`."""
    tensors: tuple[TensorDecl, ...]
    named: bool
    """Adapters carry names (`{name}` in the leaves); else one unnamed adapter per model."""
    layer_axis: bool
    """torch_dist stacks every layer's tensor on a leading layer axis (`decoder.layers.<rest>`)."""
    parts: tuple[str, ...] = ()
    """The sub-adapters (`{part}` in the leaves)."""
    alpha: str = ""
    """Where a live adapter keeps its HF lora_alpha, under the adapted module (`{part}`: per sub-adapter); empty:
    the dialect computes it (ModelOpt: scale * rank)."""

    def leaves(self, name: str | None = None) -> list[tuple[TensorDecl, str, str | None]]:
        """(tensor, its leaf, part) for every tensor of an adapter named `name`, part by part."""
        return [
            (decl, decl.leaf.replace("{part}", part or "").replace("{name}", name or ""), part)
            for part in self.parts or (None,)
            for decl in self.tensors
        ]


MODELOPT = Dialect(
    "modelopt",
    "modelopt",
    (
        TensorDecl("lora_A", "lora_a_{name}.weight", None, 1),
        TensorDecl("lora_B", "lora_b_{name}.weight", 0, None, "rank_blocks"),
    ),
    named=True,
    layer_axis=False,
)
"""NVIDIA ModelOpt PEFT (dialects/modelopt.py)."""

_BRIDGE_A = TensorDecl("lora_A", "adapter.linear_in.weight", 0, 1)
_BRIDGE_B = TensorDecl("lora_B", "adapter.linear_out.weight", 0, 0)
BRIDGE_LORA = Dialect(
    "bridge-lora", "megatron-bridge", (_BRIDGE_A, _BRIDGE_B), named=False, layer_axis=True, alpha="adapter.alpha"
)
"""Megatron-Bridge / NeMo LoRA (dialects/bridge.py)."""
BRIDGE_DORA = Dialect(
    "bridge-dora",
    "megatron-bridge",
    (_BRIDGE_A, _BRIDGE_B, TensorDecl("magnitude", "adapter.weight_magnitude", 0, None, "rank_blocks")),
    named=False,
    layer_axis=True,
    alpha="adapter.alpha",
)
"""Megatron-Bridge DoRA: LoRA plus one magnitude per output row, split like the base's output."""
BRIDGE_CANONICAL = Dialect(
    "bridge-canonical",
    "megatron-bridge",
    (
        TensorDecl("lora_A", "adapter.adapter_{part}.linear_in.weight", 0, 1),
        TensorDecl("lora_B", "adapter.adapter_{part}.linear_out.weight", 0, 0, "rank_halves"),
    ),
    named=False,
    layer_axis=True,
    parts=CANONICAL_PARTS,
    alpha="adapter.adapter_{part}.alpha",
)
"""Megatron-Bridge CanonicalLoRA: one LoRA per HF module of a fused linear."""

DIALECTS: tuple[Dialect, ...] = (MODELOPT, BRIDGE_DORA, BRIDGE_LORA, BRIDGE_CANONICAL)
"""Every dialect; a live module is matched to the first whose tensors it holds (DoRA before the LoRA it extends)."""
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(d.family for d in DIALECTS))


@dataclass(frozen=True)
class KeyMatch:
    """What a checkpoint key says about one adapter tensor."""

    family: str
    module: str
    """The module path with `{i}` for a layer axis and `{e}` for the expert axis."""
    tensor: TensorDecl
    part: str | None
    adapter_name: str | None
    axes: str
    """The leading axes the tensor is stacked on, in order: `i` (layers), `e` (experts)."""


def _leaf_pattern(leaf: str) -> str:
    pattern = re.escape(leaf).replace(r"\{name\}", "(?P<name>.+)")
    return pattern.replace(r"\{part\}", "(?P<part>" + "|".join(CANONICAL_PARTS) + ")")


def _alternatives(leaves: list[tuple[re.Pattern, TensorDecl]]) -> str:
    """The leaves' patterns as one alternation without named groups (each leaf is matched again on its own)."""
    plain = (p.pattern.replace("(?P<name>", "(?:").replace("(?P<part>", "(?:") for p, _ in leaves)
    return "|".join(f"(?:{p})" for p in plain)


@functools.cache
def _key_patterns() -> dict[str, tuple[re.Pattern, list[tuple[re.Pattern, TensorDecl]]]]:
    """Per family: the pattern of its keys (module path, leaf), and each leaf's own pattern with its declaration."""
    out = {}
    for family in FAMILIES:
        decls = list({decl.leaf: decl for d in DIALECTS if d.family == family for decl in d.tensors}.values())
        leaves = [(re.compile(_leaf_pattern(decl.leaf)), decl) for decl in decls]
        if any(d.layer_axis for d in DIALECTS if d.family == family):
            module = r"(?:decoder\.layers\.\d+|decoder\.layers|output_layer)(?:\.[^.]+)*?"
        else:
            module = r"decoder\.layers\.\d+\..+|output_layer"
        out[family] = (re.compile(rf"^(?P<module>{module})\.(?P<leaf>{_alternatives(leaves)})$"), leaves)
    return out


def match_key(key: str) -> KeyMatch | None:
    """The adapter tensor a checkpoint key names, or None for any other key (base weights, optimizer state...)."""
    for family, (pattern, leaves) in _key_patterns().items():
        match = pattern.match(key)
        if match is None:
            continue
        leaf, module = match.group("leaf", "module")
        groups, decl = next((m.groupdict(), decl) for p, decl in leaves if (m := p.fullmatch(leaf)))
        parts = module.split(".")
        axes = "i" if parts[:2] == ["decoder", "layers"] and not (len(parts) > 2 and parts[2].isdigit()) else ""
        if axes:
            module = "decoder.layers.{i}" + module[len("decoder.layers") :]
        if EXPERTS_SAVED in f"{module}.":
            module, axes = module.replace(EXPERTS_SAVED, EXPERTS_LIVE, 1), axes + "e"
        return KeyMatch(family, module, decl, groups.get("part"), groups.get("name"), axes)
    return None


def checkpoint_key(dialect: Dialect, module: str, leaf: str) -> tuple[str, tuple[int, ...]]:
    """The torch_dist key of the tensor `leaf` of `module` (a global path) and its index on the key's leading axes."""
    index = []
    match = re.match(r"^decoder\.layers\.(\d+)(\..+)$", module)
    if match and dialect.layer_axis:
        module, index = "decoder.layers" + match.group(2), [int(match.group(1))]
    expert = re.search(re.escape(EXPERTS_LIVE).replace(r"\{e\}", r"(\d+)"), module)
    if expert:
        module = module[: expert.start()] + EXPERTS_SAVED + module[expert.end() :]
        index.append(int(expert.group(1)))
    return f"{module}.{leaf}", tuple(index)


def expand(module: str, axes: str, index: tuple[int, ...]) -> str:
    """A key's module template with its axes filled from `index` (the inverse of `checkpoint_key`'s module part)."""
    at = dict(zip(axes, index))
    return module.replace("{i}", str(at.get("i"))).replace("{e}", str(at.get("e")))
