"""Architecture name maps: which HF modules a Megatron module becomes, per model family.

Declared tables only; the planner decides shapes and slices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..errors import UnsupportedModelError

Layout = Literal["plain", "qkv", "gate_up", "mamba_in", "qkv_gated", "gdn_in"]
"""How a fused output dimension is laid out on a TP rank: one module, query groups, [gate_t; up_t], or a Mamba
mixer's input projection ([z_t; x_t; B_t; C_t; dt_t], core/splits.py)."""
RowOrder = Literal["blocks", "interleaved"]
"""How a fused HF parameter holds the rows of the modules it stands for: one after another, or alternating."""


@dataclass(frozen=True)
class ModuleMap:
    """One Megatron linear inside a transformer layer and the HF modules it becomes."""

    megatron: str
    """Path inside the layer, e.g. `self_attention.linear_qkv`; `{e}` stands for the global expert index."""
    hf: tuple[str, ...]
    """HF paths inside the layer, in the order the fused Megatron output holds them (`{e}`: the expert)."""
    layout: Layout
    parts: tuple[str, ...] = ()
    """CanonicalLoRA's names for the sub-adapters, in the order of `hf`."""
    width: str = "ffn_hidden_size"
    """The ModelGeometry field with this MLP's width (routed and shared experts are narrower than a dense MLP)."""
    layer_symbol: str = ""
    """Hybrid models: the layer-pattern symbol (ModelGeometry.layer_pattern) of the layers that hold this linear."""
    refused: str = ""
    """Why an adapter on this linear is refused (no HF adapter computes it); empty: exported."""


@dataclass(frozen=True)
class FusedExperts:
    """transformers v5 keeps each layer's experts in 3-D parameters; peft targets them with target_parameters."""

    parameter: str
    """Inside the layer, e.g. `mlp.experts.gate_up_proj` ([experts, out, in])."""
    per_expert: tuple[str, ...]
    """The per-expert HF modules (`{e}`) whose output rows the parameter stacks, in order (gate then up); without
    `{e}`, the one module a 2-D parameter (a router's weight) stands for."""
    rows: RowOrder = "blocks"
    """`blocks`: [gate; up] (Mixtral, Qwen); `interleaved`: gate row j at 2j, up row j at 2j + 1 (GPT-OSS)."""


@dataclass(frozen=True)
class ArchMap:
    """Megatron -> HF module names for one family of decoder-only models."""

    name: str
    model_types: tuple[str, ...]
    modules: tuple[ModuleMap, ...]
    layer_prefix: str = "model.layers.{i}"
    output_layer: str = "lm_head"
    fused_experts: tuple[FusedExperts, ...] = ()
    """How transformers v5 fuses the per-expert modules (in parameter registration order); empty for dense models."""
    renamed_prefix: str = ""
    """A prefix of `layer_prefix` that transformers v5 renames when it loads a checkpoint (and peft, an adapter's
    tensors, but not its target_modules): full module paths in target_modules are written without it."""
    per_expert: str = ""
    """Why the per-expert layout is refused for this family (empty: it is written when asked for); the per-expert
    names in `modules` then exist only inside the planner, between the Megatron linears and the fused parameters."""


_QKV = ModuleMap(
    "self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv", ("q", "k", "v")
)
_PROJ = ModuleMap("self_attention.linear_proj", ("self_attn.o_proj",), "plain")
_FC2 = ModuleMap("mlp.linear_fc2", ("mlp.down_proj",), "plain")

LLAMA = ArchMap(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    modules=(
        _QKV,
        _PROJ,
        ModuleMap("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj"), "gate_up", ("gate", "up")),
        _FC2,
    ),
)
"""Llama-family decoders; linear_fc1 is gated (SwiGLU)."""

NEMOTRON = ArchMap(
    name="nemotron",
    model_types=("nemotron",),
    modules=(_QKV, _PROJ, ModuleMap("mlp.linear_fc1", ("mlp.up_proj",), "plain"), _FC2),
)
"""Nemotron decoders: the same attention names, a non-gated MLP (up_proj, down_proj)."""

