"""A tiny Qwen3-Next style megatron-core GPT (gated delta-net and gated attention layers) on CPU, and its HF twin.

megatron-core's GatedDeltaNet refuses to be built without `fla` (flash-linear-attention, triton kernels; its
constructor checks `HAVE_FLA`), which does not install on a CPU machine, so `install_fla_shim` puts a stand-in `fla`
into `sys.modules` before megatron imports it: `l2norm` (plain torch) and a `chunk_gated_delta_rule` that raises. The
model is megatron's own (same modules, names, shapes, TP splits), built from megatron's layer classes with its local
(non-TE) linears, since megatron's Qwen3-Next block spec asserts Transformer Engine. Tests compare weight deltas.

Layout facts for the independent delta computation (`megatron_to_hf_deltas`), megatron-core 0.16.1 and transformers
5.25:
- GatedDeltaNet.in_proj (column-parallel): rank t holds `[q_t; k_t; v_t; z_t; b_t; a_t]` (gated_delta_net.py's
  `sharded_state_dict` splits it into exactly these per rank: qk_dim/tp twice, v_dim/tp twice, value heads/tp twice).
  HF: `in_proj_qkvz` viewed as [key heads, q | k | v | z] and `in_proj_ba` as [key heads, b | a], v/z/b/a being the
  value heads of that key head (`fix_query_key_value_ordering`).
- linear_qkv with attention_output_gate: viewed as [groups, q heads | gate heads | k | v] (attention.py's
  `get_query_key_value_tensors`); HF q_proj is viewed as [heads, q | gate] (`Qwen3NextAttention.forward`).
"""

from __future__ import annotations

import dataclasses
import sys
import types

import torch

from . import tiny_hybrid as th


def install_fla_shim() -> None:
    try:
        import fla  # noqa: F401

        return
    except ImportError:
        pass

    def l2norm(x, dim=-1, eps=1e-6):
        return x / torch.sqrt((x * x).sum(dim, keepdim=True) + eps)

    def kernel(*args, **kwargs):
        raise NotImplementedError("fla kernels are not available on CPU (tests/support/tiny_qwen3_next.py)")

    for name, attributes in {
        "fla": {},
        "fla.modules": {},
        "fla.modules.l2norm": {"l2norm": l2norm},
        "fla.ops": {},
        "fla.ops.gated_delta_rule": {"chunk_gated_delta_rule": kernel},
    }.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


@dataclasses.dataclass(frozen=True)
class TinyNextConfig:
    pattern: str = "G*G*"
    """G: gated delta-net layer, *: gated attention layer."""
    hidden_size: int = 32
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int = 8
    ffn_hidden_size: int = 48
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    linear_key_head_dim: int = 8
    linear_value_head_dim: int = 6
    vocab_size: int = 64
    seq_length: int = 8
    num_experts: int = 0
    """Routed experts of every layer's MoE (softmax top-2, a shared expert with a sigmoid gate); 0: a dense MLP."""
    moe_ffn_hidden_size: int = 16
    moe_shared_expert_intermediate_size: int = 24


MOE_LIKE = TinyNextConfig(num_experts=4)
"""The real Qwen3-Next's layout: MoE in every layer."""
init_parallel = th.init_parallel


def transformer_config(cfg: TinyNextConfig):
    return th.transformer_config(
        cfg,
        gated=True,
        experimental_attention_variant="gated_delta_net",
        linear_attention_freq=[1 if s == "G" else 0 for s in cfg.pattern],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim,
        linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads,
        attention_output_gate=True,
        **th.moe_settings(cfg, shared_gate=True, sigmoid=False),
    )


def _layer_spec(symbol: str, num_experts: int):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from .tiny_gpt import _SequenceParallelRMSNorm

    if symbol == "G":
        mixer = ModuleSpec(
            module=GatedDeltaNet,
            submodules=GatedDeltaNetSubmodules(
                in_proj=ColumnParallelLinear, out_norm=_SequenceParallelRMSNorm, out_proj=RowParallelLinear
            ),
        )
    else:
        mixer = ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention, linear_proj=RowParallelLinear
            ),
        )
    mlp = ModuleSpec(
        module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )
    if num_experts:
        mlp = th.moe_layer_mlp(num_experts)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=_SequenceParallelRMSNorm,
            self_attention=mixer,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=_SequenceParallelRMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def build_next(cfg: TinyNextConfig):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from .tiny_gpt import _SequenceParallelRMSNorm

    spec = TransformerBlockSubmodules(
        [_layer_spec(s, cfg.num_experts) for s in cfg.pattern], layer_norm=_SequenceParallelRMSNorm
    )
    return GPTModel(
        transformer_config(cfg),
        spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        position_embedding_type="rope",
    )


