"""Tiny DeepSeek-style megatron-core GPTs on CPU (DeepSeek-V3 / Kimi-K2 with multi-latent attention, GLM-4.5 with
biased GQA) and their independent transformers twins.

Both families: the first ``dense_layers`` layers have a dense SwiGLU MLP, the others a MoE layer with sigmoid routing,
an expert bias that only chooses experts (HF ``e_score_correction_bias``), renormalized top-k weights times
``routed_scaling_factor``, and one ungated shared expert added to the routed output. Attention:

- ``mla``: megatron's MLASelfAttention (local spec: every MLA linear a ColumnParallelLinear, the down projections'
  outputs gathered over TP), rope_type "rope", q/kv latent RMSNorms; HF ``deepseek_v3`` with rope_interleave=True. Both
  sides de-interleave the rope channels the same way at run time (megatron's ``apply_rotary_pos_emb`` with
  multi_latent_attention takes x[0::2], x[1::2]; HF's ``apply_rotary_pos_emb_interleave`` the same), so the weights are
  copied as they are.
- ``gqa``: megatron's SelfAttention with ``add_qkv_bias`` (q/k/v biases, no o_proj bias) and partial rotary (half the
  head); HF ``glm4_moe`` (attention_bias=True, partial_rotary_factor=0.5, no qk norm).

The HF state dict is made here from layout facts (per query group [q heads; k; v] for linear_qkv, [gate; up] for fc1),
not by the package under test. Call from ranks started by ``multiprocess.run_ranks``.
"""

import dataclasses

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import MLATransformerConfig, TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM

from . import tiny_gpt as tg
from . import tiny_moe
from .cpu_shims import install_moe_cpu_shims


@dataclasses.dataclass(frozen=True)
class TinyDeepSeekConfig(tiny_moe.TinyMoEConfig):
    """The tiny MoE geometry plus the DeepSeek-style parts; ``attention`` is "mla" (deepseek_v3) or "gqa" (glm4_moe)."""

    attention: str = "mla"
    dense_layers: int = 1
    moe_ffn_hidden_size: int = 16
    moe_shared_expert_intermediate_size: int = 16
    routed_scaling_factor: float = 2.5
    q_lora_rank: int | None = 24
    kv_lora_rank: int = 16
    qk_head_dim: int = 8
    """Megatron's name for the no-rope part of a q/k head (HF qk_nope_head_dim)."""
    qk_pos_emb_head_dim: int = 4
    """The rope part (HF qk_rope_head_dim)."""
    v_head_dim: int = 6
    weight_seed: int = 5
    layernorm_epsilon: float = 1e-6
    """HF deepseek_v3 builds its q/kv latent norms with RMSNorm's default eps 1e-6 whatever rms_norm_eps says; megatron
    uses layernorm_epsilon for every norm (DeepSeek-V3's real configs use 1e-6 throughout)."""

    @property
    def family(self) -> str:
        return "deepseek_v3" if self.attention == "mla" else "glm4_moe"


DEEPSEEK_LIKE = TinyDeepSeekConfig()
DEEPSEEK_NO_Q_LORA = TinyDeepSeekConfig(q_lora_rank=None)
GLM_LIKE = TinyDeepSeekConfig(attention="gqa")


class _NoTransformerEngineLinear:
    """A class nothing is an instance of (see ``install_mla_cpu_shim``)."""


def install_mla_cpu_shim() -> None:
    """Let MLASelfAttention build without Transformer Engine.

    Without TE, megatron-core 0.16.1 still imports ``megatron.core.extensions.transformer_engine`` (against a
    MagicMock ``te``), so ``multi_latent_attention.TELinear`` is a MagicMock instance, not a class, and MLA's
    ``isinstance(self.linear_proj, TELinear)`` raises TypeError. TELinear there only selects TE code paths, which
    a CPU build never takes: it is replaced by a class no module is an instance of. Test support only.
    """
    from megatron.core.transformer import multi_latent_attention as mla

    if not isinstance(mla.TELinear, type):
        mla.TELinear = _NoTransformerEngineLinear


def init_parallel(tp: int = 1, ep: int = 1) -> None:
    tiny_moe.init_moe_parallel(tp=tp, ep=ep)
    install_mla_cpu_shim()


