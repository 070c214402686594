"""Tiny HF base models with a local tokenizer, and adapters the exporter writes for them, for the serving tests.

The bases are random transformers models (Llama, Qwen3-MoE, Mixtral) saved with a word-level tokenizer built
here, so vLLM loads them with no download. The adapters go the exporter's way: Megatron-layout LoRA tensors
(random, seeded) -> the planner -> `stage_adapter` (rank padding, fused experts, adapter_config.json), exactly
what `export_adapter` writes after gathering. The Megatron tensors are returned too, so a test can compute
each module's delta from the source, independently of the exporter.

Call from a forked child (`multiprocess.run_alone`): the pytest parent must not run torch compute.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from megatron_peft_export.core.archs import LLAMA, MIXTRAL, QWEN_MOE
from megatron_peft_export.core.geometry import ModelGeometry
from megatron_peft_export.core.plan import allocate, apply_placements, plan_adapter
from megatron_peft_export.core.shards import ShardSpec
from megatron_peft_export.export import ExportOptions, Naming, stage_adapter

VOCAB, HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN, LAYERS, EXPERTS, EXPERT_FFN = 128, 64, 2, 1, 32, 96, 2, 4, 32
"""head_dim 32: vLLM's CPU attention has kernels for a few head sizes only (8 is refused)."""
ARCHS = {"llama": LLAMA, "qwen3_moe": QWEN_MOE, "mixtral": MIXTRAL}


def geometry(family: str) -> ModelGeometry:
    moe = family != "llama"
    return ModelGeometry(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        head_dim=HEAD_DIM,
        ffn_hidden_size=EXPERT_FFN if family == "mixtral" else FFN,
        gated_linear_unit=True,
        vocab_size=VOCAB,
        num_experts=EXPERTS if moe else None,
        moe_ffn_hidden_size=EXPERT_FFN if moe else None,
    )


def save_base(family: str, directory: Path, seed: int = 0) -> Path:
    """A random float32 base of `family` with a word-level tokenizer (tokens t0..t127), saved for transformers and vLLM.

    Weights are drawn with std 0.5 (not HF's 0.02) so the next-token distributions are peaked: greedy tokens then
    depend on the adapter, and a near-tie cannot flip them.
    """
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=GROUPS,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        initializer_range=0.5,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=FFN))
    elif family == "qwen3_moe":
        model = Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **common,
                intermediate_size=FFN,
                moe_intermediate_size=EXPERT_FFN,
                num_experts=EXPERTS,
                num_experts_per_tok=2,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                norm_topk_prob=True,
            )
        )
    elif family == "mixtral":
        model = MixtralForCausalLM(
            MixtralConfig(**common, intermediate_size=EXPERT_FFN, num_local_experts=EXPERTS, num_experts_per_tok=2)
        )
    else:
        raise ValueError(family)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * (0.5 if param.dim() > 1 else 0.0))
    model.float().save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(directory)
    return directory


def megatron_modules(family: str, *, lm_head: bool = False, router: bool = False) -> list[str]:
    """The Megatron LoRA modules of a full adapter: attention and MLP (experts for MoE) in every layer."""
    modules = []
    for i in range(LAYERS):
        layer = f"decoder.layers.{i}"
        modules += [f"{layer}.self_attention.linear_qkv", f"{layer}.self_attention.linear_proj"]
        if family == "llama":
            modules += [f"{layer}.mlp.linear_fc1", f"{layer}.mlp.linear_fc2"]
        else:
            modules += [
                f"{layer}.mlp.experts.local_experts.{e}.linear_{fc}" for e in range(EXPERTS) for fc in ("fc1", "fc2")
            ]
            modules += [f"{layer}.mlp.router"] if router else []
    return modules + (["output_layer"] if lm_head else [])


def _shapes(module: str, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(lora_A, lora_B) shapes of a Megatron module at TP 1."""
    kind = module.rsplit(".", 1)[-1]
    ffn = EXPERT_FFN if ".experts." in module else FFN
    out, inp = {
        "linear_qkv": ((HEADS + 2 * GROUPS) * HEAD_DIM, HIDDEN),
        "linear_proj": (HIDDEN, HEADS * HEAD_DIM),
        "linear_fc1": (2 * ffn, HIDDEN),
        "linear_fc2": (HIDDEN, ffn),
        "router": (EXPERTS, HIDDEN),
        "output_layer": (VOCAB, HIDDEN),
    }[kind]
    return (r, inp), (out, r)


@dataclasses.dataclass
class SourceLora:
    """One Megatron module's LoRA as trained: A, B and alpha (delta = alpha / r * B @ A), DoRA magnitude if any."""

    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None

    @property
    def delta(self) -> torch.Tensor:
        return (self.b.double() @ self.a.double()) * (self.alpha / self.a.shape[0])


def write_adapter(
    directory: Path,
    family: str,
    settings: dict[str, tuple[int, float]],
    *,
    seed: int,
    dora: bool = False,
    pad_rank_to: int | None = None,
    expert_layout: str = "per_expert",
) -> dict[str, SourceLora]:
    """Export Megatron LoRA tensors for `settings` (module -> (r, alpha)) into `directory` the exporter's way.

    Returns the source tensors by Megatron module.
    """
    gen = torch.Generator().manual_seed(seed)
    geo, source, pairs = geometry(family), {}, []
    for module, (r, alpha) in settings.items():
        (a_shape, b_shape) = _shapes(module, r)
        lora = SourceLora(torch.randn(a_shape, generator=gen) * 0.3, torch.randn(b_shape, generator=gen) * 0.3, alpha)
        if dora:
            lora.magnitude = torch.rand(b_shape[0], generator=gen) + 0.5
        source[module] = lora
        for role, tensor in (("lora_A", lora.a), ("lora_B", lora.b), ("magnitude", lora.magnitude)):
            if tensor is not None:
                pairs.append(
                    (
                        ShardSpec(
                            module=module,
                            role=role,
                            shape=tuple(tensor.shape),
                            split_dim=None,
                            tp_rank=0,
                            tp_size=1,
                            alpha=alpha,
                        ),
                        tensor,
                    )
                )
    plan = plan_adapter([s for s, _ in pairs], geo, ARCHS[family], VOCAB)
    tensors = allocate(plan)
    for placements, (_, tensor) in zip(plan.placements, pairs):
        apply_placements(tensors, placements, tensor)
    directory.mkdir(parents=True, exist_ok=True)
    options = ExportOptions(pad_rank_to=pad_rank_to, expert_layout=expert_layout, model_type=family)
    stage_adapter(
        directory,
        plan,
        tensors,
        options,
        Naming(ARCHS[family], geo),
        dialect="modelopt",
        source=f"test {family} adapter",
    )
    return source


def adapter_config(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def greedy(model, prompts, steps):
    """Greedy continuation of each prompt and each chosen token's log-prob (float32, full recompute)."""
    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids, chosen, lps = torch.tensor([prompt]), [], []
            for _ in range(steps):
                lp = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
                t = int(lp.argmax())
                chosen.append(t)
                lps.append(float(lp[t]))
                ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
            tokens.append(chosen)
            logprobs.append(lps)
    return {"tokens": tokens, "logprobs": logprobs}