_EXPERT_FC1 = "mlp.experts.local_experts.{e}.linear_fc1"
_EXPERT_FC2 = "mlp.experts.local_experts.{e}.linear_fc2"
_EXPERT = "moe_ffn_hidden_size"
_ROUTER = "mlp.router"
_V5_ROUTER = FusedExperts("mlp.gate.weight", ("mlp.gate",))
"""transformers v5's routers (Mixtral, Qwen-MoE) are not nn.Linear (peft cannot target them as modules): their weight is
a target parameter."""

QWEN_MOE = ArchMap(
    name="qwen3_moe",
    model_types=("qwen3_moe", "olmoe"),
    modules=(
        _QKV,
        _PROJ,
        ModuleMap(
            _EXPERT_FC1, ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), "gate_up", ("gate", "up"), _EXPERT
        ),
        ModuleMap(_EXPERT_FC2, ("mlp.experts.{e}.down_proj",), "plain", width=_EXPERT),
        ModuleMap(_ROUTER, ("mlp.gate",), "plain"),
    ),
    fused_experts=(
        FusedExperts("mlp.experts.gate_up_proj", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj")),
        FusedExperts("mlp.experts.down_proj", ("mlp.experts.{e}.down_proj",)),
        _V5_ROUTER,
    ),
)
"""Qwen-style MoE: per-expert `mlp.experts.{e}.{gate,up,down}_proj` (transformers v4, vLLM), fused in v5."""

_SHARED = "moe_shared_expert_intermediate_size"

QWEN2_MOE = dataclasses.replace(
    QWEN_MOE,
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    modules=QWEN_MOE.modules
    + (
        ModuleMap(
            "mlp.shared_experts.linear_fc1",
            ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
            "gate_up",
            ("gate", "up"),
            _SHARED,
        ),
        ModuleMap("mlp.shared_experts.linear_fc2", ("mlp.shared_expert.down_proj",), "plain", width=_SHARED),
    ),
    fused_experts=QWEN_MOE.fused_experts
    + tuple(
        FusedExperts(f"{m}.weight", (m,))
        for m in ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
    ),
)
"""Qwen2-MoE: Qwen-style experts plus one shared expert, megatron's SharedExpertMLP (a dense SwiGLU MLP, split over TP).

Its sigmoid gate (megatron `shared_experts.gate_weight`, HF `mlp.shared_expert_gate`) is a bare parameter in
megatron, not a linear, so no adapter dialect puts LoRA on it. Under transformers 5, peft (from 0.22) maps a
gate_proj / up_proj / down_proj target module of a qwen2_moe model onto the fused routed experts too (doubling
gate_up_proj's rank), so in the fused layout the shared expert's linears are written as 2-D target parameters
(`mlp.shared_expert.gate_proj.weight`, ...: the same tensor keys), which peft leaves alone."""

MIXTRAL = ArchMap(
    name="mixtral",
    model_types=("mixtral",),
    modules=(
        _QKV,
        _PROJ,
        ModuleMap(
            _EXPERT_FC1,
            ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3"),
            "gate_up",
            ("gate", "up"),
            _EXPERT,
        ),
        ModuleMap(_EXPERT_FC2, ("block_sparse_moe.experts.{e}.w2",), "plain", width=_EXPERT),
        ModuleMap(_ROUTER, ("block_sparse_moe.gate",), "plain"),
    ),
    fused_experts=(
        FusedExperts(
            "mlp.experts.gate_up_proj", ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3")
        ),
        FusedExperts("mlp.experts.down_proj", ("block_sparse_moe.experts.{e}.w2",)),
        FusedExperts(_V5_ROUTER.parameter, ("block_sparse_moe.gate",)),
    ),
)
"""Mixtral: w1 (gate), w3 (up), w2 (down) per expert and the router `gate` in transformers v4; under `mlp` in v5."""

_MAMBA_OUT_PROJ = (
    "nemotron_h: found LoRA on the Mamba mixers' out_proj (decoder.layers.<i>.mixer.out_proj), which no HF adapter "
    "reproduces: peft refuses LoRA on out_proj of Mamba models (the fused Mamba kernels read out_proj.weight directly, "
    "bypassing any adapter). Expected LoRA on the Mamba in_proj, attention and MLP linears only; train without "
    "out_proj (ModelOpt/Bridge target patterns)"
)

