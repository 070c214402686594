"""A tiny mixture-of-experts megatron-core GPT on CPU and its independent HF twins.

The MoE counterpart of ``tiny_gpt`` (whose pieces it reuses): a megatron-core
GPT whose every MLP is a MoELayer (router + SequentialMLP SwiGLU experts,
optionally a gated shared expert), loadable at any TP / PP / EP / expert-TP
layout from one deterministic set of GLOBAL weights, and transformers models
computing the same function, converted from those weights by code written
here from layout facts, not by the package under test. Call these from ranks
started by ``multiprocess.run_ranks`` (gloo world up, CPU shims on).

Routing math (all families; megatron's router set to match exactly):
    probs = softmax(router(x)) over all experts; keep the top-k;
    renormalize them to sum 1 iff ``norm_topk_prob``.
Megatron computes the renormalized form as softmax over the top-k logits
(``moe_router_pre_softmax=False``), the same numbers; without renormalization
it takes the top-k of the full softmax (``moe_router_pre_softmax=True``).
No aux loss (coefficient 0, load balancing "none"), no token dropping
(capacity factor None), no router bias, no expert bias, no jitter.

HF twins (transformers 5.x; experts are FUSED 3-D parameters there):
    mixtral    MixtralForCausalLM    always renormalizes; no qk-norm, no shared expert
    qwen3_moe  Qwen3MoeForCausalLM   qk-norm (RMSNorm per head) required; norm_topk_prob
    qwen2_moe  Qwen2MoeForCausalLM   shared expert with a sigmoid gate required; norm_topk_prob
with ``model.layers.{i}.mlp.gate.weight`` [E, hidden] (the router),
``model.layers.{i}.mlp.experts.gate_up_proj`` [E, 2*moe_ffn, hidden] (rows
[gate; up], applied as F.linear(x, W[e])), ``...mlp.experts.down_proj``
[E, hidden, moe_ffn]; Qwen2-MoE adds ``mlp.shared_expert.{gate,up,down}_proj``
and ``mlp.shared_expert_gate`` [1, hidden].
"""

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed, set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import TEGroupedMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from . import tiny_gpt as tg
from .cpu_shims import install_moe_cpu_shims
from .tiny_gpt import apply_modelopt_lora, hf_logits, sample_tokens  # noqa: F401  (re-exported)

FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")

# ModelOpt LoRA patterns (fnmatch on local module names) for attention plus every
# ROUTED expert's fc1 / fc2. Beware: "*experts*linear_fc1*" also matches the
# shared expert (mlp.shared_experts.linear_fc1).
ROUTED_EXPERT_TARGETS = ("*.local_experts.*.linear_fc1", "*.local_experts.*.linear_fc2")
EXPERT_LORA_TARGETS = ("*linear_qkv*", "*linear_proj*", *ROUTED_EXPERT_TARGETS)


@dataclasses.dataclass(frozen=True)
class TinyMoEConfig(tg.TinyGPTConfig):
    """TinyGPTConfig plus the MoE geometry; every layer's MLP is a MoE layer.

    Experts are SwiGLU (gated_linear_unit must stay True); ``ffn_hidden_size``
    is unused. ``moe_shared_expert_intermediate_size`` > 0 adds a shared
    expert with a sigmoid gate (Qwen2-MoE); ``qk_layernorm`` adds per-head
    RMSNorm on q and k (Qwen3-MoE). Field names follow TransformerConfig so
    ``tiny_gpt._partition`` reads either.
    """

    num_experts: int = 4
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 32
    moe_shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    qk_layernorm: bool = False
    moe_token_dispatcher_type: str = "alltoall"
    # Causal attention gives late layers a strong shared direction, so routing
    # can collapse onto one expert; with seed 8 every expert of every layer gets
    # >= 8 of the 32 sample tokens in all the presets below (margin >= 2.9e-4).
    weight_seed: int = 8


# Configs each HF family can twin (see hf_moe_twin).
MIXTRAL_LIKE = TinyMoEConfig()
QWEN3_MOE_LIKE = TinyMoEConfig(qk_layernorm=True)
QWEN2_MOE_LIKE = TinyMoEConfig(moe_shared_expert_intermediate_size=48)


def default_family(cfg: TinyMoEConfig) -> str:
    """The HF family whose architecture ``cfg`` describes."""
    if cfg.moe_shared_expert_intermediate_size:
        return "qwen2_moe"
    return "qwen3_moe" if cfg.qk_layernorm else "mixtral"


