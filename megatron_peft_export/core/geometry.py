"""What the core needs to know about a model's shapes, from Megatron's config or an HF config.

Sizes every decoder has are read by `from_megatron` / `from_hf_config` directly; sizes only some families have
(multi-latent attention's ranks, which layers are MoE, ...) are declared once in `FAMILY_FIELDS`: where megatron's
config and HF's config.json keep each. Both constructors fill them from that table and `check_matches` compares them
with the others, so an HF config of another family (or another size) is one error before anything is written.
The hybrid families' sizes and layer pattern (Mamba, gated delta-net) and the attention facts (sinks, sliding-window
layers) are rows of the same table; the offline export reads a checkpoint's recorded args through it too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ShapeMismatchError

MAX_SIZE = 1 << 24
OPTIONAL = {
    "vocab_size",
    "num_experts",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "moe_layers",
}
"""Fields a model may lack (None): a dense model has no expert sizes, a GQA model no MLA ranks."""
LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe", "G": "gated delta-net"}
"""megatron's hybrid layer pattern symbols (`hybrid_override_pattern`), as HF's Nemotron-H `layers_block_type` names
them in `_HF_LAYER_TYPES`."""
_HF_LAYER_TYPES = {
    "linear_attention": "M",
    "mamba": "M",
    "full_attention": "*",
    "attention": "*",
    "mlp": "-",
    "moe": "E",
}
_ATTENTION = ("attention_sinks", "window_layers")
"""Attention facts that leave the adapter's shapes alone but make an HF model of another family compute something
else; None: not known (not compared)."""


def valid(name: str, value: Any) -> bool:
    """Whether `value` is a possible value of the geometry field `name`."""
    if name in ("gated_linear_unit", "attention_output_gate"):
        return isinstance(value, bool)
    if name == "layer_pattern":
        return value is None or (
            isinstance(value, str) and 0 < len(value) <= MAX_SIZE and set(value) <= set(LAYER_SYMBOLS)
        )
    if name in _ATTENTION:
        return value is None or isinstance(value, bool) or (isinstance(value, tuple) and all(_index(v) for v in value))
    if value is None:
        return name in OPTIONAL
    if name == "moe_layers":
        return isinstance(value, tuple) and all(isinstance(i, int) and 0 <= i < MAX_SIZE for i in value)
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIZE


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_SIZE


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def megatron_moe_layers(config: Any) -> tuple[int, ...] | None:
    """The indices of MoE layers from megatron's `moe_layer_freq` (an int k: every k-th layer from 0; a list: 1 per
    MoE layer), or a Mamba-hybrid model's E layers; None for a dense model."""
    if not getattr(config, "num_moe_experts", None):
        return None
    pattern = getattr(config, "hybrid_override_pattern", None)
    if isinstance(pattern, str) and not _gdn(config):  # a Mamba-hybrid model: its pattern's E layers
        return tuple(i for i, symbol in enumerate(pattern) if symbol == "E") or None
    freq, layers = getattr(config, "moe_layer_freq", 1), config.num_layers
    if _is_int(freq) and freq >= 1:
        return tuple(i for i in range(layers) if i % freq == 0)
    if isinstance(freq, (list, tuple)) and len(freq) == layers:
        return tuple(i for i, moe in enumerate(freq) if moe)
    raise ShapeMismatchError(
        f"expected megatron's moe_layer_freq to be a positive integer or one 0/1 per layer ({layers}), found "
        f"{freq!r:.60}"
    )