_LATENT_MOE = (
    "nemotron_h: found LoRA on a latent MoE's projection (mlp.fc1_latent_proj / fc2_latent_proj), which has no tested "
    "name map: megatron-core builds these projections only with Transformer Engine, so no CPU test checks their HF "
    "counterparts (mixer.fc1_latent_proj / fc2_latent_proj). Expected LoRA on the Mamba in_proj, attention, MLP and "
    "expert linears only"
)

NEMOTRON_H = ArchMap(
    name="nemotron_h",
    model_types=("nemotron_h",),
    modules=(
        ModuleMap("mixer.in_proj", ("mixer.in_proj",), "mamba_in", layer_symbol="M"),
        ModuleMap("mixer.out_proj", ("mixer.out_proj",), "plain", layer_symbol="M", refused=_MAMBA_OUT_PROJ),
        ModuleMap(_QKV.megatron, ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj"), "qkv", _QKV.parts, layer_symbol="*"),
        ModuleMap(_PROJ.megatron, ("mixer.o_proj",), "plain", layer_symbol="*"),
        ModuleMap("mlp.linear_fc1", ("mixer.up_proj",), "plain", layer_symbol="-"),
        ModuleMap(_FC2.megatron, ("mixer.down_proj",), "plain", layer_symbol="-"),
        ModuleMap(_EXPERT_FC1, ("mixer.experts.{e}.up_proj",), "plain", width=_EXPERT, layer_symbol="E"),
        ModuleMap(_EXPERT_FC2, ("mixer.experts.{e}.down_proj",), "plain", width=_EXPERT, layer_symbol="E"),
        ModuleMap(_ROUTER, ("mixer.gate",), "plain", layer_symbol="E"),
        ModuleMap(
            "mlp.shared_experts.linear_fc1", ("mixer.shared_experts.up_proj",), "plain", width=_SHARED, layer_symbol="E"
        ),
        ModuleMap(
            "mlp.shared_experts.linear_fc2",
            ("mixer.shared_experts.down_proj",),
            "plain",
            width=_SHARED,
            layer_symbol="E",
        ),
        *(
            ModuleMap(f"mlp.{name}", (f"mixer.{name}",), "plain", layer_symbol="E", refused=_LATENT_MOE)
            for name in ("fc1_latent_proj", "fc2_latent_proj")
        ),
    ),
    layer_prefix="backbone.layers.{i}",
    renamed_prefix="backbone.",
    fused_experts=(
        FusedExperts("mixer.experts.up_proj", ("mixer.experts.{e}.up_proj",)),
        FusedExperts("mixer.experts.down_proj", ("mixer.experts.{e}.down_proj",)),
        FusedExperts("mixer.gate.weight", ("mixer.gate",)),
    ),
)
"""Nemotron-H (megatron's MambaModel): one HF block per hybrid-pattern layer, numbered alike, its one mixer being a
Mamba2 mixer (M), attention (*), a non-gated squared-ReLU MLP (-) or a MoE layer (E: Nemotron-3 Nano). HF checkpoints
name the blocks `backbone.layers.{i}` (transformers 5 renames `backbone.` to `model.` when loading, for adapters too).
A MoE layer's routed experts are non-gated (megatron's expert linear_fc1 is HF's up_proj alone); transformers 5 keeps
them fused in `mixer.experts.up_proj` [experts, ffn, in] and `mixer.experts.down_proj` [experts, in, ffn] (blocks, one
module each), its router `mixer.gate` is a weight parameter (sigmoid scores; the expert bias
`e_score_correction_bias` is a buffer no adapter touches), its shared experts a plain non-gated MLP. A latent MoE
(`moe_latent_size`: fc1/fc2_latent_proj) has no name map: the geometry compares the latent size, and LoRA on the latent
projections is refused as an unmapped module."""

_QWEN3_NEXT_MLP = (
    "qwen3_next: found LoRA on a dense MLP (mlp.linear_fc1/fc2), which peft does not load onto this family: with "
    "transformers 5, peft retargets every gate_proj, up_proj and down_proj module of a qwen3_next model to the fused "
    "routed experts, so these adapters would be dropped without a word. Expected LoRA on the gated delta-net, "
    "attention, routed-expert and shared-expert linears only"
)

QWEN3_NEXT = ArchMap(
    name="qwen3_next",
    model_types=("qwen3_next",),
    modules=(
        ModuleMap(
            "self_attention.in_proj",
            ("linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"),
            "gdn_in",
            layer_symbol="G",
        ),
        ModuleMap("self_attention.out_proj", ("linear_attn.out_proj",), "plain", layer_symbol="G"),
        ModuleMap(_QKV.megatron, _QKV.hf, "qkv_gated", layer_symbol="*"),
        ModuleMap(_PROJ.megatron, _PROJ.hf, "plain", layer_symbol="*"),
        dataclasses.replace(LLAMA.modules[2], refused=_QWEN3_NEXT_MLP),
        dataclasses.replace(_FC2, refused=_QWEN3_NEXT_MLP),
    )
    + QWEN_MOE.modules[2:]
    + QWEN2_MOE.modules[len(QWEN_MOE.modules) :],
    fused_experts=QWEN2_MOE.fused_experts,
)
"""Qwen3-Next: gated delta-net layers (G: megatron's GatedDeltaNet under self_attention, HF `linear_attn`) and gated
attention layers (*: linear_qkv yields a sigmoid gate per query head, HF's q_proj is doubled), with Qwen2-MoE style
routed experts (softmax top-k), router and shared expert (its sigmoid `shared_expert_gate` is megatron's bare
`gate_weight` parameter, which no adapter dialect adapts) in every layer. CanonicalLoRA's q/k/v parts do not fit the
gated linear_qkv. Under transformers 5, peft retargets any gate_proj / up_proj / down_proj target module of a
qwen3_next model to the fused routed experts, so the shared expert's linears are written as 2-D target parameters
(`mlp.shared_expert.gate_proj.weight`, ...: the same tensor keys), which peft leaves alone; the dense MLP of
`mlp_only_layers` would need the same but is untested, so it stays refused."""

GPT_OSS = ArchMap(
    name="gpt_oss",
    model_types=("gpt_oss",),
    modules=(
        _QKV,
        _PROJ,
        ModuleMap(
            _EXPERT_FC1, ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), "gate_up", ("gate", "up"), _EXPERT
        ),
        ModuleMap(_EXPERT_FC2, ("mlp.experts.{e}.down_proj",), "plain", width=_EXPERT),
        ModuleMap(_ROUTER, ("mlp.router",), "plain"),
    ),
    fused_experts=(
        FusedExperts(
            "mlp.experts.gate_up_proj", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), "interleaved"
        ),
        FusedExperts("mlp.experts.down_proj", ("mlp.experts.{e}.down_proj",)),
        FusedExperts("mlp.router.weight", ("mlp.router",)),
    ),
    per_expert="transformers has no per-expert GPT-OSS modules (its experts are the fused gate_up_proj / down_proj "
    "parameters, gate and up rows interleaved) and vLLM serves GPT-OSS expert LoRA in that fused layout "
    "(is_3d_moe_weight); export with expert_layout='fused' (or 'auto')",
)
"""GPT-OSS: attention with biases and sinks (neither carries LoRA), experts fused in every transformers version:
`mlp.experts.gate_up_proj` [experts, hidden, 2 * ffn] (applied as x @ W[e]; gate = [..., ::2], up = [..., 1::2]),
`mlp.experts.down_proj` [experts, ffn, hidden], and the router `mlp.router` (weight and bias, not an nn.Linear).
Megatron's expert linear_fc1 is [gate; up] (per TP rank [gate_t; up_t]); the planner splits it into the per-expert
gate and up it names here, and the fused layout interleaves their rows (`FusedExperts.rows`)."""


