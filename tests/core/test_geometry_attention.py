"""The attention facts of the geometry check (sinks, sliding-window layers), read from megatron-core's config as
megatron-core itself decides them and from an HF config's layer_types; compared only where both sides know them."""

from types import SimpleNamespace

import pytest
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_peft_export.core.geometry import ModelGeometry
from megatron_peft_export.errors import ShapeMismatchError

LAYERS = 6


def _megatron(**attention):
    return SimpleNamespace(
        num_layers=LAYERS,
        hidden_size=64,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=8,
        ffn_hidden_size=32,
        gated_linear_unit=True,
        num_moe_experts=4,
        moe_ffn_hidden_size=32,
        **attention,
    )


def _hf(**extra):
    return {
        "model_type": "gpt_oss",
        "num_hidden_layers": LAYERS,
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "intermediate_size": 32,
        "num_local_experts": 4,
        **extra,
    }


@pytest.mark.parametrize(
    "window,skip", [(None, None), ((4, 0), None), ((4, 0), 2), ((4, 0), 3), ((4, 0), [1, 0, 0, 1, 1, 0])]
)
def test_window_layers_are_the_layers_megatron_core_windows(window, skip):
    geometry = ModelGeometry.from_megatron(_megatron(window_size=window, window_attn_skip_freq=skip))
    expected = tuple(i for i in range(LAYERS) if is_layer_window_attention(window, skip, i + 1))
    assert geometry.window_layers == expected


def test_a_gpt_oss_config_matches_a_megatron_gpt_oss_and_each_attention_fact_is_named_when_it_differs():
    megatron = ModelGeometry.from_megatron(
        _megatron(softmax_type="learnable", window_size=(127, 0), window_attn_skip_freq=2)
    )
    types = ["sliding_attention", "full_attention"] * 3
    megatron.check_matches(ModelGeometry.from_hf_config(_hf(layer_types=types)), "config.json")
    with pytest.raises(
        ShapeMismatchError, match=r"window_layers: Megatron model has \[0, 2, 4\], config.json has \[\]"
    ):
        megatron.check_matches(ModelGeometry.from_hf_config(_hf(layer_types=["full_attention"] * 6)), "config.json")
    llama = _hf(model_type="llama", layer_types=types)
    with pytest.raises(ShapeMismatchError, match="attention_sinks: Megatron model has True, config.json has False"):
        megatron.check_matches(ModelGeometry.from_hf_config(llama), "config.json")


def test_attention_facts_one_side_does_not_know_are_not_compared():
    megatron = ModelGeometry.from_megatron(
        _megatron(softmax_type="learnable", window_size=(127, 0), window_attn_skip_freq=2)
    )
    megatron.check_matches(ModelGeometry.from_hf_config(_hf()), "config.json")  # no layer_types: windows unknown
    plain = ModelGeometry.from_megatron(_megatron())
    assert (plain.attention_sinks, plain.window_layers) == (False, ())
    plain.check_matches(ModelGeometry.from_hf_config(_hf(model_type="qwen3_moe")), "config.json")