LORA_TARGETS = ("*in_proj*", "*out_proj*", "*linear_qkv*", "*linear_proj*")
"""What exports: a dense MLP's LoRA is refused on this family (the package's Qwen3-Next name map says why)."""


def megatron_to_hf_deltas(per_rank: list[dict[str, torch.Tensor]], cfg: TinyNextConfig) -> dict[str, torch.Tensor]:
    """The whole-model delta of each HF module (`model.layers.{i}...`) from every TP rank's local deltas, by megatron's
    row layout (module docstring)."""
    per_rank = [dict(deltas) for deltas in per_rank]
    out = {
        f"model.layers.{layer.rsplit('.', 1)[-1]}.mlp.experts.{'gate_up_proj' if kind == 'fc1' else 'down_proj'}": t
        for layer, kinds in th.expert_deltas(per_rank, gated=True).items()
        for kind, t in kinds.items()
    }
    for path in per_rank[0]:
        layer, rest = path.removeprefix("decoder.layers.").split(".", 1)
        prefix = f"model.layers.{layer}."
        shards = [deltas[path] for deltas in per_rank]
        width = shards[0].shape[-1]
        mlp = "mlp.shared_expert." if rest.startswith("mlp.shared_experts.") else "mlp."
        if rest in ("self_attention.out_proj", "self_attention.linear_proj") or rest.endswith("linear_fc2"):
            name = {"self_attention.out_proj": "linear_attn.out_proj", "self_attention.linear_proj": "self_attn.o_proj"}
            out[prefix + name.get(rest, mlp + "down_proj")] = torch.cat(shards, dim=1)
        elif rest == "self_attention.in_proj":
            out.update(_gdn_in(shards, cfg, prefix + "linear_attn."))
        elif rest == "self_attention.linear_qkv":
            d, per_group = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
            groups = torch.cat([s.reshape(-1, (2 * per_group + 2) * d, width) for s in shards])
            q, gate = (groups[:, i * per_group * d : (i + 1) * per_group * d] for i in (0, 1))
            q_proj = torch.stack([q.reshape(-1, d, width), gate.reshape(-1, d, width)], dim=1)  # per head [q; gate]
            out[prefix + "self_attn.q_proj"] = q_proj.reshape(-1, width)
            out[prefix + "self_attn.k_proj"] = groups[:, 2 * per_group * d : (2 * per_group + 1) * d].reshape(-1, width)
            out[prefix + "self_attn.v_proj"] = groups[:, (2 * per_group + 1) * d :].reshape(-1, width)
        else:  # gated linear_fc1: each rank [gate_t; up_t]
            halves = [s.chunk(2) for s in shards]
            out[prefix + mlp + "gate_proj"] = torch.cat([h[0] for h in halves])
            out[prefix + mlp + "up_proj"] = torch.cat([h[1] for h in halves])
    return out


def _gdn_in(shards, cfg: TinyNextConfig, prefix: str) -> dict[str, torch.Tensor]:
    tp, width = len(shards), shards[0].shape[-1]
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    qk, v = nk * cfg.linear_key_head_dim, nv * cfg.linear_value_head_dim
    sizes = [qk // tp, qk // tp, v // tp, v // tp, nv // tp, nv // tp]
    parts = [torch.cat(p) for p in zip(*(s.split(sizes) for s in shards))]  # whole q, k, v, z, b, a
    per_key = [p.reshape(nk, -1, width) for p in parts]  # key head g's rows of each
    return {
        prefix + "in_proj_qkvz": torch.cat(per_key[:4], dim=1).reshape(-1, width),
        prefix + "in_proj_ba": torch.cat(per_key[4:], dim=1).reshape(-1, width),
    }


def hf_config(cfg: TinyNextConfig):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=len(cfg.pattern),
        layer_types=["linear_attention" if s == "G" else "full_attention" for s in cfg.pattern],
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        intermediate_size=cfg.ffn_hidden_size,
        linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=2,
        moe_intermediate_size=cfg.moe_ffn_hidden_size,
        shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=cfg.seq_length,
    )


def save_hf_base(cfg: TinyNextConfig, directory) -> None:
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(hf_config(cfg))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_((param * 1024).round() / 1024)
    model.save_pretrained(directory)


def peft_merged_deltas(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    from transformers import Qwen3NextForCausalLM

    return th.peft_merged_deltas(base_dir, adapter_dir, Qwen3NextForCausalLM)
