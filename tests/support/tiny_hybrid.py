"""A tiny Nemotron-H style hybrid (Mamba / attention / MLP layers) megatron-core model on CPU, and its HF twin.

megatron-core's MambaMixer refuses to be built without `mamba_ssm` (its constructor checks `HAVE_MAMBA_SSM`), and
its forward needs the CUDA/triton kernels of `mamba_ssm` and `causal_conv1d`. Neither installs on a CPU machine, so
`install_mamba_shim` puts a stand-in `mamba_ssm` into `sys.modules` before megatron imports it: the gated RMSNorm
class (a module with a weight, which is all the constructor builds) and kernel functions that raise when called.
The model is therefore built exactly as megatron builds it (same modules, names, shapes, TP splits, layer numbers);
the tests that use it compare weight deltas. The logits tests (tests/families/test_hybrid_logits.py) replace the
raising kernels with pure-torch ones (tests/support/cpu_kernels.py) and run the forward.

The layout facts the tests use to compute Megatron's effective delta independently of the package under test are
written out below (`megatron_to_hf_rows`), from megatron-core 0.16.1:
- `MambaMixer.in_proj` (column-parallel): each TP rank holds `[z_t; x_t; B_t; C_t; dt_t]` with d_inner/tp,
  d_inner/tp, ngroups/tp * d_state (twice) and nheads/tp rows (mamba_mixer.py, `sharded_state_dict` splits the
  weight into exactly these five pieces per rank). HF's `mixer.in_proj` rows are `[z; x; B; C; dt]` whole
  (modeling_nemotron_h.py splits `[intermediate, conv_dim, num_heads]` then conv_dim into `[x, B, C]`).
- attention `linear_qkv`: per query group `[q heads of the group; k; v]`, groups split over TP.
- the MLP layer's `linear_fc1` is not gated (squared ReLU): up_proj rows, split over TP.
- row-parallel `out_proj`, `linear_proj`, `linear_fc2`: input columns split over TP.
Call these from ranks started by `multiprocess.run_ranks`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import zlib

import torch

from .cpu_shims import install_cpu_shims


def install_mamba_shim() -> None:
    """A stand-in `mamba_ssm` (see the module docstring); does nothing when the real package is importable."""
    try:
        import mamba_ssm  # noqa: F401

        return
    except ImportError:
        pass

    class RMSNormGated(torch.nn.Module):
        def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
            self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate

    def kernel(*args, **kwargs):
        raise NotImplementedError("mamba_ssm kernels are not available on CPU (tests/support/tiny_hybrid.py)")

    names = {
        "mamba_ssm": {},
        "mamba_ssm.ops": {},
        "mamba_ssm.ops.triton": {},
        "mamba_ssm.ops.triton.selective_state_update": {"selective_state_update": kernel},
        "mamba_ssm.ops.triton.layernorm_gated": {"RMSNorm": RMSNormGated},
        "mamba_ssm.ops.triton.ssd_combined": {
            "mamba_chunk_scan_combined": kernel,
            "mamba_split_conv1d_scan_combined": kernel,
        },
    }
    for name, attributes in names.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


@dataclasses.dataclass(frozen=True)
class TinyHybridConfig:
    pattern: str = "M*M-"
    hidden_size: int = 32
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int = 8
    ffn_hidden_size: int = 48
    mamba_num_heads: int = 8
    mamba_head_dim: int = 8
    mamba_num_groups: int = 2
    mamba_state_dim: int = 4
    vocab_size: int = 64
    seq_length: int = 8
    num_experts: int = 4
    """Routed experts of each MoE (E) layer: non-gated squared-ReLU, sigmoid routing with expert bias (Nemotron-3)."""
    moe_ffn_hidden_size: int = 16
    moe_shared_expert_intermediate_size: int = 24


MOE_LIKE = TinyHybridConfig(pattern="M*ME")
"""Nemotron-3 Nano style: Mamba, attention and MoE layers."""


def init_parallel(tp: int = 1, ep: int = 1) -> None:
    """Megatron's groups (TP, and EP for MoE layers) with the CPU, Mamba and gated delta-net shims installed."""
    from . import tiny_qwen3_next
    from .tiny_moe import init_moe_parallel

    install_cpu_shims()
    install_mamba_shim()
    tiny_qwen3_next.install_fla_shim()
    init_moe_parallel(tp=tp, ep=ep)