# ----------------------------------------------------------------- megatron side


def init_moe_parallel(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, seed: int = 1234) -> None:
    """(Re)initialize megatron's groups with expert parallelism; DP fills the rest.

    ``etp`` is the expert tensor-parallel size (None: megatron's default, = tp).
    Also installs the MoE CPU shims in this process.
    """
    install_moe_cpu_shims()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tp,
        pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        create_gloo_process_groups=False,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def moe_transformer_config(cfg: TinyMoEConfig, *, sequence_parallel: bool = False):
    """tiny_gpt's CPU-safe TransformerConfig plus MoE settings matching the HF routing math."""
    assert cfg.gated_linear_unit, "tiny MoE experts are SwiGLU"
    shared = cfg.moe_shared_expert_intermediate_size
    return tg.transformer_config(
        cfg,
        sequence_parallel=sequence_parallel,
        qk_layernorm=cfg.qk_layernorm,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=shared or None,
        moe_shared_expert_gate=bool(shared),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not cfg.norm_topk_prob,
        moe_router_topk_scaling_factor=None,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_input_jitter_eps=None,
        moe_expert_capacity_factor=None,
        moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
    )


def global_moe_base_weights(cfg: TinyMoEConfig) -> dict:
    """{megatron parameter name at TP=PP=EP=1: tensor}, a pure function of ``cfg``.

    Keys carry the GLOBAL layer index and the GLOBAL expert index
    (``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight``
    at EP=1). Attention, norms, embedding and output come from
    ``tiny_gpt.global_base_weights`` (same names, same values); the MoE
    tensors are seeded from their own names the same way: linears std 0.1,
    norm weights 1 +- 0.1. fc1 rows are [gate; up] (the TP=1 layout).
    """
    base = tg.global_base_weights(cfg)
    weights = {k: v for k, v in base.items() if ".mlp.linear_fc" not in k}
    h, f, s = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.moe_shared_expert_intermediate_size
    shapes = {}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        if cfg.qk_layernorm:
            shapes[p + "self_attention.q_layernorm.weight"] = (cfg.kv_channels,)
            shapes[p + "self_attention.k_layernorm.weight"] = (cfg.kv_channels,)
        shapes[p + "mlp.router.weight"] = (cfg.num_experts, h)
        for e in range(cfg.num_experts):
            shapes[p + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (2 * f, h)
            shapes[p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (h, f)
        if s:
            shapes[p + "mlp.shared_experts.linear_fc1.weight"] = (2 * s, h)
            shapes[p + "mlp.shared_experts.linear_fc2.weight"] = (h, s)
            shapes[p + "mlp.shared_experts.gate_weight"] = (1, h)
    for name, shape in shapes.items():
        mean = 1.0 if len(shape) == 1 else 0.0
        weights[name] = tg._seeded(f"{cfg.weight_seed}|{name}", shape, 0.1, mean)
    return weights


class CpuGroupedLinear(torch.nn.Module):
    """Transformer Engine's GroupedLinear as megatron's TEGroupedLinear uses it for experts, on CPU.

    ``weight0..weight{num_gemms-1}``, one [out, in] matrix per local expert, sliced over the expert-TP
    group with megatron's tensor-parallel attributes; ``forward(x, m_splits)`` applies weight i to the
    i-th run of tokens and returns ``(out, None)``. No communication: TEGroupedLinear makes TE
    parallel-agnostic for experts (``explicit_expert_comm``) and the token dispatcher gathers and
    reduces across expert TP. Attribute names follow megatron's class (``num_gemms``, ``_tp_group``,
    ``explicit_expert_comm``, local ``in_features`` / ``out_features``).
    """

    PARTITION_DIM = 0

    def __init__(
        self,
        num_gemms,
        input_size,
        output_size,
        *,
        config,
        init_method,
        bias,
        skip_bias_add,
        is_expert=True,
        tp_comm_buffer_name=None,
        pg_collection=None,
    ):
        super().__init__()
        assert is_expert and not bias, "stand-in for bias-free expert linears"
        self.config, self.num_gemms = config, num_gemms
        self._tp_group = pg_collection.expt_tp
        self._pg_collection = pg_collection
        tp = self._tp_group.size()
        self.explicit_expert_comm = tp > 1 or config.expert_model_parallel_size > 1
        sizes = [output_size, input_size]
        sizes[self.PARTITION_DIM] //= tp
        self.out_features, self.in_features = sizes
        for i in range(num_gemms):
            weight = torch.nn.Parameter(torch.empty(sizes, dtype=config.params_dtype))
            set_tensor_model_parallel_attributes(weight, True, self.PARTITION_DIM, 1)
            weight.allreduce = not self.explicit_expert_comm
            self.register_parameter(f"weight{i}", weight)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Nothing: the grouped base weights are not saved here (Bridge's checkpoints hold the adapters only)."""
        return {}

    def forward(self, x, m_splits):
        pieces = torch.split(x, [int(n) for n in m_splits])
        return torch.cat([F.linear(piece, getattr(self, f"weight{i}")) for i, piece in enumerate(pieces)]), None


class CpuGroupedColumnLinear(CpuGroupedLinear):
    """TEColumnParallelGroupedLinear (expert fc1): output rows split over expert TP."""


class CpuGroupedRowLinear(CpuGroupedLinear):
    """TERowParallelGroupedLinear (expert fc2): input columns split over expert TP, partial sums out."""

    PARTITION_DIM = 1


GROUPED_EXPERTS = ModuleSpec(
    module=TEGroupedMLP, submodules=MLPSubmodules(linear_fc1=CpuGroupedColumnLinear, linear_fc2=CpuGroupedRowLinear)
)
"""megatron's TEGroupedMLP (``mlp.experts.linear_fc{1,2}.weight{e}``) with the CPU grouped linears above."""


def build_moe_gpt(cfg: TinyMoEConfig, *, sequence_parallel: bool = False, grouped_experts: bool = False):
    """This rank's MoE GPTModel (a list of chunks under VPP) loaded with ``global_moe_base_weights``.

    Local layer spec with SequentialMLP experts (``mlp.experts.local_experts.{e}``,
    e local; global index ``mlp.local_expert_indices[e]``) and ``mlp.router``;
    ``grouped_experts``: megatron's TEGroupedMLP instead (``GROUPED_EXPERTS``), the
    same function with the same weights (local expert e is ``weight{e}``).
    Expert linears are sliced over the expert-TP group (their ``tp_group``),
    everything else over TP; the router (and shared-expert gate) is
    replicated. TP > 1 with MoE wants ``sequence_parallel=True`` (megatron
    refuses TP without SP for MoE in training).
    """
    install_moe_cpu_shims()
    config = moe_transformer_config(cfg, sequence_parallel=sequence_parallel)
    return tg._build_loaded(
        cfg,
        config,
        global_moe_base_weights(cfg),
        num_experts=cfg.num_experts,
        experts_spec=GROUPED_EXPERTS if grouped_experts else None,
        moe_grouped_gemm=False,
        qk_layernorm=cfg.qk_layernorm,
    )


def megatron_moe_logits(model_or_chunks, tokens: torch.Tensor) -> torch.Tensor:
    """Full [batch, seq, vocab] float32 logits on every rank (``tiny_gpt.megatron_logits``)."""
    return tg.megatron_logits(model_or_chunks, tokens)


def fill_moe_lora_random(model_or_chunks, seed: int) -> None:
    """``tiny_gpt.fill_lora_random`` (now MoE-aware), named for symmetry.

    Each adapter tensor's GLOBAL value is seeded by ``seed``, its global name
    (global layer AND global expert index) and global shape; this rank's
    slice is taken over the group the tensor's own module is sharded on (its
    ``tp_group``: expert TP for megatron's expert linears; ModelOpt's LoRA
    sub-layers are built without one, i.e. on the regular TP group).
    """
    tg.fill_lora_random(model_or_chunks, seed)


def expert_parallel_info() -> dict:
    """This rank's TP/EP/ETP coordinates (handy in test reports)."""
    return {
        "rank": dist.get_rank(),
        "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
        "etp": (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
        "pp": (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
    }


# ----------------------------------------------------------------------- HF side


def _check_family(cfg: TinyMoEConfig, family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}; expected one of {FAMILIES}")
    problems = []
    if (family == "qwen3_moe") != cfg.qk_layernorm:
        problems.append(f"qk_layernorm={cfg.qk_layernorm} (only qwen3_moe has q/k norms, always)")
    if (family == "qwen2_moe") != bool(cfg.moe_shared_expert_intermediate_size):
        problems.append(
            f"moe_shared_expert_intermediate_size={cfg.moe_shared_expert_intermediate_size} "
            "(only qwen2_moe has a (gated) shared expert, always)"
        )
    if family == "mixtral" and not cfg.norm_topk_prob:
        problems.append("norm_topk_prob=False (Mixtral always renormalizes the top-k)")
    if problems:
        raise ValueError(f"{family} cannot twin this TinyMoEConfig: " + "; ".join(problems))


def hf_moe_state_dict(cfg: TinyMoEConfig, w: dict, family: str) -> dict:
    """Megatron global names/layouts -> HF v5 MoE names, by layout facts.

    Attention, norms, embedding, output: tiny_gpt's Llama mapping (same
    names in these families). Per layer: router -> ``mlp.gate.weight``;
    experts stacked on a leading expert axis in global expert order:
    ``mlp.experts.gate_up_proj[e]`` = expert e's fc1 [gate; up] (megatron's
    TP=1 row order is already HF's), ``mlp.experts.down_proj[e]`` = its fc2.
    """
    dense_cfg = dataclasses.replace(cfg, ffn_hidden_size=cfg.moe_ffn_hidden_size)
    dense_w = dict(w)
    for i in range(cfg.num_layers):  # let the dense mapper run; its mlp keys are dropped below
        p = f"decoder.layers.{i}."
        dense_w[p + "mlp.linear_fc1.weight"] = w[p + "mlp.experts.local_experts.0.linear_fc1.weight"]
        dense_w[p + "mlp.linear_fc2.weight"] = w[p + "mlp.experts.local_experts.0.linear_fc2.weight"]
    sd = {k: v for k, v in tg._hf_state_dict(dense_cfg, dense_w).items() if ".mlp." not in k}
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        experts = range(cfg.num_experts)
        sd[h + "mlp.gate.weight"] = w[m + "mlp.router.weight"]
        sd[h + "mlp.experts.gate_up_proj"] = torch.stack(
            [w[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] for e in experts]
        )
        sd[h + "mlp.experts.down_proj"] = torch.stack(
            [w[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] for e in experts]
        )
        if cfg.qk_layernorm:
            sd[h + "self_attn.q_norm.weight"] = w[m + "self_attention.q_layernorm.weight"]
            sd[h + "self_attn.k_norm.weight"] = w[m + "self_attention.k_layernorm.weight"]
        if cfg.moe_shared_expert_intermediate_size:
            gate, up = w[m + "mlp.shared_experts.linear_fc1.weight"].chunk(2, dim=0)
            sd[h + "mlp.shared_expert.gate_proj.weight"] = gate
            sd[h + "mlp.shared_expert.up_proj.weight"] = up
            sd[h + "mlp.shared_expert.down_proj.weight"] = w[m + "mlp.shared_experts.linear_fc2.weight"]
            sd[h + "mlp.shared_expert_gate.weight"] = w[m + "mlp.shared_experts.gate_weight"]
    return {k: v.clone() for k, v in sd.items()}


def hf_moe_twin(cfg: TinyMoEConfig, family: str | None = None):
    """The HF model computing what ``build_moe_gpt(cfg)`` computes (eager attention and experts, float32).

    ``family``: "mixtral", "qwen3_moe" or "qwen2_moe" (default: ``default_family(cfg)``);
    ValueError if ``cfg`` has a feature the family lacks or vice versa.
    Weights come from ``global_moe_base_weights(cfg)``, loaded strictly.
    """
    family = family or default_family(cfg)
    _check_family(cfg, family)
    common = dict(
        tg.hf_config_fields(cfg),
        hidden_act="silu",
        num_experts_per_tok=cfg.moe_router_topk,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        pad_token_id=None,
    )
    if family == "mixtral":
        config = MixtralConfig(
            **common,
            intermediate_size=cfg.moe_ffn_hidden_size,
            num_local_experts=cfg.num_experts,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
        model_cls = MixtralForCausalLM
    else:
        qwen = dict(
            common,
            intermediate_size=cfg.ffn_hidden_size,  # dense MLP width, unused: every layer is MoE
            moe_intermediate_size=cfg.moe_ffn_hidden_size,
            num_experts=cfg.num_experts,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            attention_bias=False,
        )
        if family == "qwen3_moe":
            config, model_cls = Qwen3MoeConfig(**qwen), Qwen3MoeForCausalLM
        else:
            del qwen["attention_bias"]
            config = Qwen2MoeConfig(
                **qwen,
                qkv_bias=False,
                shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
            )
            model_cls = Qwen2MoeForCausalLM
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = model_cls(config).float()
    model.load_state_dict(hf_moe_state_dict(cfg, global_moe_base_weights(cfg), family), strict=True)
    return model.eval()


def _route_summary(logits: torch.Tensor, weights: torch.Tensor, k: int) -> dict:
    """Routing facts from router logits [T, E] and the dense routing weights [T, E] it produced."""
    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, min(k + 1, probs.shape[-1]), dim=-1)
    margin = (top.values[:, k - 1] - top.values[:, k]).min().item() if k < probs.shape[-1] else 1.0
    return {"map": weights != 0, "weights": weights.float(), "margin": margin}


def hf_routing(model, tokens: torch.Tensor) -> list:
    """Per layer, what the HF twin's router decides for ``tokens`` (token order: batch-major).

    Returns [{"map": bool [batch*seq, E] (chosen experts), "weights": float
    [batch*seq, E] (the weight each expert's output gets, 0 if not chosen),
    "margin": the smallest gap between the k-th and (k+1)-th softmax prob, a
    near-tie that other rounding could route differently}] per layer.
    """
    captured = []

    def hook(module, args, output):
        logits, scores, indices = output  # [T, E], [T, k], [T, k]
        dense = torch.zeros_like(logits, dtype=torch.float32).scatter(1, indices, scores.float())
        captured.append((logits.detach(), dense))

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    try:
        hf_logits(model, tokens)
    finally:
        for handle in handles:
            handle.remove()
    k = model.config.num_experts_per_tok
    return [_route_summary(logits, dense, k) for logits, dense in captured]


def megatron_routing(model, tokens: torch.Tensor) -> dict:
    """{global layer index: routing summary as in ``hf_routing``} for this rank's layers.

    Hooks each ``mlp.router`` during ``megatron_moe_logits``; rows are put in
    HF token order (megatron's are sequence-major). Needs TP=1 (under
    sequence parallel a rank routes only its slice of the sequence).
    """
    assert ps.get_tensor_model_parallel_world_size() == 1, "megatron_routing needs TP=1"
    batch, seq = tokens.shape
    captured, handles = {}, []
    for chunk in tg._chunks(model):
        for layer in chunk.decoder.layers:

            def hook(module, args, output, index=layer.layer_number - 1):
                logits = F.linear(args[0], module.weight).reshape(-1, module.weight.shape[0])
                captured.setdefault(index, []).append((logits.detach(), output[0].detach()))

            handles.append(layer.mlp.router.register_forward_hook(hook))
    try:
        megatron_moe_logits(model, tokens)
    finally:
        for handle in handles:
            handle.remove()
    k = tg._chunks(model)[0].config.moe_router_topk
    out = {}
    for index, micro in captured.items():  # one sample per microbatch, in batch order
        logits = torch.cat([x for x, _ in micro[:batch]], dim=0)
        weights = torch.cat([w for _, w in micro[:batch]], dim=0)
        out[index] = _route_summary(logits, weights, k)
    return out


# ----------------------------------------------------------- HF PEFT on experts


def peft_expert_lora(a_per_expert, b_per_expert):
    """(lora_A.weight, lora_B.weight) that peft's ParamWrapper reads as per-expert LoRA pairs.

    ``a_per_expert[e]`` [r, in] and ``b_per_expert[e]`` [out, r] (in / out of
    the HF expert matrix W[e] applied as F.linear(x, W[e])). peft 0.21 stores
    lora_A [E*r, in] EXPERT-major (rows e*r .. e*r+r-1 are expert e) and
    lora_B [out, r*E] RANK-major (column j*E + e is expert e's column j), and
    adds scaling * B_e @ A_e to W[e], scaling = lora_alpha / r (per-expert r).
    """
    lora_a = torch.cat(list(a_per_expert), dim=0)
    lora_b = torch.stack(list(b_per_expert), dim=2)  # [out, r, E]
    return lora_a, lora_b.reshape(lora_b.shape[0], -1)


def compare_moe_peft(adapter_dir, cfg: TinyMoEConfig, tokens, megatron_logits, family=None, atol=1e-5) -> float:
    """``tiny_gpt.compare_peft`` on the MoE twin: keys match, values load, logits within ``atol``."""
    return tg.compare_peft(adapter_dir, cfg, tokens, megatron_logits, atol=atol, base=hf_moe_twin(cfg, family))