_DENSE_MLP = (
    ModuleMap("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj"), "gate_up", ("gate", "up")),
    _FC2,
)
_DEEPSEEK_MOE = (
    ModuleMap(
        _EXPERT_FC1, ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), "gate_up", ("gate", "up"), _EXPERT
    ),
    ModuleMap(_EXPERT_FC2, ("mlp.experts.{e}.down_proj",), "plain", width=_EXPERT),
    ModuleMap(_ROUTER, ("mlp.gate",), "plain"),
    ModuleMap(
        "mlp.shared_experts.linear_fc1",
        ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
        "gate_up",
        ("gate", "up"),
        _SHARED,
    ),
    ModuleMap("mlp.shared_experts.linear_fc2", ("mlp.shared_experts.down_proj",), "plain", width=_SHARED),
)
"""DeepSeek-style MoE layers (DeepSeek-V3, Kimi-K2, GLM-4.5): routed experts, the router (sigmoid scores; its expert
bias, HF `e_score_correction_bias`, is a buffer no adapter touches) and the ungated shared experts; the first layers
have a dense MLP (`_DENSE_MLP`)."""

_AS_PARAMETERS = tuple(
    FusedExperts(f"{m}.weight", (m,))
    for m in (
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "mlp.shared_experts.gate_proj",
        "mlp.shared_experts.up_proj",
        "mlp.shared_experts.down_proj",
    )
)
"""The dense MLP's and the shared experts' linears as 2-D target parameters (same tensor keys as target_modules). Under
transformers 5, peft (0.21) rewrites any target_modules entry named gate_proj / up_proj / down_proj of these families
(transformers' qwen2_moe conversion pattern) into the fused routed experts' parameters, doubling the rank, so the
adapter would load onto the wrong weights; target_parameters are left alone."""

