"""What the core needs to know about a model's shapes, from Megatron's config or an HF config.

Sizes every decoder has are read by `from_megatron` / `from_hf_config` directly; sizes only some families have
(multi-latent attention's ranks, which layers are MoE, ...) are declared once in `FAMILY_FIELDS`: where megatron's
config and HF's config.json keep each. Both constructors fill them from that table and `check_matches` compares them
with the others, so an HF config of another family (or another size) is one error before anything is written.
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


def valid(name: str, value: Any) -> bool:
    """Whether `value` is a possible value of the geometry field `name`."""
    if name == "gated_linear_unit":
        return isinstance(value, bool)
    if value is None:
        return name in OPTIONAL
    if name == "moe_layers":
        return isinstance(value, tuple) and all(isinstance(i, int) and 0 <= i < MAX_SIZE for i in value)
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIZE


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def megatron_moe_layers(config: Any) -> tuple[int, ...] | None:
    """The indices of MoE layers from megatron's `moe_layer_freq` (an int k: every k-th layer from 0; a list: 1 per
    MoE layer); None for a dense model."""
    if not getattr(config, "num_moe_experts", None):
        return None
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


@dataclass(frozen=True)
class FamilyField:
    """A size only some families have, declared once: where megatron's TransformerConfig and HF's config.json keep
    it. A family that brings a new size adds its field to ModelGeometry and a line to FAMILY_FIELDS."""

    name: str
    megatron: Callable[[Any], Any]
    hf: Callable[[Mapping[str, Any]], Any]


FAMILY_FIELDS: tuple[FamilyField, ...] = (
    FamilyField("q_lora_rank", _mla("q_lora_rank"), _hf_mla("q_lora_rank")),
    FamilyField("kv_lora_rank", _mla("kv_lora_rank"), _hf_mla("kv_lora_rank")),
    FamilyField("qk_head_dim", _mla("qk_head_dim"), _hf_mla("qk_nope_head_dim")),
    FamilyField("qk_pos_emb_head_dim", _mla("qk_pos_emb_head_dim"), _hf_mla("qk_rope_head_dim")),
    FamilyField("v_head_dim", _mla("v_head_dim"), _hf_mla("v_head_dim")),
    FamilyField("moe_layers", megatron_moe_layers, hf_moe_layers),
)


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

    def __post_init__(self) -> None:
        wrong = [
            f"{f.name}={getattr(self, f.name)!r:.30}" for f in fields(self) if not valid(f.name, getattr(self, f.name))
        ]
        if wrong:
            raise ShapeMismatchError(
                f"model geometry: expected positive integers up to {MAX_SIZE} (gated_linear_unit true or false; "
                f"vocab_size, the MoE and the MLA sizes may be unset; moe_layers a tuple of layer indices), "
                f"found {', '.join(wrong)}"
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
    def mla(self) -> bool:
        """Multi-latent attention (the MLA sizes are set)."""
        return self.kv_lora_rank is not None

    @classmethod
    def from_megatron(cls, config: Any, vocab_size: int | None = None) -> ModelGeometry:
        """From a megatron-core TransformerConfig (duck-typed: only attributes are read)."""
        heads = config.num_attention_heads
        family = {f.name: f.megatron(config) for f in FAMILY_FIELDS}
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
        heads = text["num_attention_heads"]
        experts = text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts")
        family = {f.name: f.hf(text) for f in FAMILY_FIELDS}
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        if family["kv_lora_rank"] is not None:  # HF's head_dim is the rope part there
            head_dim = family["qk_head_dim"] + family["qk_pos_emb_head_dim"]
        expert_width = (text.get("moe_intermediate_size") or text["intermediate_size"]) if experts else None
        shared = text.get("shared_expert_intermediate_size") or None  # Qwen2-MoE; DeepSeek/GLM: n_shared_experts
        if experts and shared is None and text.get("n_shared_experts"):
            shared = text["n_shared_experts"] * expert_width
        return cls(
            **family,
            num_layers=text["num_hidden_layers"],
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
        if self.num_experts and not self.dense_layers():  # no dense MLP: HF's intermediate_size may be anything
            skip.add("ffn_hidden_size")
        show = {"moe_layers": _layers_text}
        diffs = [
            f"{f.name}: Megatron model has {show.get(f.name, str)(getattr(self, f.name))}, {source} has "
            f"{show.get(f.name, str)(getattr(hf, f.name))}"
            for f in fields(self)
            if f.name not in skip and self._differs(f.name, hf)
        ]
        if diffs:
            raise ShapeMismatchError(
                "the HF config does not describe the Megatron model (another family or other sizes): "
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
