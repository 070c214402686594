"""The model card: Hub front matter, iteration, verification, and reading back what model_card wrote."""

import yaml

from megatron_peft_export.core.peft_format import card_dialect, is_ours, model_card

CONFIG = {
    "base_model_name_or_path": "Qwen/Qwen2.5-0.5B",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj"],
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_dora": True,
}


def _front(card):
    return yaml.safe_load(card.split("---\n")[1])


def test_front_matter_names_library_base_model_pipeline_and_tags():
    card = model_card(CONFIG, dialect="megatron-bridge", source="iteration 40", num_tensors=8, iteration=40)
    assert _front(card) == {
        "library_name": "peft",
        "base_model": "Qwen/Qwen2.5-0.5B",
        "pipeline_tag": "text-generation",
        "tags": ["lora", "megatron", "megatron-peft-export", "megatron-bridge", "dora"],
    }
    assert "from iteration 40 (megatron-bridge adapters)." in card and "| training iteration | 40 |" in card
    assert is_ours(card) and card_dialect(card) == "megatron-bridge"


def test_a_local_base_model_is_named_in_the_body_only():
    card = model_card(
        {**CONFIG, "base_model_name_or_path": "/models/qwen"},
        dialect=None,
        source="a live Megatron model",
        num_tensors=8,
    )
    assert "base_model" not in _front(card) and "| base model | /models/qwen |" in card
    assert "training iteration" not in card and "from a live Megatron model." in card and card_dialect(card) is None


def test_verification_fields_become_a_section():
    card = model_card(
        CONFIG,
        dialect="modelopt",
        source="iteration 1",
        num_tensors=8,
        verification={
            "passed": False,
            "status": "failed",
            "max_abs_diff": 0.5,
            "top_k": 5,
            "adapter": "/local/path",
            "per_layer": [1, 2],
        },
    )
    section = card.split("## Verification")[1]
    assert "Verification FAILED" in section and "| max_abs_diff | 0.5 |" in section and "| top_k | 5 |" in section
    assert "per_layer" not in section and "/local/path" not in section and "| passed" not in section
    assert "Verification SKIPPED" in model_card(
        CONFIG, dialect=None, source="x", num_tensors=8, verification={"status": "skipped"}
    )


def test_cards_of_others_are_not_ours():
    assert not is_ours("# hello\n") and not is_ours("---\ntags: [lora]\n---\n") and not is_ours("---\n: [\n---\n")


def test_the_base_quantization_is_a_row_and_reads_back():
    from megatron_peft_export.core.peft_format import card_quantization

    text = "ModelOpt fake quantization: weights int8 per-channel, activations int8 per-tensor"
    card = model_card(CONFIG, dialect="modelopt", source="iteration 3", num_tensors=8, quantization=text)
    assert f"| base quantization | {text} |" in card and "QLoRA-style" in card and card_quantization(card) == text
    assert card_quantization(model_card(CONFIG, dialect="modelopt", source="x", num_tensors=8)) is None
