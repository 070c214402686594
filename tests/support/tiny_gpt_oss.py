"""A tiny GPT-OSS as a megatron-core GPT on CPU and its independent transformers twin (GptOssForCausalLM).

GPT-OSS in megatron-core 0.16.1 terms, each matched to transformers' gpt_oss modeling code:
- attention sinks: ``softmax_type="learnable"``, one ``core_attention.softmax_offset`` per head (split over TP with the
  heads); megatron's local DotProductAttention appends it as an extra softmax column and drops it (``SoftmaxOne``),
  as transformers' eager attention does with ``self_attn.sinks``;
- biases on q/k/v/o, the router and every expert linear (``add_bias_linear``); megatron adds an expert's fc2 bias
  before the routing weight multiplies, as transformers does;
- sliding-window attention on alternate layers: megatron ``window_size=(W - 1, 0)`` with
  ``window_attn_skip_freq=2`` (layers 1, 3, ... 1-based are windowed) attends the last W keys, transformers'
  ``sliding_window=W`` with ``layer_types`` sliding / full alternating (kv > q - W);
- experts: megatron computes ``quick_gelu(clamp(gate, max=L)) * (clamp(up, -L, L) + 1)`` on fc1's [gate; up] halves
  (``activation_func=quick_gelu``, ``activation_func_clamp_value=L``, ``glu_linear_offset=1``); transformers computes
  ``gate * sigmoid(1.702 gate) * (up + 1)`` with the same clamps, gate and up INTERLEAVED in
  ``gate_up_proj`` [experts, hidden, 2 * ffn] applied as ``x @ W[e]``;
- routing: top-k of the router logits (with bias), softmax over those k (megatron ``moe_router_pre_softmax=False``).

The local attention (no Transformer Engine) runs these on CPU as it is: the sink and the sliding-window mask are in
megatron's torch softmax path (``FusedScaleMaskSoftmax.forward_torch_softmax``), so no attention shim is needed; the
general CPU shims (``cpu_shims``) stand in for "cuda" devices, among them the window mask's.
"""

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.fusions.fused_bias_geglu import quick_gelu
from transformers import GptOssConfig, GptOssForCausalLM

from . import tiny_gpt as tg
from . import tiny_moe

ATTENTION = ("*linear_qkv*", "*linear_proj*")
EXPERTS = tiny_moe.ROUTED_EXPERT_TARGETS


@dataclasses.dataclass(frozen=True)
class TinyGptOssConfig(tiny_moe.TinyMoEConfig):
    sliding_window: int = 5
    """Keys a windowed layer attends (HF ``sliding_window``), shorter than ``seq_length`` so the window bites."""
    swiglu_limit: float = 7.0
    bias_std: float = 0.1
    weight_seed: int = 8


TINY = TinyGptOssConfig(swiglu_limit=0.4)
"""Expert pre-activations here are O(0.5): a limit of 0.4 makes the clamps bite on both sides."""


def transformer_config(cfg: TinyGptOssConfig, *, sequence_parallel: bool = False):
    config = tiny_moe.moe_transformer_config(cfg, sequence_parallel=sequence_parallel)
    return dataclasses.replace(
        config,
        add_bias_linear=True,
        activation_func=quick_gelu,
        glu_linear_offset=1.0,
        activation_func_clamp_value=cfg.swiglu_limit,
        softmax_type="learnable",
        window_size=(cfg.sliding_window - 1, 0),
        window_attn_skip_freq=2,
        moe_router_pre_softmax=False,
    )


def global_weights(cfg: TinyGptOssConfig) -> dict:
    """``tiny_moe.global_moe_base_weights`` plus GPT-OSS's biases and sinks, each seeded from its own name."""
    weights = tiny_moe.global_moe_base_weights(cfg)
    h, f, heads = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.num_attention_heads
    qkv_rows = (heads + 2 * cfg.num_query_groups) * cfg.kv_channels
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes = {
            "self_attention.linear_qkv.bias": qkv_rows,
            "self_attention.linear_proj.bias": h,
            "self_attention.core_attention.softmax_offset": heads,
            "mlp.router.bias": cfg.num_experts,
        }
        for e in range(cfg.num_experts):
            shapes[f"mlp.experts.local_experts.{e}.linear_fc1.bias"] = 2 * f
            shapes[f"mlp.experts.local_experts.{e}.linear_fc2.bias"] = h
        for name, n in shapes.items():
            std = 1.0 if name.endswith("softmax_offset") else cfg.bias_std
            weights[p + name] = tg._seeded(f"{cfg.weight_seed}|{p}{name}", (n,), std)
    return weights