def moe_settings(cfg, *, shared_gate: bool, sigmoid: bool) -> dict:
    """The TransformerConfig fields of a tiny hybrid's MoE layers (`cfg.num_experts` routed experts, a shared expert
    when `cfg.moe_shared_expert_intermediate_size`), at the current EP layout; {} without experts."""
    from megatron.core import parallel_state as ps

    if not cfg.num_experts:
        return {}
    routing = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True) if sigmoid else {}
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_router_topk=2,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size or None,
        moe_shared_expert_gate=shared_gate,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        **routing,
    )


def transformer_config(cfg, *, gated: bool = False, **extra):
    """tiny_gpt's CPU-safe TransformerConfig of a tiny hybrid (this one or tiny_qwen3_next's): its sizes, one layer
    per pattern symbol, sequence parallelism when TP > 1 (megatron asks for it with MoE), plus `extra`."""
    from megatron.core import parallel_state as ps

    from .tiny_gpt import TinyGPTConfig
    from .tiny_gpt import transformer_config as gpt_config

    gpt = TinyGPTConfig(
        num_layers=len(cfg.pattern),
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        gated_linear_unit=gated,
    )
    sequence_parallel = ps.get_tensor_model_parallel_world_size() > 1 and "num_moe_experts" in extra
    return gpt_config(gpt, sequence_parallel=sequence_parallel, **extra)


def mamba_config(cfg: TinyHybridConfig):
    return transformer_config(
        cfg,
        is_hybrid_model=True,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        mamba_num_groups=cfg.mamba_num_groups,
        mamba_state_dim=cfg.mamba_state_dim,
        **(moe_settings(cfg, shared_gate=False, sigmoid=True) if "E" in cfg.pattern else {}),
    )


def moe_layer_mlp(num_experts: int):
    """megatron's MoE layer spec (router, SequentialMLP experts, shared experts) with its local linears."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    return get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)


def _stack_spec(num_experts: int):
    """megatron's mamba_stack_spec with megatron's own local (non-TE) linears and norms."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    from .tiny_gpt import _SequenceParallelRMSNorm

    mixer = MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)
    attention = SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention, linear_proj=RowParallelLinear
    )
    return ModuleSpec(
        module=MambaStack,
        params={"post_layer_norm": False},  # megatron's final norm is TE's; no forward runs here
        submodules=MambaStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=_SequenceParallelRMSNorm,
                    mixer=ModuleSpec(module=MambaMixer, submodules=mixer),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=_SequenceParallelRMSNorm,
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=attention,
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=_SequenceParallelRMSNorm,
                    mlp=ModuleSpec(
                        module=MLP,
                        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                    ),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=_SequenceParallelRMSNorm,
                    mlp=moe_layer_mlp(num_experts),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
        ),
    )


def build_hybrid(cfg: TinyHybridConfig):
    """This rank's MambaModel (megatron-core's class) at the current TP size."""
    from megatron.core.models.mamba.mamba_model import MambaModel

    return MambaModel(
        mamba_config(cfg),
        _stack_spec(cfg.num_experts),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        hybrid_override_pattern=cfg.pattern,
        position_embedding_type="none",
    )


LORA_TARGETS = ("*in_proj*", "*linear_qkv*", "*linear_proj*", "*linear_fc1*", "*linear_fc2*")
"""What exports: peft refuses LoRA on a Mamba model's out_proj (see the package's Nemotron-H name map)."""
ROW_PARALLEL = ("out_proj", "linear_proj", "linear_fc2")
HF_NAMES = {
    "mixer.in_proj": "mixer.in_proj",
    "mixer.out_proj": "mixer.out_proj",
    "self_attention.linear_proj": "mixer.o_proj",
    "mlp.linear_fc1": "mixer.up_proj",
    "mlp.linear_fc2": "mixer.down_proj",
    "mlp.shared_experts.linear_fc1": "mixer.shared_experts.up_proj",
    "mlp.shared_experts.linear_fc2": "mixer.shared_experts.down_proj",
}
HF_EXPERTS = {"fc1": "up_proj", "fc2": "down_proj"}
"""transformers 5's fused Nemotron-H expert parameters, by megatron expert linear."""


