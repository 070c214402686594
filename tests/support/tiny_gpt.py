"""A tiny Llama-like megatron-core GPT on CPU and its independent HF twin.

Parity tests need two models that provably compute the same function: a
megatron-core GPT (any TP/PP/VPP/DP layout) and a transformers model, both
loaded from one deterministic set of global weights by code written here
from layout facts, not by the package under test. Call these from ranks
started by ``multiprocess.run_ranks`` (gloo world already up, CPU shims on).

Everything is imported at module level on purpose: importing this module in
the pytest parent (~7 s) makes each forked rank start in a fraction of a
second instead of re-importing transformers and modelopt lazily.
"""

import dataclasses
import json
import re
import zlib
from pathlib import Path

import modelopt.torch.peft as mtp
import peft
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.activations import squared_relu
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    model_parallel_cuda_manual_seed,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from safetensors.torch import load_file
from transformers import ArceeConfig, ArceeForCausalLM, LlamaConfig, LlamaForCausalLM

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT_RE = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(\..*)$")
_GROUPED_EXPERT_RE = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
# Fused kernels are CUDA-only (or apex/TE); the CPU path needs every one off.
_NO_FUSIONS = dict.fromkeys(
    (
        "bias_activation_fusion",
        "bias_dropout_fusion",
        "masked_softmax_fusion",
        "gradient_accumulation_fusion",
        "persist_layer_norm",
        "apply_rope_fusion",
    ),
    False,
)


@dataclasses.dataclass(frozen=True)
class TinyGPTConfig:
    """Geometry of the tiny model; vary it with ``dataclasses.replace``.

    gated_linear_unit=True is SwiGLU (HF twin: Llama); False is a plain
    up/down MLP with squared ReLU (HF twin: Arcee, a Llama with that MLP).
    """

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 8
    num_query_groups: int = 4
    kv_channels: int = 8
    ffn_hidden_size: int = 96
    vocab_size: int = 128
    seq_length: int = 16
    gated_linear_unit: bool = True
    rotary_base: int = 10000
    layernorm_epsilon: float = 1e-5
    weight_seed: int = 1234


def sample_tokens(cfg: TinyGPTConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Deterministic token ids [batch, seq_length] (same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), generator=gen)


# ----------------------------------------------------------------- megatron side