def transformer_config(cfg: TinyDeepSeekConfig, *, sequence_parallel: bool = False):
    """tiny_moe's TransformerConfig with DeepSeek routing, dense first layers and the attention of ``cfg``."""
    config = tiny_moe.moe_transformer_config(cfg, sequence_parallel=sequence_parallel)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    fields.update(
        moe_layer_freq=[0] * cfg.dense_layers + [1] * (cfg.num_layers - cfg.dense_layers),
        moe_shared_expert_gate=False,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_pre_softmax=False,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
        moe_router_dtype="fp32",
    )
    if cfg.attention == "gqa":
        return TransformerConfig(**{**fields, "add_qkv_bias": True})
    fields.update(num_query_groups=None, kv_channels=None, multi_latent_attention=True)
    return MLATransformerConfig(
        **fields,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_head_dim,
        qk_pos_emb_head_dim=cfg.qk_pos_emb_head_dim,
        v_head_dim=cfg.v_head_dim,
        rope_type="rope",
        rotary_base=cfg.rotary_base,
    )


class CpuCoreAttention(torch.nn.Module):
    """Causal softmax attention taking separate key and value head sizes, as MLA builds its core attention.

    megatron-core's local DotProductAttention has no ``k_channels`` / ``v_channels`` (MLA's q/k heads are
    nope + rope wide, its v heads ``v_head_dim``), so MLASelfAttention only builds with Transformer Engine's
    attention, which needs CUDA. This stand-in computes softmax(q k^T * softmax_scale, causal) v per head:
    q, k [s, b, heads, dk], v [s, b, heads, dv] -> [s, b, heads * dv]. Test support only.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, **_):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, packed_seq_params=None, **_):
        assert packed_seq_params is None, "no packed sequences in the tiny models"
        scores = torch.einsum("sbnd,tbnd->bnst", query.float(), key.float()) * self.softmax_scale
        seq = query.shape[0]
        causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        out = torch.einsum("bnst,tbnd->sbnd", probs, value.float()).to(query.dtype)
        return out.reshape(seq, out.shape[1], -1)


def _layer_specs(cfg: TinyDeepSeekConfig, config) -> TransformerBlockSubmodules:
    """Dense layers then MoE layers, local modules; torch RMSNorms that accept sequence parallelism."""
    mla = cfg.attention == "mla"
    dense = get_gpt_layer_local_spec(normalization="RMSNorm", multi_latent_attention=mla, qk_layernorm=mla)
    moe = get_gpt_layer_local_spec(
        num_experts=cfg.num_experts, normalization="RMSNorm", multi_latent_attention=mla, qk_layernorm=mla
    )
    specs = [dense] * cfg.dense_layers + [moe] * (cfg.num_layers - cfg.dense_layers)
    norm = tg._SequenceParallelRMSNorm
    for spec in (dense, moe):
        if mla:
            spec.submodules.self_attention.submodules.core_attention = CpuCoreAttention
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = norm
        attention = spec.submodules.self_attention.submodules
        for name in ("q_layernorm", "k_layernorm", "kv_layernorm"):
            if getattr(attention, name, IdentityOp) is not IdentityOp:
                setattr(attention, name, norm)
    return TransformerBlockSubmodules(specs, layer_norm=norm)


def global_weights(cfg: TinyDeepSeekConfig) -> dict:
    """{megatron name at TP=EP=1: tensor}, each seeded from its name (tiny_moe's convention); MoE layers' router
    ``expert_bias`` (a buffer) included, large enough to change which experts are chosen."""
    h = cfg.hidden_size
    f, fe, fs = cfg.ffn_hidden_size, cfg.moe_ffn_hidden_size, cfg.moe_shared_expert_intermediate_size
    shapes = {
        "embedding.word_embeddings.weight": (cfg.vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        "output_layer.weight": (cfg.vocab_size, h),
    }
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "pre_mlp_layernorm.weight"] = (h,)
        shapes.update({p + k: v for k, v in _attention_shapes(cfg).items()})
        if i < cfg.dense_layers:
            shapes[p + "mlp.linear_fc1.weight"] = (2 * f, h)
            shapes[p + "mlp.linear_fc2.weight"] = (h, f)
            continue
        shapes[p + "mlp.router.weight"] = (cfg.num_experts, h)
        for e in range(cfg.num_experts):
            shapes[p + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (2 * fe, h)
            shapes[p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (h, fe)
        shapes[p + "mlp.shared_experts.linear_fc1.weight"] = (2 * fs, h)
        shapes[p + "mlp.shared_experts.linear_fc2.weight"] = (h, fs)
    weights = {
        name: tg._seeded(f"{cfg.weight_seed}|{name}", shape, 0.1, 1.0 if len(shape) == 1 else 0.0)
        for name, shape in shapes.items()
    }
    for name in [k for k in weights if k.endswith("qkv.bias")]:
        weights[name] = weights[name] - 1.0  # biases around 0, not 1 like norms
    for i in range(cfg.dense_layers, cfg.num_layers):
        name = f"decoder.layers.{i}.mlp.router.expert_bias"
        weights[name] = tg._seeded(f"{cfg.weight_seed}|{name}", (cfg.num_experts,), 0.05)
    return weights


def _attention_shapes(cfg: TinyDeepSeekConfig) -> dict:
    h, n = cfg.hidden_size, cfg.num_attention_heads
    if cfg.attention == "gqa":
        rows = (n + 2 * cfg.num_query_groups) * cfg.kv_channels
        return {
            "self_attention.linear_qkv.weight": (rows, h),
            "self_attention.linear_qkv.bias": (rows,),
            "self_attention.linear_proj.weight": (h, n * cfg.kv_channels),
        }
    q_head = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
    shapes = {
        "self_attention.linear_kv_down_proj.weight": (cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim, h),
        "self_attention.kv_layernorm.weight": (cfg.kv_lora_rank,),
        "self_attention.linear_kv_up_proj.weight": (n * (cfg.qk_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "self_attention.linear_proj.weight": (h, n * cfg.v_head_dim),
    }
    if cfg.q_lora_rank is None:
        shapes["self_attention.linear_q_proj.weight"] = (n * q_head, h)
    else:
        shapes["self_attention.linear_q_down_proj.weight"] = (cfg.q_lora_rank, h)
        shapes["self_attention.q_layernorm.weight"] = (cfg.q_lora_rank,)
        shapes["self_attention.linear_q_up_proj.weight"] = (n * q_head, cfg.q_lora_rank)
    return shapes


def build(cfg: TinyDeepSeekConfig, *, sequence_parallel: bool = False):
    """This rank's GPTModel loaded with ``global_weights`` (PP 1)."""
    install_moe_cpu_shims()
    config = transformer_config(cfg, sequence_parallel=sequence_parallel)
    model = GPTModel(
        config,
        _layer_specs(cfg, config),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        rotary_percent=0.5 if cfg.attention == "gqa" else 1.0,
    )
    weights = global_weights(cfg)
    tg.load_weights(model, {k: v for k, v in weights.items() if not k.endswith("expert_bias")})
    for name, buffer in model.named_buffers():
        if name.endswith("expert_bias"):
            buffer.copy_(weights[tg._global_name(model, name)])
    return model


# ----------------------------------------------------------------------- HF side


def hf_state_dict(cfg: TinyDeepSeekConfig, w: dict) -> dict:
    """Megatron global names -> HF deepseek_v3 / glm4_moe names (transformers 5: fused expert parameters)."""
    sd = {
        "model.embed_tokens.weight": w["embedding.word_embeddings.weight"],
        "model.norm.weight": w["decoder.final_layernorm.weight"],
        "lm_head.weight": w["output_layer.weight"],
    }
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = w[m + "input_layernorm.weight"]
        sd[h + "post_attention_layernorm.weight"] = w[m + "pre_mlp_layernorm.weight"]
        sd[h + "self_attn.o_proj.weight"] = w[m + "self_attention.linear_proj.weight"]
        sd.update({h + k: v for k, v in _hf_attention(cfg, w, m).items()})
        if i < cfg.dense_layers:
            sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"] = w[m + "mlp.linear_fc1.weight"].chunk(2)
            sd[h + "mlp.down_proj.weight"] = w[m + "mlp.linear_fc2.weight"]
            continue
        experts = range(cfg.num_experts)
        sd[h + "mlp.gate.weight"] = w[m + "mlp.router.weight"]
        sd[h + "mlp.gate.e_score_correction_bias"] = w[m + "mlp.router.expert_bias"]
        sd[h + "mlp.experts.gate_up_proj"] = torch.stack(
            [w[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] for e in experts]
        )
        sd[h + "mlp.experts.down_proj"] = torch.stack(
            [w[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] for e in experts]
        )
        gate, up = w[m + "mlp.shared_experts.linear_fc1.weight"].chunk(2)
        sd[h + "mlp.shared_experts.gate_proj.weight"], sd[h + "mlp.shared_experts.up_proj.weight"] = gate, up
        sd[h + "mlp.shared_experts.down_proj.weight"] = w[m + "mlp.shared_experts.linear_fc2.weight"]
    return {k: v.clone() for k, v in sd.items()}


def _hf_attention(cfg: TinyDeepSeekConfig, w: dict, m: str) -> dict:
    a = m + "self_attention."
    if cfg.attention == "gqa":
        hpg, d = cfg.num_attention_heads // cfg.num_query_groups, cfg.kv_channels
        out = {}
        for kind in ("weight", "bias"):
            fused = w[a + f"linear_qkv.{kind}"].view(cfg.num_query_groups, (hpg + 2) * d, -1)
            q, k, v = torch.split(fused, [hpg * d, d, d], dim=1)
            for name, t in (("q", q), ("k", k), ("v", v)):
                out[f"self_attn.{name}_proj.{kind}"] = t.reshape(-1, fused.shape[-1]).squeeze(-1)
        return out
    out = {
        "self_attn.kv_a_proj_with_mqa.weight": w[a + "linear_kv_down_proj.weight"],
        "self_attn.kv_a_layernorm.weight": w[a + "kv_layernorm.weight"],
        "self_attn.kv_b_proj.weight": w[a + "linear_kv_up_proj.weight"],
    }
    if cfg.q_lora_rank is None:
        out["self_attn.q_proj.weight"] = w[a + "linear_q_proj.weight"]
    else:
        out["self_attn.q_a_proj.weight"] = w[a + "linear_q_down_proj.weight"]
        out["self_attn.q_a_layernorm.weight"] = w[a + "q_layernorm.weight"]
        out["self_attn.q_b_proj.weight"] = w[a + "linear_q_up_proj.weight"]
    return out


def hf_config(cfg: TinyDeepSeekConfig):
    """The transformers config of the twin (eager attention and experts)."""
    common = dict(
        tg.hf_config_fields(cfg),
        hidden_act="silu",
        intermediate_size=cfg.ffn_hidden_size,
        moe_intermediate_size=cfg.moe_ffn_hidden_size,
        n_routed_experts=cfg.num_experts,
        n_shared_experts=cfg.moe_shared_expert_intermediate_size // cfg.moe_ffn_hidden_size,
        num_experts_per_tok=cfg.moe_router_topk,
        routed_scaling_factor=cfg.routed_scaling_factor,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=cfg.dense_layers,
        norm_topk_prob=True,
        pad_token_id=None,
        num_nextn_predict_layers=0,
    )
    if cfg.attention == "gqa":
        config = Glm4MoeConfig(**common, attention_bias=True, partial_rotary_factor=0.5, use_qk_norm=False)
    else:
        del common["head_dim"]
        common["num_key_value_heads"] = cfg.num_attention_heads
        config = DeepseekV3Config(
            **common,
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_head_dim,
            qk_rope_head_dim=cfg.qk_pos_emb_head_dim,
            v_head_dim=cfg.v_head_dim,
            rope_interleave=True,
            attention_bias=False,
        )
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def hf_twin(cfg: TinyDeepSeekConfig):
    """The HF model computing what ``build(cfg)`` computes, weights loaded strictly."""
    model_cls = Glm4MoeForCausalLM if cfg.attention == "gqa" else DeepseekV3ForCausalLM
    model = model_cls(hf_config(cfg)).float()
    model.load_state_dict(hf_state_dict(cfg, global_weights(cfg)), strict=True)
    return model.eval()
