"""Nemotron-H and Qwen3-Next for logits parity: megatron-core's own models loaded with a transformers model's weights,
run on CPU (kernels: `cpu_kernels`).

The transformers model (`hf_model`) is built from the family's tiny config with seeded weights; each TP rank's
Megatron parameters are cut from its state dict by the layout facts below (megatron-core 0.16.1, transformers 5),
written here, not taken from the package under test. `local` is the one slicing rule: split a global tensor along a
dim into named pieces, keep rank t's 1/TP of each piece, in order.

Nemotron-H (`MambaModel`): `in_proj` rank t = `[z_t; x_t; B_t; C_t; dt_t]` (HF rows `[z; x; B; C; dt]`), `conv1d`
channels `[x_t; B_t; C_t]`, `A_log`/`D`/`dt_bias` heads, the gated norm's weight d_inner/TP (its groups stay within a
rank: megatron's group size is d_inner/ngroups on every TP), `out_proj` input columns; attention `linear_qkv` rows
per query group `[q heads; k; v]`; MLP `linear_fc1` rows, `linear_fc2` columns; norms are HF's `layers.{i}.norm`.
megatron's final norm is Transformer Engine's (`mamba_block.TENorm`): built here as megatron's torch norm wrapper.

Qwen3-Next (`GPTModel` with `GatedDeltaNet`): `in_proj` rank t = `[q_t; k_t; v_t; z_t; b_t; a_t]`, each the heads of
rank t (HF `in_proj_qkvz` per key head g `[q_g; k_g; v_g; z_g]`, `in_proj_ba` per key head `[b_g; a_g]`), `conv1d`
channels `[q_t; k_t; v_t]` (HF `[q; k; v]`), `A_log`/`dt_bias` value heads, `out_norm` whole (one head's width),
`out_proj` input columns; gated attention `linear_qkv` per query group `[q heads; their gates; k; v]` (HF `q_proj`
per head `[q_h; gate_h]`) with q/k norms, rotary on the first quarter of each head (`partial_rotary_factor` 0.25);
MLP `linear_fc1` rank t `[gate_t; up_t]`. HF's decoder RMSNorms multiply by `1 + weight`; megatron's torch norms (no
zero-centred gamma without Transformer Engine) get `1 + weight` as their weight; the delta-net's output norm
multiplies by its weight in both.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core import parallel_state as ps

from . import cpu_kernels
from . import tiny_hybrid as th
from . import tiny_qwen3_next as tn

LINEAR_STD = 0.15


def local(full: torch.Tensor, pieces: list[int] | None = None, dim: int = 0) -> torch.Tensor:
    """This TP rank's slice of `full`: split along `dim` into `pieces` (whole when None), rank t's 1/TP of each."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    parts = full.split(pieces or [full.shape[dim]], dim=dim)
    return torch.cat([p.chunk(tp, dim=dim)[rank] for p in parts], dim=dim)


def seeded_hf(model_class, config, seed: int = 11):
    """`model_class(config)` in float32 eval mode, eager attention, every parameter moved off its init by a seeded
    draw (1-D ones, norms, A_log, D, dt_bias: +- 0.1 around their init; the rest: std `LINEAR_STD`)."""
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(param + 0.1 * noise if param.dim() == 1 else LINEAR_STD * noise)
    return model


