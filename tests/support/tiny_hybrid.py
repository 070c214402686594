"""A tiny Nemotron-H style hybrid (Mamba / attention / MLP layers) megatron-core model on CPU, and its HF twin.

megatron-core's MambaMixer refuses to be built without `mamba_ssm` (its constructor checks `HAVE_MAMBA_SSM`), and
its forward needs the CUDA/triton kernels of `mamba_ssm` and `causal_conv1d`. Neither installs on a CPU machine, so
`install_mamba_shim` puts a stand-in `mamba_ssm` into `sys.modules` before megatron imports it: the gated RMSNorm
class (a module with a weight, which is all the constructor builds) and kernel functions that raise when called.
The model is therefore built exactly as megatron builds it (same modules, names, shapes, TP splits, layer numbers)
but never run: the family tests compare weight deltas, not logits.

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


def init_parallel(tp: int = 1) -> None:
    from .tiny_gpt import init_parallel as init

    install_cpu_shims()
    install_mamba_shim()
    init(tp)


def transformer_config(cfg: TinyHybridConfig):
    from .tiny_gpt import TinyGPTConfig
    from .tiny_gpt import transformer_config as gpt_config

    gpt = TinyGPTConfig(
        num_layers=len(cfg.pattern),
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        gated_linear_unit=False,
    )
    return gpt_config(
        gpt,
        is_hybrid_model=True,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        mamba_num_groups=cfg.mamba_num_groups,
        mamba_state_dim=cfg.mamba_state_dim,
    )


def _stack_spec():
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
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

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
                    norm=WrappedTorchNorm,
                    mixer=ModuleSpec(module=MambaMixer, submodules=mixer),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=WrappedTorchNorm,
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
                    pre_mlp_layernorm=WrappedTorchNorm,
                    mlp=ModuleSpec(
                        module=MLP,
                        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                    ),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
        ),
    )


def build_hybrid(cfg: TinyHybridConfig):
    """This rank's MambaModel (megatron-core's class) at the current TP size."""
    from megatron.core.models.mamba.mamba_model import MambaModel

    return MambaModel(
        transformer_config(cfg),
        _stack_spec(),
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
}


def fill_lora_dyadic(model, seed: int) -> None:
    """Every LoRA tensor gets multiples of 1/8 in [-1/2, 1/2]: products and sums of a few of them (and of HF base
    weights rounded to 1/1024) are exact in float32, so the weight-delta comparison can ask for equality."""
    from megatron.core import parallel_state as ps

    for name, param in model.named_parameters():
        if "lora" in name or ".adapter." in name:  # a replicated tensor is the same on every TP rank
            rank = ps.get_tensor_model_parallel_rank() if getattr(param, "tensor_model_parallel", False) else 0
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
    tp, out = len(per_rank), {}
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
    for name, p in merged.named_parameters():
        if name.endswith(".weight") and not torch.equal(p, before[name]):
            deltas[name.removesuffix(".weight")] = p.detach() - before[name]
    return deltas