def init_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234) -> None:
    """(Re)initialize megatron's parallel groups on the running gloo world; DP fills the rest."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp, vpp, create_gloo_process_groups=False)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def transformer_config(cfg: TinyGPTConfig, *, sequence_parallel: bool = False, **extra):
    """The TransformerConfig for ``cfg`` at the current parallel layout, CPU-safe.

    ``extra``: further TransformerConfig fields not set here (tiny_moe passes the MoE ones).
    """
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=F.silu if cfg.gated_linear_unit else squared_relu,
        add_bias_linear=False,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.layernorm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        **_NO_FUSIONS,
        **extra,
    )


class _SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm taking megatron's norm arguments; megatron's torch-norm wrapper refuses SP."""

    def __init__(self, config, hidden_size, eps=1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def _layer_spec(config, vp_stage, experts_spec=None, **spec_kwargs):
    """Local layer spec (``spec_kwargs`` go to get_gpt_layer_local_spec, e.g. num_experts).

    ``experts_spec`` replaces the MoE layer's experts module spec (tiny_moe's grouped experts).
    """
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", **spec_kwargs)
    if experts_spec is not None:
        spec.submodules.mlp.submodules.experts = experts_spec
    if not config.sequence_parallel:
        return spec
    spec.submodules.input_layernorm = _SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = _SequenceParallelRMSNorm
    attention = spec.submodules.self_attention.submodules
    for qk_norm in ("q_layernorm", "k_layernorm"):
        if getattr(attention, qk_norm) is not IdentityOp:
            setattr(attention, qk_norm, _SequenceParallelRMSNorm)
    n_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules([spec] * n_layers, layer_norm=_SequenceParallelRMSNorm)


def _chunks(model_or_chunks) -> list:
    if isinstance(model_or_chunks, (list, tuple)):
        return list(model_or_chunks)
    return [model_or_chunks]


def _global_name(chunk, local_name: str) -> str:
    """Local parameter name -> name at PP=1 (layer index = layer.layer_number - 1) and EP=1.

    Under EP a rank's ``mlp.experts.local_experts.{e}`` is global expert
    ``mlp.local_expert_indices[e]`` (SequentialMLP experts); a grouped linear's
    ``mlp.experts.linear_fc1.weight{e}`` (TEGroupedMLP) is named like that expert's
    SequentialMLP weight, ``mlp.experts.local_experts.{global e}.linear_fc1.weight``.
    """
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    layer = chunk.decoder.layers[int(m.group(1))]
    rest = m.group(2)
    e = _LOCAL_EXPERT_RE.match(rest)
    if e:
        rest = f"{e.group(1)}{layer.mlp.local_expert_indices[int(e.group(2))]}{e.group(3)}"
    grouped = _GROUPED_EXPERT_RE.match(rest)
    if grouped:
        expert = layer.mlp.local_expert_indices[int(grouped.group(2))]
        rest = f"mlp.experts.local_experts.{expert}.{grouped.group(1)}.weight"
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def _tp_group(model, param_name: str):
    """The group a TP-tagged parameter is sharded over: its module's ``tp_group``.

    Megatron's linears record it (routed-expert linears: the expert-TP group;
    TE grouped linears as ``_tp_group``; everything else: the TP group);
    modules without one use the TP group.
    """
    owner = model.get_submodule(param_name.rpartition(".")[0])
    group = getattr(owner, "tp_group", None) or getattr(owner, "_tp_group", None)
    return ps.get_tensor_model_parallel_group() if group is None else group


def _fc1_width(cfg, global_name: str):
    """Unfused output width of the linear_fc1 ``global_name`` belongs to."""
    if ".mlp.experts." in global_name:
        return cfg.moe_ffn_hidden_size
    if ".mlp.shared_experts." in global_name:
        return cfg.moe_shared_expert_intermediate_size
    return cfg.ffn_hidden_size


def _partition(param, cfg, global_name: str, group=None):
    """(partition_dim or None, stride, global shape) of ``param`` under TP.

    Megatron's stride rule: split dim into stride * TP equal blocks, rank t owns
    blocks t, t + TP, ... The gated fc1 shard is [gate_t; up_t] (stride 2);
    megatron tags its base weight so, but not a LoRA B / magnitude on fc1, so
    any dim-0 tensor spanning fc1's fused outputs that is not input-side
    (A / linear_in) gets stride 2 too (dense, shared-expert and expert fc1).
    ``cfg``: TinyGPTConfig, TinyMoEConfig or TransformerConfig; ``group``: the
    group ``param`` is sharded over (default TP; see ``_tp_group``).
    """
    if not getattr(param, "tensor_model_parallel", False):
        return None, 1, tuple(param.shape)
    dim, shape = param.partition_dim, list(param.shape)
    group = ps.get_tensor_model_parallel_group() if group is None else group
    shape[dim] *= dist.get_world_size(group)
    stride = getattr(param, "partition_stride", 1)
    fused_fc1_out = (
        cfg.gated_linear_unit
        and ".linear_fc1." in global_name
        and not any(s in global_name for s in ("lora_a", "lora_A", "linear_in"))
        and shape[0] == 2 * _fc1_width(cfg, global_name)
    )
    return dim, (2 if dim == 0 and fused_fc1_out else stride), tuple(shape)


def _load_into(param, full: torch.Tensor, dim, stride: int, name: str, group=None) -> None:
    """Copy this rank's slice (over ``group``, default TP) of the global tensor ``full`` into ``param``."""
    if dim is not None:
        group = ps.get_tensor_model_parallel_group() if group is None else group
        tp, rank = dist.get_world_size(group), dist.get_rank(group)
        assert full.shape[dim] % (tp * stride) == 0, (name, full.shape, dim, tp, stride)
        blocks = torch.split(full, full.shape[dim] // (tp * stride), dim)
        full = torch.cat(blocks[rank::tp], dim)
    assert full.shape == param.shape, f"{name}: slice {tuple(full.shape)} vs {tuple(param.shape)}"
    with torch.no_grad():
        param.copy_(full)


def _seeded(seed_text: str, shape, std: float, mean: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(seed_text.encode()))
    return torch.randn(shape, generator=gen) * std + mean


def global_base_weights(cfg: TinyGPTConfig) -> dict:
    """{megatron parameter name at TP=1/PP=1: tensor}, a pure function of ``cfg``.

    Each tensor is seeded from its own name, so the weights are identical
    whatever the layout or the order of generation. Linear std 0.1 keeps
    logits O(1); norm weights 1 +- 0.1 so a transposed norm cannot hide.
    """
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    heads_dim = cfg.num_attention_heads * cfg.kv_channels
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels
    shapes = {
        "embedding.word_embeddings.weight": (cfg.vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        "output_layer.weight": (cfg.vocab_size, h),
    }
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.linear_qkv.weight"] = (qkv_rows, h)
        shapes[p + "self_attention.linear_proj.weight"] = (h, heads_dim)
        shapes[p + "pre_mlp_layernorm.weight"] = (h,)
        shapes[p + "mlp.linear_fc1.weight"] = ((2 if cfg.gated_linear_unit else 1) * f, h)
        shapes[p + "mlp.linear_fc2.weight"] = (h, f)
    return {
        name: _seeded(f"{cfg.weight_seed}|{name}", shape, 0.1, 1.0 if len(shape) == 1 else 0.0)
        for name, shape in shapes.items()
    }


def build_gpt(cfg: TinyGPTConfig, *, sequence_parallel: bool = False):
    """This rank's GPTModel (a list of chunks under VPP) loaded with ``global_base_weights``."""
    config = transformer_config(cfg, sequence_parallel=sequence_parallel)
    return _build_loaded(cfg, config, global_base_weights(cfg))


def _build_loaded(cfg, config, weights: dict, experts_spec=None, **spec_kwargs):
    """This rank's GPTModel chunk(s) for ``config``, each parameter sliced from ``weights``.

    ``weights`` is keyed by global names (``_global_name``); ``spec_kwargs`` go to
    ``_layer_spec``. Shared by build_gpt and tiny_moe.build_moe_gpt.
    """
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config,
            _layer_spec(config, stage, experts_spec, **spec_kwargs),
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=cfg.rotary_base,
            vp_stage=stage,
        )
        load_weights(model, weights)
        chunks.append(model)
    return chunks if vpp else chunks[0]


def load_weights(model, weights: dict) -> None:
    """Copy this rank's slice of each global tensor in ``weights`` (keyed by ``_global_name``) into ``model``'s
    parameters.

    Every parameter of ``model`` (one chunk, before any LoRA is added) must have a weight.
    """
    config = model.config
    for name, param in model.named_parameters():
        gname = _global_name(model, name)
        assert gname in weights, f"no base weight for {gname}"
        group = _tp_group(model, name)
        dim, stride, _ = _partition(param, config, gname, group)
        _load_into(param, weights[gname], dim, stride, gname, group)


def fill_lora_random(model_or_chunks, seed: int) -> None:
    """Give every adapter parameter layout-independent random values.

    Adapter parameters are those whose name contains "lora" or ".adapter.".
    Each one's GLOBAL tensor (global layer index, TP=1 shape) is drawn from a
    seed derived from ``seed``, its global name and global shape, then this
    rank's slice is copied in, so TP=2 computes exactly what TP=1 does.
    Slicing rule: params tagged ``tensor_model_parallel`` are split on
    ``partition_dim`` (megatron stride rule, see ``_partition``); untagged ones
    are replicated. A dim-0-sharded output-side tensor on gated linear_fc1
    (LoRA B, adapter linear_out, DoRA magnitude) is sliced [gate_t; up_t] like
    the base weight. Matrices get normal * 0.05; 1-D tensors (magnitudes)
    1 + normal * 0.05. MoE: the global name carries the GLOBAL expert index
    (``_global_name``) and a tagged tensor is split over its own module's
    ``tp_group`` (``_tp_group``: expert TP for routed-expert linears).
    """
    for chunk in _chunks(model_or_chunks):
        for name, param in chunk.named_parameters():
            if "lora" not in name and ".adapter." not in name:
                continue
            group = _tp_group(chunk, name)
            for gname, tensor in _per_expert(chunk, name, param):
                dim, stride, gshape = _partition(tensor, chunk.config, gname, group)
                mean = 1.0 if len(gshape) == 1 else 0.0
                full = _seeded(f"{seed}|{gname}|{gshape}", gshape, 0.05, mean)
                _load_into(tensor, full, dim, stride, gname, group)


def _per_expert(chunk, name: str, param):
    """(global name, tensor) pairs to fill: the parameter itself, or, for a 3-D grouped-expert adapter
    ([local experts, ...], Megatron-Bridge's per-expert LoRA), one view per local expert named with its
    GLOBAL expert index (so experts differ and every EP layout draws the same values), TP-tagged like a 2-D one.
    """
    gname = _global_name(chunk, name)
    if param.dim() != 3:
        return [(gname, param)]
    layer = chunk.decoder.layers[int(_LAYER_RE.match(name).group(1))]
    pairs = []
    for k, index in enumerate(layer.mlp.local_expert_indices):
        view = param.data[k]
        if getattr(param, "tensor_model_parallel", False):
            view.tensor_model_parallel, view.partition_dim = True, param.partition_dim - 1
        pairs.append((gname.replace(".mlp.experts.", f".mlp.experts.local_experts.{index}.", 1), view))
    return pairs


def apply_modelopt_lora(
    model_or_chunks,
    *,
    rank: int = 8,
    scale: float = 2.0,
    adapter_name: str = "default",
    targets=("*linear_qkv*", "*linear_proj*", "*linear_fc1*", "*linear_fc2*"),
    extra_patterns: dict | None = None,
):
    """Add one named ModelOpt LoRA adapter to every chunk; returns the model(s).

    ``extra_patterns`` maps more module patterns (e.g. "*output_layer*",
    "*layers.0.*linear_qkv*") to overrides such as {"rank": 4}; each is a full
    spec (defaults rank/scale/enable=True) and, like all ModelOpt patterns,
    later ones win. Patterns match LOCAL module names: under PP a layer index
    is the index within the stage/chunk, so per-layer patterns depend on the
    layout. Call again with another ``adapter_name`` to stack adapters.
    """
    spec = {"rank": rank, "scale": scale, "enable": True}
    adapter_cfg = {pattern: dict(spec) for pattern in targets}
    for pattern, override in (extra_patterns or {}).items():
        adapter_cfg[pattern] = {**spec, **override}
    for chunk in _chunks(model_or_chunks):
        mtp.update_model(chunk, {"adapter_name": adapter_name, "adapter_cfg": adapter_cfg})
    return model_or_chunks


def megatron_logits(model_or_chunks, tokens: torch.Tensor) -> torch.Tensor:
    """Full [batch, seq, vocab] float32 logits on every rank, via megatron's schedule.

    Runs forward-only through get_forward_backward_func (1F1B / interleaved
    under PP), one sample per microbatch, with an explicit causal mask (the
    default one is built on "cuda") and position ids; gathers the
    vocab-parallel logits over TP and broadcasts them from the lowest
    last-stage rank to the whole world. Leaves the model in eval mode.
    """
    chunks = _chunks(model_or_chunks)
    for chunk in chunks:
        chunk.eval()
    batch, seq = tokens.shape
    # The interleaved schedule wants a multiple of PP microbatches; extra ones are dropped.
    pp = ps.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    n_micro = -(-batch // pp) * pp
    micro = [tokens[i % batch : i % batch + 1] for i in range(n_micro)]
    position_ids = torch.arange(seq).unsqueeze(0)
    causal_mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), position_ids, causal_mask)
        return output, lambda out, non_loss_data=False: out

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in chunks],
            model=chunks,
            num_microbatches=n_micro,
            seq_length=seq,
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
    src = torch.tensor(dist.get_rank() if is_last else dist.get_world_size())
    dist.all_reduce(src, op=dist.ReduceOp.MIN)
    if is_last:
        logits = torch.cat(list(collected)[:batch], dim=0)
        logits = gather_from_tensor_model_parallel_region(logits).float().contiguous()
    else:
        logits = torch.empty(batch, seq, chunks[-1].vocab_size, dtype=torch.float32)
    dist.broadcast(logits, src=int(src))
    return logits