def fill_lora_dyadic(model, seed: int) -> None:
    """Every LoRA tensor gets multiples of 1/8 in [-1/2, 1/2]: products and sums of a few of them (and of HF base
    weights rounded to 1/1024) are exact in float32, so the weight-delta comparison can ask for equality."""
    from megatron.core import parallel_state as ps

    from .tiny_gpt import _global_name

    for name, param in model.named_parameters():
        if "lora" in name or ".adapter." in name:  # a replicated tensor is the same on every TP rank
            expert = ".local_experts." in name  # each expert its own values, by its global index
            tp = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
            rank = tp if getattr(param, "tensor_model_parallel", False) else 0
            name = _global_name(model, name)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{name}|{rank}".encode()))
            with torch.no_grad():
                param.copy_(torch.randint(-4, 5, param.shape, generator=gen).float() / 8)


def modelopt_local_deltas(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """This rank's effective weight delta (scale * B @ A) of every ModelOpt LoRA module, by megatron module path."""
    deltas = {}
    for name, module in model.named_modules():
        entry = getattr(module, "_lora_adapters", {}).get(adapter)
        if entry is not None:
            a, b = entry["lora_a"].weight, entry["lora_b"].weight
            deltas[name] = (entry["scale"] * (b @ a)).detach().clone()
    return deltas


def local_deltas_by_tp(model) -> dict[str, tuple[int, torch.Tensor]]:
    """This rank's ModelOpt LoRA deltas by global module path (layer and expert index at PP = EP = 1), each with the
    (expert) TP rank that holds it: gather them from every rank and pass them to `tp_shards`."""
    from megatron.core import parallel_state as ps

    from .tiny_gpt import _global_name

    out = {}
    for name, delta in modelopt_local_deltas(model).items():
        expert = ".local_experts." in name
        rank = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
        out[_global_name(model, name)] = (rank, delta)
    return out


def tp_shards(gathered: list[dict[str, tuple[int, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """Every rank's `local_deltas_by_tp` as one dict per TP rank (replicas over DP / EP dropped): the input of the
    `megatron_to_hf_deltas` functions."""
    size = 1 + max(t for found in gathered for t, _ in found.values())
    per_tp = [{} for _ in range(size)]
    for found in gathered:
        for path, (t, delta) in found.items():
            per_tp[t][path] = delta
    return per_tp


_EXPERT_PATH = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])$")


def expert_deltas(per_rank: list[dict[str, torch.Tensor]], gated: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Routed experts' whole deltas, stacked per layer as transformers 5 fuses them: `{"decoder.layers.{i}": {"fc1":
    [experts, rows, hidden], "fc2": [experts, hidden, ffn]}}`; fc1 rows are [gate; up] when `gated` (each TP rank
    holds [gate_t; up_t]), and pop them from `per_rank`."""
    found: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for path in sorted({p for deltas in per_rank for p in deltas}):
        layer, rest = path.split(".mlp.", 1)[0], "mlp." + path.split(".mlp.", 1)[-1]
        match = _EXPERT_PATH.match(rest)
        if not match:
            continue
        shards = [deltas.pop(path) for deltas in per_rank if path in deltas]
        if match.group(2) == "linear_fc2":
            whole = torch.cat(shards, dim=1)
        elif gated:
            halves = [s.chunk(2) for s in shards]
            whole = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            whole = torch.cat(shards)
        found.setdefault(layer, {}).setdefault(match.group(2)[-3:], {})[int(match.group(1))] = whole
    return {
        layer: {kind: torch.stack([by_expert[e] for e in sorted(by_expert)]) for kind, by_expert in kinds.items()}
        for layer, kinds in found.items()
    }


def bridge_local_tensors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """This rank's Megatron-Bridge LoRA (A shard, B shard, alpha / dim) of every wrapped linear, by module path."""
    out = {}
    for name, module in model.named_modules():
        adapter = module._modules.get("adapter")
        if adapter is not None and module._modules.get("to_wrap") is not None:
            a, b = adapter.linear_in.weight, adapter.linear_out.weight
            out[name] = (a.detach().clone(), b.detach().clone(), float(adapter.alpha) / a.shape[0] / _tp_of(a))
    return out


def _tp_of(a: torch.Tensor) -> int:
    """Bridge splits a column-parallel base's A over its rows (the adapter dim): the scale is alpha over the whole."""
    from megatron.core import parallel_state as ps

    split = getattr(a, "tensor_model_parallel", False) and a.partition_dim == 0
    return ps.get_tensor_model_parallel_world_size() if split else 1


def bridge_deltas(per_rank: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Each rank's effective delta from every rank's Bridge tensors: on a column-parallel base A is split over its rows
    and gathered (B @ A_whole), on a row-parallel base B's rows are gathered (B_whole @ A_t)."""
    deltas = [{} for _ in per_rank]
    for path in per_rank[0]:
        row = path.rsplit(".", 1)[-1] in ROW_PARALLEL
        a_whole = torch.cat([r[path][0] for r in per_rank]) if not row else None
        b_whole = torch.cat([r[path][1] for r in per_rank]) if row else None
        for t, tensors in enumerate(per_rank):
            a, b, scale = tensors[path]
            deltas[t][path] = scale * (b_whole @ a if row else b @ a_whole)
    return deltas


def megatron_to_hf_deltas(per_rank: list[dict[str, torch.Tensor]], cfg: TinyHybridConfig) -> dict[str, torch.Tensor]:
    """The whole-model delta of each HF module (transformers' `model.layers.{i}...` names) from every TP rank's local
    deltas, by megatron's row layout (module docstring)."""
    per_rank = [dict(deltas) for deltas in per_rank]
    out = {
        f"model.layers.{layer.rsplit('.', 1)[-1]}.mixer.experts.{HF_EXPERTS[kind]}": stacked
        for layer, kinds in expert_deltas(per_rank, gated=False).items()
        for kind, stacked in kinds.items()
    }
    tp = len(per_rank)
    for path in per_rank[0]:
        layer, rest = path.removeprefix("decoder.layers.").split(".", 1)
        prefix = f"model.layers.{layer}."
        shards = [deltas[path] for deltas in per_rank]
        if rest.rsplit(".", 1)[-1] in ROW_PARALLEL:
            out[prefix + HF_NAMES[rest]] = torch.cat(shards, dim=1)
        elif rest == "mixer.in_proj":
            d_inner, bc = cfg.mamba_num_heads * cfg.mamba_head_dim, cfg.mamba_num_groups * cfg.mamba_state_dim
            sizes = [d_inner // tp, d_inner // tp, bc // tp, bc // tp, cfg.mamba_num_heads // tp]
            parts = [shard.split(sizes) for shard in shards]  # per rank: z_t, x_t, B_t, C_t, dt_t
            out[prefix + HF_NAMES[rest]] = torch.cat([parts[t][k] for k in range(5) for t in range(tp)])
        elif rest == "self_attention.linear_qkv":
            d, per_group = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
            groups = torch.cat([s.reshape(-1, (per_group + 2) * d, s.shape[-1]) for s in shards])
            out[prefix + "mixer.q_proj"] = groups[:, : per_group * d].reshape(-1, groups.shape[-1])
            out[prefix + "mixer.k_proj"] = groups[:, per_group * d : (per_group + 1) * d].reshape(-1, groups.shape[-1])
            out[prefix + "mixer.v_proj"] = groups[:, (per_group + 1) * d :].reshape(-1, groups.shape[-1])
        else:
            out[prefix + HF_NAMES[rest]] = torch.cat(shards)
    return out


def hf_config(cfg: TinyHybridConfig):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        hybrid_override_pattern=cfg.pattern,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        intermediate_size=cfg.ffn_hidden_size,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        n_groups=cfg.mamba_num_groups,
        ssm_state_size=cfg.mamba_state_dim,
        max_position_embeddings=cfg.seq_length,
        n_routed_experts=cfg.num_experts,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        n_shared_experts=1,
    )


def save_hf_base(cfg: TinyHybridConfig, directory) -> None:
    """A tiny HF Nemotron-H base model (weights rounded to multiples of 1/1024, see `fill_lora_dyadic`)."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(hf_config(cfg))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_((param * 1024).round() / 1024)
    model.save_pretrained(directory)


def peft_merged_deltas(base_dir, adapter_dir, model_class=None) -> dict[str, torch.Tensor]:
    """peft's merged weight minus the base weight, for every linear of the HF model (Nemotron-H unless `model_class`)
    that changed."""
    from peft import PeftModel
    from transformers import NemotronHForCausalLM

    base = (model_class or NemotronHForCausalLM).from_pretrained(base_dir, torch_dtype=torch.float32)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    deltas = {}
    for name, p in merged.named_parameters():  # fused experts are parameters without `.weight`
        if p.dim() >= 2 and not torch.equal(p, before[name]):
            deltas[name.removesuffix(".weight")] = p.detach() - before[name]
    return deltas