_MLA = (
    ModuleMap("self_attention.linear_q_proj", ("self_attn.q_proj",), "plain"),
    ModuleMap("self_attention.linear_q_down_proj", ("self_attn.q_a_proj",), "plain"),
    ModuleMap("self_attention.linear_q_up_proj", ("self_attn.q_b_proj",), "plain"),
    ModuleMap("self_attention.linear_kv_down_proj", ("self_attn.kv_a_proj_with_mqa",), "plain"),
    ModuleMap("self_attention.linear_kv_up_proj", ("self_attn.kv_b_proj",), "plain"),
    _PROJ,
)
"""megatron's MLASelfAttention. Each linear feeds one HF module with the same output rows in the same order:
q_up / q_proj per head [nope; rope], kv_down [kv latent; rope], kv_up per head [k nope; v], heads (and the down
projections' rows, when column-parallel) split over TP in contiguous blocks. The rope channels are laid out alike on
both sides: megatron's MLA rope and HF's `rope_interleave` both take channels 0::2 then 1::2 at run time, so no row of
the base weights, nor of an adapter, is permuted."""

DEEPSEEK_V3 = ArchMap(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2"),
    modules=_MLA + _DENSE_MLP + _DEEPSEEK_MOE,
    fused_experts=QWEN_MOE.fused_experts + _AS_PARAMETERS,
)
"""DeepSeek-V3 and Kimi-K2 (whose Hub config says model_type `kimi_k2` with DeepSeek-V3's modules; transformers loads
it as `deepseek_v3`)."""

GLM4_MOE = ArchMap(
    name="glm4_moe",
    model_types=("glm4_moe",),
    modules=(_QKV, _PROJ) + _DENSE_MLP + _DEEPSEEK_MOE,
    fused_experts=QWEN_MOE.fused_experts + _AS_PARAMETERS,
)
"""GLM-4.5 / GLM-4.6: GQA attention (q/k/v biases live in the base model; LoRA has none) and DeepSeek-style MoE."""

ARCHS: tuple[ArchMap, ...] = (
    LLAMA,
    NEMOTRON,
    QWEN_MOE,
    QWEN2_MOE,
    MIXTRAL,
    NEMOTRON_H,
    QWEN3_NEXT,
    GPT_OSS,
    DEEPSEEK_V3,
    GLM4_MOE,
)

NON_GATED: tuple[str, ...] = tuple(
    t for arch in ARCHS if not any(m.layout == "gate_up" for m in arch.modules) for t in arch.model_types
)
"""The model types whose name map has a non-gated MLP (up_proj, down_proj)."""

REFUSED: dict[str, str] = {
    "kimi_k25": (
        "Kimi-K2.5 (kimi_k25) is a vision-language model whose text model sits under model.language_model; no tested "
        "name map covers that prefix yet. Kimi-K2 (text only) is supported as deepseek_v3 / kimi_k2"
    ),
}
"""Model types refused by name, with what is missing."""


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHS for t in arch.model_types)


def arch_for_model_type(model_type: str) -> ArchMap:
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    if model_type in REFUSED:
        raise UnsupportedModelError(f"refused model_type {model_type!r}: {REFUSED[model_type]}")
    raise UnsupportedModelError(
        f"expected an HF model_type with a name map ({', '.join(supported_model_types())}), "
        f"found {model_type!r}. Pass model_type= for a supported family with the same module names, "
        "or open an issue for this family."
    )