# ----------------------------------------------------------------------- HF side


def _hf_state_dict(cfg: TinyGPTConfig, w: dict) -> dict:
    """Megatron names/layouts -> HF Llama names, by layout facts (see DESIGN.md)."""
    heads_per_group = cfg.num_attention_heads // cfg.num_query_groups
    d = cfg.kv_channels
    sd = {
        "model.embed_tokens.weight": w["embedding.word_embeddings.weight"],
        "model.norm.weight": w["decoder.final_layernorm.weight"],
        "lm_head.weight": w["output_layer.weight"],
    }
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        # linear_qkv rows per query group g: [q heads of g; k_g; v_g].
        qkv = w[m + "self_attention.linear_qkv.weight"]
        qkv = qkv.view(cfg.num_query_groups, -1, cfg.hidden_size)
        q, k, v = torch.split(qkv, [heads_per_group * d, d, d], dim=1)
        sd[h + "self_attn.q_proj.weight"] = q.reshape(-1, cfg.hidden_size)
        sd[h + "self_attn.k_proj.weight"] = k.reshape(-1, cfg.hidden_size)
        sd[h + "self_attn.v_proj.weight"] = v.reshape(-1, cfg.hidden_size)
        sd[h + "self_attn.o_proj.weight"] = w[m + "self_attention.linear_proj.weight"]
        sd[h + "input_layernorm.weight"] = w[m + "input_layernorm.weight"]
        sd[h + "post_attention_layernorm.weight"] = w[m + "pre_mlp_layernorm.weight"]
        fc1 = w[m + "mlp.linear_fc1.weight"]
        if cfg.gated_linear_unit:
            sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"] = fc1.chunk(2, dim=0)
        else:
            sd[h + "mlp.up_proj.weight"] = fc1
        sd[h + "mlp.down_proj.weight"] = w[m + "mlp.linear_fc2.weight"]
    return {k: v.clone() for k, v in sd.items()}