def build(cfg: TinyGptOssConfig = TINY, *, sequence_parallel: bool = False):
    """This rank's GPT-OSS GPTModel loaded with ``global_weights`` (call ``tiny_moe.init_moe_parallel`` first)."""
    tiny_moe.install_moe_cpu_shims()
    config = transformer_config(cfg, sequence_parallel=sequence_parallel)
    weights = global_weights(cfg)
    sinks = {k: weights.pop(k) for k in list(weights) if k.endswith("softmax_offset")}
    return tg._build_loaded(
        cfg, config, weights | _local_sinks(sinks), num_experts=cfg.num_experts, moe_grouped_gemm=False
    )


def _local_sinks(sinks: dict) -> dict:
    """megatron keeps this rank's heads of the sinks in a parameter not tagged tensor-parallel (loaded whole by
    ``tiny_gpt.load_weights``): slice the heads here."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return {k: v.chunk(tp)[rank].clone() for k, v in sinks.items()}


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return tg.megatron_logits(model, tokens)


# ----------------------------------------------------------------------- HF side


def _split_qkv(cfg, t: torch.Tensor) -> list[torch.Tensor]:
    """linear_qkv rows per query group g: [q heads of g; k_g; v_g] -> q, k, v (weights and biases alike)."""
    d, hpg = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    grouped = t.reshape(cfg.num_query_groups, (hpg + 2) * d, *t.shape[1:])
    return [x.reshape(-1, *t.shape[1:]) for x in torch.split(grouped, [hpg * d, d, d], dim=1)]


def _interleave(fused: torch.Tensor) -> torch.Tensor:
    """Megatron fc1 rows [gate; up] -> rows gate_0, up_0, gate_1, up_1, ... (transformers' gate_up order)."""
    gate, up = fused.chunk(2, dim=0)
    return torch.stack([gate, up], dim=1).flatten(0, 1)


def hf_state_dict(cfg: TinyGptOssConfig, w: dict) -> dict:
    """Megatron global names/layouts -> transformers gpt_oss, by the layout facts in the module docstring."""
    sd = {
        "model.embed_tokens.weight": w["embedding.word_embeddings.weight"],
        "model.norm.weight": w["decoder.final_layernorm.weight"],
        "lm_head.weight": w["output_layer.weight"],
    }
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = _split_qkv(cfg, w[m + f"self_attention.linear_qkv.{kind}"])
            sd |= {
                h + f"self_attn.q_proj.{kind}": q,
                h + f"self_attn.k_proj.{kind}": k,
                h + f"self_attn.v_proj.{kind}": v,
            }
            sd[h + f"self_attn.o_proj.{kind}"] = w[m + f"self_attention.linear_proj.{kind}"]
            sd[h + f"mlp.router.{kind}"] = w[m + f"mlp.router.{kind}"]
        sd[h + "self_attn.sinks"] = w[m + "self_attention.core_attention.softmax_offset"]
        sd[h + "input_layernorm.weight"] = w[m + "input_layernorm.weight"]
        sd[h + "post_attention_layernorm.weight"] = w[m + "pre_mlp_layernorm.weight"]
        expert = [f"{m}mlp.experts.local_experts.{e}." for e in range(cfg.num_experts)]
        sd[h + "mlp.experts.gate_up_proj"] = torch.stack([_interleave(w[x + "linear_fc1.weight"]).T for x in expert])
        sd[h + "mlp.experts.gate_up_proj_bias"] = torch.stack([_interleave(w[x + "linear_fc1.bias"]) for x in expert])
        sd[h + "mlp.experts.down_proj"] = torch.stack([w[x + "linear_fc2.weight"].T for x in expert])
        sd[h + "mlp.experts.down_proj_bias"] = torch.stack([w[x + "linear_fc2.bias"] for x in expert])
    return {k: v.clone().contiguous() for k, v in sd.items()}


def hf_config(cfg: TinyGptOssConfig = TINY) -> GptOssConfig:
    config = GptOssConfig(
        **tg.hf_config_fields(cfg),
        intermediate_size=cfg.moe_ffn_hidden_size,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.moe_router_topk,
        sliding_window=cfg.sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_layers)],
        swiglu_limit=cfg.swiglu_limit,
        attention_bias=True,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        pad_token_id=None,
    )
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def hf_twin(cfg: TinyGptOssConfig = TINY) -> GptOssForCausalLM:
    """The transformers model computing what ``build(cfg)`` computes (eager attention with sinks, float32)."""
    model = GptOssForCausalLM(hf_config(cfg)).float()
    model.load_state_dict(hf_state_dict(cfg, global_weights(cfg)), strict=True)
    return model.eval()


def compare_peft(adapter_dir, cfg: TinyGptOssConfig, tokens, logits, atol=1e-5) -> float:
    """``tiny_gpt.compare_peft`` on the GPT-OSS twin."""
    return tg.compare_peft(adapter_dir, cfg, tokens, logits, atol=atol, base=hf_twin(cfg))


def rank0() -> bool:
    return dist.get_rank() == 0
