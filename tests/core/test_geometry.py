"""The geometry read from megatron's config and from an HF config.json agree for the same model and disagree, in one
error naming every differing size, for another family or other sizes (family-only sizes: MLA ranks, MoE layers)."""

from types import SimpleNamespace

import pytest

from megatron_peft_export.core.archs import arch_for_model_type
from megatron_peft_export.core.geometry import ModelGeometry
from megatron_peft_export.errors import ShapeMismatchError, UnsupportedModelError

# tests/support/tiny_deepseek.py's DEEPSEEK_LIKE, as megatron's MLATransformerConfig and as HF's config.json spell it
MEGATRON_MLA = SimpleNamespace(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=8,
    num_query_groups=None,
    kv_channels=8,
    ffn_hidden_size=96,
    gated_linear_unit=True,
    num_moe_experts=4,
    moe_ffn_hidden_size=16,
    moe_shared_expert_intermediate_size=16,
    moe_layer_freq=[0, 1, 1, 1],
    multi_latent_attention=True,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_head_dim=8,
    qk_pos_emb_head_dim=4,
    v_head_dim=6,
)
HF_DEEPSEEK = {
    "model_type": "deepseek_v3",
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 4,  # transformers sets it to qk_rope_head_dim
    "intermediate_size": 96,
    "moe_intermediate_size": 16,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 6,
    "vocab_size": 128,
}
HF_GLM = {  # GLM-4.5's config of the same width: GQA, no MLA sizes
    **{k: v for k, v in HF_DEEPSEEK.items() if not k.startswith(("q_", "kv_", "qk_", "v_"))},
    "model_type": "glm4_moe",
    "num_key_value_heads": 4,
    "head_dim": 8,
}


def _mismatch(megatron, hf: dict) -> str:
    with pytest.raises(ShapeMismatchError) as info:
        ModelGeometry.from_megatron(megatron).check_matches(ModelGeometry.from_hf_config(hf), "config.json")
    return str(info.value)


def test_megatron_and_hf_configs_of_one_mla_model_agree():
    megatron, hf = ModelGeometry.from_megatron(MEGATRON_MLA), ModelGeometry.from_hf_config(HF_DEEPSEEK)
    megatron.check_matches(hf, "config.json")
    assert (megatron.head_dim, megatron.moe_layers, megatron.dense_layers()) == (12, (1, 2, 3), (0,))
    assert (hf.moe_shared_expert_intermediate_size, hf.num_experts) == (16, 4)


def test_an_hf_config_of_another_family_is_one_error_naming_every_difference():
    message = _mismatch(MEGATRON_MLA, HF_GLM)
    for expected in (
        "num_query_groups: Megatron model has 8, config.json has 4",
        "q_lora_rank: Megatron model has 24, config.json has None",
        "kv_lora_rank: Megatron model has 16, config.json has None",
        "v_head_dim: Megatron model has 6, config.json has None",
    ):
        assert expected in message
    assert "Pass the base model the adapter was trained on" in message


@pytest.mark.parametrize(
    "edit,expected",
    [
        ({"kv_lora_rank": 32}, "kv_lora_rank: Megatron model has 16, config.json has 32"),
        ({"qk_rope_head_dim": 8}, "qk_pos_emb_head_dim: Megatron model has 4, config.json has 8"),
        ({"q_lora_rank": None}, "q_lora_rank: Megatron model has 24, config.json has None"),
        ({"n_routed_experts": 8}, "num_experts: Megatron model has 4, config.json has 8"),
        ({"first_k_dense_replace": 2}, "moe_layers: Megatron model has layers 1-3, config.json has layers 2-3"),
        ({"num_attention_heads": 16}, "num_attention_heads: Megatron model has 8, config.json has 16"),
        ({"n_shared_experts": 2}, "moe_shared_expert_intermediate_size: Megatron model has 16, config.json has 32"),
    ],
)
def test_each_family_size_is_checked(edit, expected):
    assert expected in _mismatch(MEGATRON_MLA, {**HF_DEEPSEEK, **edit})


def test_a_gqa_megatron_model_against_a_deepseek_config():
    gqa = SimpleNamespace(**{**vars(MEGATRON_MLA), "multi_latent_attention": False, "num_query_groups": 4})
    assert "kv_lora_rank: Megatron model has None, config.json has 16" in _mismatch(gqa, HF_DEEPSEEK)


def test_kimi_k2_uses_the_deepseek_map_and_kimi_k25_is_refused_naming_what_is_missing():
    assert arch_for_model_type("kimi_k2").name == "deepseek_v3"
    with pytest.raises(UnsupportedModelError, match="kimi_k25.*vision-language.*model.language_model"):
        arch_for_model_type("kimi_k25")