def hf_moe_layers(text: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The indices of MoE layers an HF config describes (DeepSeek/GLM `first_k_dense_replace` [+ `moe_layer_freq`],
    Qwen `decoder_sparse_step` and `mlp_only_layers`, else every layer); None without experts."""
    if MAMBA in text:  # Nemotron-H: its MoE layers are the pattern's E (it names n_routed_experts always)
        pattern = text.get("hybrid_override_pattern") or "".join(
            "E" if t == "moe" else "-" for t in text.get("layers_block_type") or ()
        )
        return tuple(i for i, symbol in enumerate(pattern) if symbol == "E") or None
    if not (text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts")):
        return None
    layers = text["num_hidden_layers"]
    first = text.get("first_k_dense_replace")
    if first is not None:
        step = text.get("moe_layer_freq") or 1
        return tuple(i for i in range(layers) if i >= first and i % step == 0)
    step, dense = text.get("decoder_sparse_step") or 1, set(text.get("mlp_only_layers") or ())
    return tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)


def _mla(name: str) -> Callable[[Any], Any]:
    return lambda config: getattr(config, name, None) if getattr(config, "multi_latent_attention", False) else None


def _hf_mla(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda text: text.get(key) if text.get("kv_lora_rank") else None


def _gdn(config: Any) -> bool:
    """A megatron config of a gated delta-net model (Qwen3-Next; megatron sets the delta-net defaults everywhere)."""
    return getattr(config, "experimental_attention_variant", None) == "gated_delta_net"


def _mamba(config: Any) -> bool:
    """A megatron config of a Mamba-hybrid model (megatron sets the Mamba defaults on every config)."""
    hybrid = getattr(config, "is_hybrid_model", False) or getattr(config, "hybrid_override_pattern", None)
    return bool(hybrid) and not _gdn(config)


def _of(test: Callable[[Any], bool], name: str) -> Callable[[Any], Any]:
    return lambda config: getattr(config, name, None) if test(config) else None


def _mamba_heads(config: Any) -> int | None:
    """MambaMixer's default: hidden_size * 2 (its expand) // mamba_head_dim."""
    if not _mamba(config):
        return None
    return config.mamba_num_heads or config.hidden_size * 2 // config.mamba_head_dim


def _megatron_pattern(config: Any) -> str | None:
    """Mamba-hybrid: hybrid_override_pattern; gated delta-net: megatron's linear_attention_freq as a pattern (an int N
    makes every N-th layer attention, a list has 1 for gated delta-net and 0 for attention:
    experimental_attention_variant_module_specs.get_linear_attention_pattern)."""
    if _mamba(config):
        return getattr(config, "hybrid_override_pattern", None)
    freq, layers = getattr(config, "linear_attention_freq", None), config.num_layers
    if not _gdn(config):
        return None
    if _is_int(freq) and freq > 0 and _is_int(layers):
        return "".join("*" if (i + 1) % freq == 0 else "G" for i in range(layers))
    if isinstance(freq, (list, tuple)) and set(freq) <= {0, 1}:
        return "".join("G" if f else "*" for f in freq)
    return None


def _hf_key(test: str, key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda text: text.get(key) if test in text else None


def _hf_pattern(text: Mapping[str, Any]) -> str | None:
    """Qwen3-Next: its token mixers (`layer_types`); Nemotron-H: `hybrid_override_pattern`, or transformers 5's
    `layers_block_type` list; None for other configs."""
    if "linear_num_key_heads" in text:
        types, names = text.get("layer_types"), {"linear_attention": "G", "full_attention": "*"}
        if not isinstance(types, list) or not set(types) <= set(names):
            raise ShapeMismatchError(
                f"the base model's config.json has layer_types {types!r:.80}; expected a list of linear_attention and "
                "full_attention"
            )
        return "".join(names[t] for t in types)
    if "mamba_num_heads" not in text:
        return None
    types, pattern = text.get("layers_block_type") or text.get("layer_types"), text.get("hybrid_override_pattern")
    if pattern is None and types is not None:
        unknown = sorted({t for t in types if t not in _HF_LAYER_TYPES})
        if unknown:
            raise ShapeMismatchError(
                f"the base model's config.json has layer types {unknown}; expected {', '.join(sorted(_HF_LAYER_TYPES))}"
            )
        pattern = "".join(_HF_LAYER_TYPES[t] for t in types)
    return pattern


def _megatron_window_layers(config: Any) -> tuple[int, ...] | None:
    """megatron-core's rule (transformer/utils.py is_layer_window_attention, 1-based layer numbers): no window_size,
    none; window_attn_skip_freq None, every layer; an int n, every layer whose number n does not divide; a list,
    the layers it marks."""
    window, skip = getattr(config, "window_size", None), getattr(config, "window_attn_skip_freq", None)
    layers = range(config.num_layers)
    if not window:
        return ()
    if skip is None:
        return tuple(layers)
    if isinstance(skip, int):
        return tuple(i for i in layers if (i + 1) % skip)
    if isinstance(skip, (list, tuple)):
        return tuple(i for i in layers if i < len(skip) and skip[i])
    return None


def _hf_window_layers(text: Mapping[str, Any]) -> tuple[int, ...] | None:
    """From HF `layer_types` ("sliding_attention" layers); None when the config has no layer_types."""
    types = text.get("layer_types")
    if not isinstance(types, list):
        return None
    return tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")


@dataclass(frozen=True)
class FamilyField:
    """A size or fact only some families have, declared once: how to read it from megatron's TransformerConfig (a
    checkpoint's recorded args are read like one: `reads` names the attributes the reader looks at) and from HF's
    config.json. A family that brings a new size adds its field to ModelGeometry and a row to FAMILY_FIELDS."""

    name: str
    megatron: Callable[[Any], Any]
    hf: Callable[[Mapping[str, Any]], Any]
    reads: tuple[str, ...]
    """The TransformerConfig attributes `megatron` reads (what the offline export gathers from a checkpoint)."""
    recorded: bool = True
    """Whether Megatron-LM's args record it; if not, it is unknown offline (not compared)."""
    fallback: bool = False
    """Offline: when the checkpoint's args do not give it, the base model's config.json does (the hybrid sizes, which
    Megatron-LM records only in part: a gated delta-net's layer pattern is its linear_attention_freq)."""


_HYBRID = ("is_hybrid_model", "hybrid_override_pattern", "experimental_attention_variant")
_GDN_READS = (*_HYBRID, "linear_attention_freq", "num_layers")
MAMBA = "mamba_num_heads"
"""The key that marks a Mamba-hybrid HF config (Nemotron-H)."""
GDN = "linear_num_key_heads"
"""The key that marks a gated delta-net HF config (Qwen3-Next)."""

FAMILY_FIELDS: tuple[FamilyField, ...] = (
    FamilyField("q_lora_rank", _mla("q_lora_rank"), _hf_mla("q_lora_rank"), ("multi_latent_attention", "q_lora_rank")),
    *(
        FamilyField(name, _mla(name), _hf_mla(key), ("multi_latent_attention", name))
        for name, key in (
            ("kv_lora_rank", "kv_lora_rank"),
            ("qk_head_dim", "qk_nope_head_dim"),
            ("qk_pos_emb_head_dim", "qk_rope_head_dim"),
            ("v_head_dim", "v_head_dim"),
        )
    ),
    FamilyField(
        "moe_layers",
        lambda c: megatron_moe_layers(c),
        lambda t: hf_moe_layers(t),
        _GDN_READS[:2] + ("num_moe_experts", "moe_layer_freq", "num_layers"),
    ),
    FamilyField(
        "moe_latent_size",
        lambda c: getattr(c, "moe_latent_size", None) if getattr(c, "num_moe_experts", None) else None,
        lambda t: t.get("moe_latent_size"),
        ("num_moe_experts", "moe_latent_size"),
    ),
    FamilyField(
        "mamba_num_heads",
        _mamba_heads,
        _hf_key(MAMBA, "mamba_num_heads"),
        (*_HYBRID, "mamba_num_heads", "mamba_head_dim", "hidden_size"),
        fallback=True,
    ),
    FamilyField(
        "mamba_head_dim",
        _of(_mamba, "mamba_head_dim"),
        _hf_key(MAMBA, "mamba_head_dim"),
        (*_HYBRID, "mamba_head_dim"),
        fallback=True,
    ),
    FamilyField(
        "mamba_num_groups",
        _of(_mamba, "mamba_num_groups"),
        lambda t: (t.get("n_groups") or t.get("mamba_n_groups")) if MAMBA in t else None,
        (*_HYBRID, "mamba_num_groups"),
        fallback=True,
    ),
    FamilyField(
        "mamba_state_dim",
        _of(_mamba, "mamba_state_dim"),
        _hf_key(MAMBA, "ssm_state_size"),
        (*_HYBRID, "mamba_state_dim"),
        fallback=True,
    ),
    FamilyField("layer_pattern", _megatron_pattern, _hf_pattern, _GDN_READS, fallback=True),
    *(
        FamilyField(name, _of(_gdn, name), _hf_key(GDN, name), (*_HYBRID, name), fallback=True)
        for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
    ),
    FamilyField(
        "attention_output_gate",
        lambda c: bool(getattr(c, "attention_output_gate", False)),
        lambda t: GDN in t,  # Qwen3-Next's attention is always gated
        ("attention_output_gate",),
    ),
    FamilyField(
        "attention_sinks",
        lambda c: getattr(c, "softmax_type", "vanilla") == "learnable",
        lambda t: t.get("model_type") == "gpt_oss",
        ("softmax_type",),
        recorded=False,
    ),
    FamilyField(
        "window_layers",
        _megatron_window_layers,
        _hf_window_layers,
        ("window_size", "window_attn_skip_freq", "num_layers"),
        recorded=False,
    ),
)
"""Every family-only field of ModelGeometry (MLA ranks, MoE layers, Mamba and gated delta-net sizes, the hybrid layer
pattern, the attention facts), in one table."""
HYBRID_FIELDS = ("mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim")
"""Mamba mixer sizes (hybrid models only; None elsewhere)."""
GDN_FIELDS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
"""Gated delta-net sizes (Qwen3-Next's linear-attention layers; the same names in megatron and HF; None elsewhere)."""
OPTIONAL |= {f.name for f in FAMILY_FIELDS}


class _Config:
    """A megatron config seen with a few attributes set (a hybrid model's pattern, which MambaModel holds)."""

    def __init__(self, config: Any, **extra: Any) -> None:
        self._config, self._extra = config, extra

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__["_extra"]
        return extra[name] if name in extra else getattr(self.__dict__["_config"], name)


def _layers_text(value: Any) -> str:
    """A tuple of layer indices as ranges (`layers 1-3, 5`)."""
    if not isinstance(value, tuple) or not value or not all(_is_int(i) for i in value):
        return repr(value)
    runs, start = [], value[0]
    for prev, cur in zip(value, value[1:] + (None,)):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return "layers " + ", ".join(runs)


@dataclass(kw_only=True, frozen=True)
class ModelGeometry:
    """Shapes that decide how fused Megatron tensors split into HF modules."""

    num_layers: int
    """Transformer layers in the whole model (all pipeline stages)."""
    hidden_size: int
    """Model width: input of q/k/v, gate/up; output of o_proj and down_proj."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA groups); equals num_attention_heads for plain multi-head attention."""
    head_dim: int
    """Channels per attention head (Megatron's kv_channels)."""
    ffn_hidden_size: int
    """MLP width (HF intermediate_size): rows of each of gate_proj and up_proj."""
    gated_linear_unit: bool
    """True when linear_fc1 fuses gate and up (SwiGLU)."""
    vocab_size: int | None = None
    """HF vocabulary size; Megatron pads its vocabulary, and rows past this are dropped."""
    num_experts: int | None = None
    """Routed experts per MoE layer (None: a dense model)."""
    moe_ffn_hidden_size: int | None = None
    """Width of each routed expert's MLP (HF moe_intermediate_size; Mixtral: intermediate_size)."""
    moe_shared_expert_intermediate_size: int | None = None
    """Width of the shared expert's MLP (HF shared_expert_intermediate_size); None: no shared expert."""
    moe_layers: tuple[int, ...] | None = None
    """The layers whose MLP is a MoE layer (the others are dense: DeepSeek's and GLM's first layers); None: every
    layer of a MoE model, or a dense model."""
    q_lora_rank: int | None = None
    """Multi-latent attention (DeepSeek-V3, Kimi-K2): the query latent's width (None: queries are not compressed)."""
    kv_lora_rank: int | None = None
    """MLA: the key/value latent's width; None: not an MLA model."""
    qk_head_dim: int | None = None
    """MLA: the rope-free part of a query/key head (HF qk_nope_head_dim)."""
    qk_pos_emb_head_dim: int | None = None
    """MLA: the rope part of a query/key head (HF qk_rope_head_dim)."""
    v_head_dim: int | None = None
    """MLA: a value head's width."""
    moe_latent_size: int | None = None
    """Latent MoE (Nemotron-3 Super style): the width routed experts work in (megatron and HF moe_latent_size)."""
    mamba_num_heads: int | None = None
    """Hybrid models: Mamba heads per mixer (HF mamba_num_heads); d_inner = heads * mamba_head_dim."""
    mamba_head_dim: int | None = None
    mamba_num_groups: int | None = None
    """B/C groups (HF n_groups)."""
    mamba_state_dim: int | None = None
    """SSM state size (HF ssm_state_size)."""
    layer_pattern: str | None = None
    """Hybrid models: one symbol per layer (`M` Mamba, `*` attention, `-` MLP, `E` MoE), megatron's
    hybrid_override_pattern; gated delta-net models: `G` or `*` per layer (the token mixer; megatron's
    linear_attention_freq); None for models whose every layer is attention + MLP."""
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    attention_output_gate: bool = False
    """Attention's linear_qkv also yields a sigmoid output gate per query head (Qwen3-Next; HF q_proj doubled)."""
    attention_sinks: bool | None = None
    """A learned per-head sink in the attention softmax (megatron softmax_type "learnable"; HF GPT-OSS `sinks`)."""
    window_layers: tuple[int, ...] | None = None
    """The layers (0-based) with sliding-window attention (megatron window_size / window_attn_skip_freq; HF
    layer_types). The window's length is not compared: converters differ by one on its left edge."""

    def __post_init__(self) -> None:
        wrong = [
            f"{f.name}={getattr(self, f.name)!r:.30}" for f in fields(self) if not valid(f.name, getattr(self, f.name))
        ]
        if wrong:
            raise ShapeMismatchError(
                f"model geometry: expected positive integers up to {MAX_SIZE} (gated_linear_unit true or false; "
                f"vocab_size, the MoE and the MLA sizes may be unset; moe_layers a tuple of layer indices; a layer "
                f"pattern of {''.join(LAYER_SYMBOLS)}), found {', '.join(wrong)}"
            )
        if self.layer_pattern is not None and len(self.layer_pattern) != self.num_layers:
            raise ShapeMismatchError(
                f"expected the hybrid layer pattern to have one symbol per layer ({self.num_layers}), found "
                f"{self.layer_pattern!r} ({len(self.layer_pattern)})"
            )
        mla = (self.kv_lora_rank, self.qk_head_dim, self.qk_pos_emb_head_dim, self.v_head_dim)
        if any(v is not None for v in mla) and any(v is None for v in mla):
            raise ShapeMismatchError(
                "model geometry: multi-latent attention needs kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim and "
                f"v_head_dim together, found {mla}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ShapeMismatchError(
                f"expected num_attention_heads to be a multiple of num_query_groups, found "
                f"{self.num_attention_heads} heads and {self.num_query_groups} query groups"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def mamba_d_inner(self) -> int:
        return (self.mamba_num_heads or 0) * (self.mamba_head_dim or 0)

    @property
    def mla(self) -> bool:
        """Multi-latent attention (the MLA sizes are set)."""
        return self.kv_lora_rank is not None

    @classmethod
    def from_megatron(
        cls, config: Any, vocab_size: int | None = None, layer_pattern: str | None = None
    ) -> ModelGeometry:
        """From a megatron-core TransformerConfig (duck-typed: only attributes are read); `layer_pattern`: a hybrid
        model's (MambaModel.hybrid_override_pattern), which makes the Mamba sizes part of the geometry."""
        heads = config.num_attention_heads
        view = _Config(config, hybrid_override_pattern=layer_pattern) if layer_pattern is not None else config
        family = {f.name: f.megatron(view) for f in FAMILY_FIELDS}
        head_dim = config.kv_channels or config.hidden_size // heads
        if family["kv_lora_rank"] is not None:  # a q/k head is nope + rope wide (kv_channels is unused)
            head_dim = family["qk_head_dim"] + family["qk_pos_emb_head_dim"]
        return cls(
            **family,
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=heads,
            num_query_groups=config.num_query_groups or heads,
            head_dim=head_dim,
            ffn_hidden_size=config.ffn_hidden_size,
            gated_linear_unit=bool(config.gated_linear_unit),
            vocab_size=vocab_size,
            num_experts=getattr(config, "num_moe_experts", None),
            moe_ffn_hidden_size=getattr(config, "moe_ffn_hidden_size", None),
            moe_shared_expert_intermediate_size=getattr(config, "moe_shared_expert_intermediate_size", None) or None,
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], gated_linear_unit: bool = True) -> ModelGeometry:
        """From an HF config.json mapping (Llama-family field names)."""
        try:
            return cls._from_hf_config(config, gated_linear_unit)
        except (KeyError, TypeError, AttributeError, ZeroDivisionError) as exc:
            detail = f"no {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise ShapeMismatchError(
                f"the base model's config.json does not describe a decoder model's sizes ({detail}); "
                "expected num_hidden_layers, hidden_size, num_attention_heads and intermediate_size as integers"
            ) from None

    @classmethod
    def _from_hf_config(cls, config: Mapping[str, Any], gated_linear_unit: bool) -> ModelGeometry:
        text = config.get("text_config") or config
        if "model_type" not in text and "model_type" in config:
            text = {**text, "model_type": config["model_type"]}
        heads = text["num_attention_heads"]
        experts = text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts")
        family = {f.name: f.hf(text) for f in FAMILY_FIELDS}
        if MAMBA in text and not family["moe_layers"]:
            experts = None  # a Nemotron-H config without MoE layers still names its expert counts
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        if family["kv_lora_rank"] is not None:  # HF's head_dim is the rope part there
            head_dim = family["qk_head_dim"] + family["qk_pos_emb_head_dim"]
        expert_width = (text.get("moe_intermediate_size") or text["intermediate_size"]) if experts else None
        # Qwen2-MoE / Qwen3-Next: shared_expert_intermediate_size; Nemotron-H: moe_shared_expert_intermediate_size;
        # DeepSeek/GLM: n_shared_experts experts of the routed width
        shared = text.get("shared_expert_intermediate_size") or text.get("moe_shared_expert_intermediate_size") or None
        if experts and shared is None and text.get("n_shared_experts"):
            shared = text["n_shared_experts"] * expert_width
        return cls(
            **family,
            num_layers=len(family["layer_pattern"]) if family["layer_pattern"] else text["num_hidden_layers"],
            hidden_size=text["hidden_size"],
            num_attention_heads=heads,
            num_query_groups=text.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            ffn_hidden_size=text["intermediate_size"],
            gated_linear_unit=gated_linear_unit,
            vocab_size=text.get("vocab_size"),
            num_experts=experts,
            moe_ffn_hidden_size=expert_width,
            moe_shared_expert_intermediate_size=shared if experts else None,
        )

    def check_matches(self, hf: ModelGeometry, source: str) -> None:
        """Raise one error listing every field where the HF config contradicts the Megatron model."""
        skip = {"vocab_size", "gated_linear_unit"}
        if self.layer_pattern is None or hf.layer_pattern is None:  # one side does not record it
            skip.add("layer_pattern")
        skip.update(name for name in _ATTENTION if getattr(self, name) is None or getattr(hf, name) is None)
        if self.num_experts and not self.dense_layers():  # no dense MLP: HF's intermediate_size may be anything
            skip.add("ffn_hidden_size")
        show = {"moe_layers": _layers_text}
        diffs = [
            f"{f.name}: Megatron model has {show.get(f.name, _shown)(getattr(self, f.name))}, {source} has "
            f"{show.get(f.name, _shown)(getattr(hf, f.name))}"
            for f in fields(self)
            if f.name not in skip and self._differs(f.name, hf)
        ]
        if diffs:
            raise ShapeMismatchError(
                "the HF config does not describe the Megatron model: "
                + "; ".join(diffs)
                + ". Pass the base model the adapter was trained on (base_model_name_or_path)."
            )

    def dense_layers(self) -> tuple[int, ...]:
        """The layers of a MoE model whose MLP is dense (none for a dense model)."""
        if not self.num_experts or self.moe_layers is None:
            return ()
        return tuple(i for i in range(self.num_layers) if i not in set(self.moe_layers))

    def _differs(self, name: str, hf: ModelGeometry) -> bool:
        mine, theirs = getattr(self, name), getattr(hf, name)
        if name == "moe_layers" and self.num_experts and hf.num_experts:  # unset: every layer
            every = tuple(range(self.num_layers))
            return (mine or every) != (theirs or every)
        return mine != theirs


def _shown(value: Any) -> str:
    return str(list(value) if isinstance(value, tuple) else value)
