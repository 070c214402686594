"""Rank padding: one rank and one scale for every module, the same B @ A * alpha / r (checked by hand and by peft's
logits), no truncation."""

import pytest
import torch

from megatron_peft_export.core.archs import LLAMA
from megatron_peft_export.core.peft_format import adapter_config
from megatron_peft_export.core.rank_padding import pad_ranks
from megatron_peft_export.errors import ShapeMismatchError
from tests.core.test_plan import export, geometry, key, shards_of


def _adapter(r_qkv=4, r_fc2=2, alpha_qkv=8.0, alpha_fc2=3.0):
    geo = geometry()
    gen = torch.Generator().manual_seed(0)
    qkv_out = (geo.num_attention_heads + 2 * geo.num_query_groups) * geo.head_dim
    pairs = []
    for layer in range(geo.num_layers):
        qkv, fc2 = f"decoder.layers.{layer}.self_attention.linear_qkv", f"decoder.layers.{layer}.mlp.linear_fc2"
        pairs += shards_of(qkv, "lora_A", torch.randn(r_qkv, geo.hidden_size, generator=gen), None, 1, alpha=alpha_qkv)
        pairs += shards_of(qkv, "lora_B", torch.randn(qkv_out, r_qkv, generator=gen), 0, 1, alpha=alpha_qkv)
        pairs += shards_of(fc2, "lora_A", torch.randn(r_fc2, geo.ffn_hidden_size, generator=gen), 1, 1, alpha=alpha_fc2)
        pairs += shards_of(fc2, "lora_B", torch.randn(geo.hidden_size, r_fc2, generator=gen), None, 1, alpha=alpha_fc2)
    return export(pairs, geo, LLAMA)


def _delta(plan, tensors, module):
    s = plan.modules[module]
    return tensors[key(module, "lora_B")] @ tensors[key(module, "lora_A")] * (s.alpha / s.r)


def test_padding_keeps_every_module_delta_and_drops_both_patterns():
    plan, tensors = _adapter()
    config = adapter_config(plan, None)
    assert config["rank_pattern"] and config["alpha_pattern"]  # two ranks and two scales before
    padded_plan, padded = pad_ranks(plan, tensors, 16)
    for module in plan.modules:
        assert padded[key(module, "lora_A")].shape[0] == 16 and padded[key(module, "lora_B")].shape[1] == 16
        assert padded_plan.shapes[key(module, "lora_A")] == tuple(padded[key(module, "lora_A")].shape)
        torch.testing.assert_close(
            _delta(padded_plan, padded, module), _delta(plan, tensors, module), rtol=1e-6, atol=1e-6
        )
    config = adapter_config(padded_plan, None)
    assert config["r"] == 16 and config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert (
        config["lora_alpha"] == 32
    )  # the common scale 2 (q, k, v: 8 / 4) at rank 16; down_proj's 1.5 went into its lora_B
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    assert torch.equal(
        padded[key(q, "lora_B")][:, :4], tensors[key(q, "lora_B")]
    )  # the common scale's modules: bit for bit
    torch.testing.assert_close(padded[key(down, "lora_B")][:, :2], tensors[key(down, "lora_B")] * 0.75)


def test_padding_to_the_same_rank_and_scale_changes_nothing_and_never_truncates():
    plan, tensors = _adapter(r_qkv=4, r_fc2=4, alpha_fc2=8.0)
    same_plan, same = pad_ranks(plan, tensors, 4)
    assert all(torch.equal(same[k], tensors[k]) for k in tensors) and same_plan.modules == plan.modules
    with pytest.raises(ShapeMismatchError, match="pass pad_rank_to >= 4"):
        pad_ranks(plan, tensors, 2)


def _peft_logits(root):
    """peft's logits for the same Megatron LoRA exported as trained and padded to rank 16 (in a forked child)."""
    import peft
    from transformers import AutoModelForCausalLM

    from tests.support import serving_models as sm

    settings = {
        m: ((4, 8.0) if "self_attention" in m else (8, 6.0)) for m in sm.megatron_modules("llama", lm_head=True)
    }
    base_dir = sm.save_base("llama", root / "base")
    configs = {}
    for name, pad in (("trained", None), ("padded", 16)):
        sm.write_adapter(root / name, "llama", settings, seed=7, pad_rank_to=pad)
        configs[name] = sm.adapter_config(root / name)
    tokens = torch.tensor([[5, 17, 42, 99, 3, 64, 8, 120]])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32").eval()
    with torch.no_grad():
        logits = {"base": base(input_ids=tokens).logits}
        for name in ("trained", "padded"):
            model = peft.PeftModel.from_pretrained(base, str(root / name)).eval()
            logits[name] = model(input_ids=tokens).logits
            base = model.unload()
    return logits, configs


def test_a_padded_adapter_gives_peft_the_same_logits(tmp_path):
    from tests.support.multiprocess import run_alone

    logits, configs = run_alone(_peft_logits, tmp_path, timeout=300)
    assert configs["trained"]["rank_pattern"] and configs["trained"]["alpha_pattern"]
    assert (
        configs["padded"]["rank_pattern"] == {}
        and configs["padded"]["alpha_pattern"] == {}
        and configs["padded"]["r"] == 16
    )
    assert (logits["trained"] - logits["base"]).abs().max() > 1e-1  # the adapter matters
    torch.testing.assert_close(logits["padded"], logits["trained"], rtol=0, atol=1e-4)