def hf_config_fields(cfg: TinyGPTConfig) -> dict:
    """The HF config fields every twin takes from the Megatron geometry: sizes, attention, norm, rope, untied
    embeddings."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )


def hf_llama_twin(cfg: TinyGPTConfig):
    """The HF model computing what ``build_gpt(cfg)`` computes (eager attention, float32).

    LlamaForCausalLM for SwiGLU; ArceeForCausalLM (Llama with a non-gated
    up/down squared-ReLU MLP, same module names) when gated_linear_unit=False.
    """
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM)
    if not cfg.gated_linear_unit:
        config_cls, model_cls = ArceeConfig, ArceeForCausalLM
    config = config_cls(
        **hf_config_fields(cfg),
        intermediate_size=cfg.ffn_hidden_size,
        hidden_act="silu" if cfg.gated_linear_unit else "relu2",
        attention_bias=False,
        mlp_bias=False,
    )
    config._attn_implementation = "eager"
    model = model_cls(config).float()
    model.load_state_dict(_hf_state_dict(cfg, global_base_weights(cfg)), strict=True)
    return model.eval()


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq, vocab] float32 logits of an HF (or PEFT) causal LM."""
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def compare_peft(
    adapter_dir, cfg, tokens, megatron_logits, atol=1e-5, adapter_name=None, base=None, renames=()
) -> float:
    """Load ``adapter_dir`` with peft on the HF twin (or on ``base``, an HF model) and check it against Megatron.

    ``renames``: (old, new) prefixes of the file's keys that peft renames when it loads them (Nemotron-H's
    ``backbone.`` is transformers 5's ``model.``).

    Fails if the file's keys differ from what peft's model holds (peft ignores
    unknown keys silently), if any loaded tensor differs from the file, if the
    adapter does not change the logits, or if max |HF - Megatron| > atol.
    Returns that max abs diff.
    """
    name = adapter_name or "default"
    base = hf_llama_twin(cfg) if base is None else base
    base_logits = hf_logits(base, tokens)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=name).eval()
    on_disk = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    for old, new in renames:
        on_disk = {k.replace(old, new, 1): v for k, v in on_disk.items()}
    loaded = peft.get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    missing, unused = sorted(set(loaded) - set(on_disk)), sorted(set(on_disk) - set(loaded))
    assert not missing and not unused, (
        f"adapter file and peft model disagree:\n  peft modules the file does not fill: "
        f"{json.dumps(missing, indent=1)}\n  file keys peft ignores: {json.dumps(unused, indent=1)}"
    )
    for key, tensor in on_disk.items():
        assert torch.equal(loaded[key].to(tensor.dtype), tensor), f"{key} differs after loading"
    peft_logits = hf_logits(model, tokens)
    effect = (peft_logits - base_logits).abs().max().item()
    assert effect > 1e-3, f"adapter barely changes the logits (max diff {effect:.2e})"
    diff = (peft_logits - megatron_logits.float()).abs().max().item()
    assert diff <= atol, f"HF+PEFT vs Megatron logits: max abs diff {diff:.3e} > {atol:.1e}"
    return diff