def load_local(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` (this rank's tensors by megatron parameter name) into `model`; every parameter needs one."""
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(weights), sorted(set(params) ^ set(weights))
    with torch.no_grad():
        for name, param in params.items():
            assert param.shape == weights[name].shape, (name, tuple(param.shape), tuple(weights[name].shape))
            param.copy_(weights[name])


# ----------------------------------------------------------------------- Nemotron-H


def nemotron_h_hf(cfg: th.TinyHybridConfig):
    from transformers import NemotronHForCausalLM

    return seeded_hf(NemotronHForCausalLM, th.hf_config(cfg))


@contextlib.contextmanager
def _torch_final_norm():
    from megatron.core.ssm import mamba_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    saved, mamba_block.TENorm = mamba_block.TENorm, WrappedTorchNorm
    try:
        yield
    finally:
        mamba_block.TENorm = saved


def build_nemotron_h(cfg: th.TinyHybridConfig, hf_state: dict[str, torch.Tensor]):
    """This rank's megatron `MambaModel` (with its final norm) holding the HF model's weights, runnable on CPU."""
    from megatron.core.models.mamba.mamba_model import MambaModel

    cpu_kernels.install_mamba_kernels()
    spec = th._stack_spec(cfg.num_experts)
    spec.params = {**spec.params, "post_layer_norm": True}
    with _torch_final_norm():
        model = MambaModel(
            th.mamba_config(cfg),
            spec,
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.seq_length,
            hybrid_override_pattern=cfg.pattern,
            position_embedding_type="none",
        )
    load_local(model, nemotron_h_weights(cfg, hf_state))
    return model.eval()


def nemotron_h_weights(cfg: th.TinyHybridConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's megatron tensors from the HF state dict (module docstring)."""
    out = {
        "embedding.word_embeddings.weight": local(sd["model.embeddings.weight"]),
        "decoder.final_norm.weight": sd["model.norm_f.weight"],
        "output_layer.weight": local(sd["lm_head.weight"]),
    }
    d_inner, bc = cfg.mamba_num_heads * cfg.mamba_head_dim, cfg.mamba_num_groups * cfg.mamba_state_dim
    for i, kind in enumerate(cfg.pattern):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        if kind == "M":
            out[m + "norm.weight"] = sd[h + "norm.weight"]
            out[m + "mixer.in_proj.weight"] = local(
                sd[h + "mixer.in_proj.weight"], [d_inner, d_inner, bc, bc, cfg.mamba_num_heads]
            )
            out[m + "mixer.conv1d.weight"] = local(sd[h + "mixer.conv1d.weight"], [d_inner, bc, bc])
            out[m + "mixer.conv1d.bias"] = local(sd[h + "mixer.conv1d.bias"], [d_inner, bc, bc])
            for name in ("dt_bias", "A_log", "D", "norm.weight"):
                out[m + "mixer." + name] = local(sd[h + "mixer." + name])
            out[m + "mixer.out_proj.weight"] = local(sd[h + "mixer.out_proj.weight"], dim=1)
        elif kind == "*":
            out[m + "input_layernorm.weight"] = sd[h + "norm.weight"]
            q, k, v = (sd[h + f"mixer.{x}_proj.weight"] for x in "qkv")
            out[m + "self_attention.linear_qkv.weight"] = local(_grouped_qkv(cfg, [q], k, v))
            out[m + "self_attention.linear_proj.weight"] = local(sd[h + "mixer.o_proj.weight"], dim=1)
        else:
            out[m + "pre_mlp_layernorm.weight"] = sd[h + "norm.weight"]
            out[m + "mlp.linear_fc1.weight"] = local(sd[h + "mixer.up_proj.weight"])
            out[m + "mlp.linear_fc2.weight"] = local(sd[h + "mixer.down_proj.weight"], dim=1)
    return out


def _grouped_qkv(cfg, q_parts: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rows per query group g: [each of q_parts' heads of g; k_g; v_g] (a group's heads are contiguous in HF)."""
    groups, width = cfg.num_query_groups, k.shape[-1]
    blocks = [part.reshape(groups, -1, width) for part in q_parts] + [x.reshape(groups, -1, width) for x in (k, v)]
    return torch.cat(blocks, dim=1).reshape(-1, width)


# ----------------------------------------------------------------------- Qwen3-Next


def qwen3_next_hf(cfg: tn.TinyNextConfig):
    from transformers import Qwen3NextForCausalLM

    config = tn.hf_config(cfg)
    config.rms_norm_eps = 1e-5
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    return seeded_hf(Qwen3NextForCausalLM, config)


def _next_spec(cfg: tn.TinyNextConfig):
    """tiny_qwen3_next's layer specs with the q/k norms of Qwen3-Next's gated attention."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layers = []
    for symbol in cfg.pattern:
        spec = tn._layer_spec(symbol, cfg.num_experts)
        if symbol != "G":
            spec.submodules.self_attention.submodules.q_layernorm = WrappedTorchNorm
            spec.submodules.self_attention.submodules.k_layernorm = WrappedTorchNorm
        layers.append(spec)
    return TransformerBlockSubmodules(layers, layer_norm=WrappedTorchNorm)


def build_qwen3_next(cfg: tn.TinyNextConfig, hf_state: dict[str, torch.Tensor]):
    """This rank's megatron GPTModel (gated delta-net and gated attention layers) holding the HF model's weights."""
    from megatron.core.models.gpt import GPTModel

    cpu_kernels.install_gated_delta_kernels()
    config = dataclasses.replace(tn.transformer_config(cfg), layernorm_epsilon=1e-5)
    model = GPTModel(
        config,
        _next_spec(cfg),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        position_embedding_type="rope",
        rotary_percent=0.25,
        rotary_base=10000,
        share_embeddings_and_output_weights=False,
    )
    load_local(model, qwen3_next_weights(cfg, hf_state))
    return model.eval()


def qwen3_next_weights(cfg: tn.TinyNextConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's megatron tensors from the HF state dict (module docstring)."""
    out = {
        "embedding.word_embeddings.weight": local(sd["model.embed_tokens.weight"]),
        "decoder.final_layernorm.weight": 1 + sd["model.norm.weight"],
        "output_layer.weight": local(sd["lm_head.weight"]),
    }
    for i, kind in enumerate(cfg.pattern):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[m + "input_layernorm.weight"] = 1 + sd[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = 1 + sd[h + "post_attention_layernorm.weight"]
        out.update(_gdn(cfg, sd, m, h + "linear_attn.") if kind == "G" else _gated_attention(cfg, sd, m, h))
        ffn = cfg.ffn_hidden_size
        gate_up = torch.cat([sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc1.weight"] = local(gate_up, [ffn, ffn])
        out[m + "mlp.linear_fc2.weight"] = local(sd[h + "mlp.down_proj.weight"], dim=1)
    return out


def _gdn(cfg: tn.TinyNextConfig, sd, m: str, h: str) -> dict[str, torch.Tensor]:
    nk, nv, dk, dv = (
        cfg.linear_num_key_heads,
        cfg.linear_num_value_heads,
        cfg.linear_key_head_dim,
        cfg.linear_value_head_dim,
    )
    width, per_key = sd[h + "in_proj_qkvz.weight"].shape[-1], nv // nk
    qkvz = sd[h + "in_proj_qkvz.weight"].reshape(nk, -1, width).split([dk, dk, per_key * dv, per_key * dv], dim=1)
    ba = sd[h + "in_proj_ba.weight"].reshape(nk, -1, width).split([per_key, per_key], dim=1)
    whole = [x.reshape(-1, width) for x in (*qkvz, *ba)]  # q, k, v, z, b, a over all heads, key head by key head
    sizes = [x.shape[0] for x in whole]
    qkv_channels = [nk * dk, nk * dk, nv * dv]
    return {
        m + "self_attention.in_proj.weight": local(torch.cat(whole), sizes),
        m + "self_attention.conv1d.weight": local(sd[h + "conv1d.weight"], qkv_channels),
        m + "self_attention.dt_bias": local(sd[h + "dt_bias"]),
        m + "self_attention.A_log": local(sd[h + "A_log"]),
        m + "self_attention.out_norm.weight": sd[h + "norm.weight"],
        m + "self_attention.out_proj.weight": local(sd[h + "out_proj.weight"], dim=1),
    }


def _gated_attention(cfg: tn.TinyNextConfig, sd, m: str, h: str) -> dict[str, torch.Tensor]:
    d, width = cfg.kv_channels, cfg.hidden_size
    q, gate = sd[h + "self_attn.q_proj.weight"].reshape(cfg.num_attention_heads, 2 * d, width).split([d, d], dim=1)
    k, v = sd[h + "self_attn.k_proj.weight"], sd[h + "self_attn.v_proj.weight"]
    return {
        m + "self_attention.linear_qkv.weight": local(_grouped_qkv(cfg, [q, gate], k, v)),
        m + "self_attention.q_layernorm.weight": 1 + sd[h + "self_attn.q_norm.weight"],
        m + "self_attention.k_layernorm.weight": 1 + sd[h + "self_attn.k_norm.weight"],
        m + "self_attention.linear_proj.weight": local(sd[h + "self_attn.o_proj.weight"], dim=1),
    }
