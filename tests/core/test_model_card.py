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


def _alias_bomb_tags() -> str:
    """Front matter whose second tag is a list of ten lists, nine levels deep, through YAML aliases: 10^9 items."""
    lines = ["---", "tags:", "- megatron-peft-export", "- &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(8):
        ref = f"*{chr(97 + level)}"
        lines.append(f"- &{chr(98 + level)} [{', '.join([ref] * 10)}]")
    return "\n".join([*lines, "---", ""])


def test_a_card_read_back_never_injects_front_matter_or_hangs():
    """push reads the dialect back from the adapter's card (anyone's text) and writes it into the new front matter."""
    import time

    newline = '---\ntags:\n- megatron-peft-export\n- "x\\nlicense: evil"\n---\n'
    assert card_dialect(newline) is None
    start = time.process_time()
    assert card_dialect(_alias_bomb_tags()) is None  # its str() walked 10^9 items
    assert card_dialect("---\ntags: megatron-peft-export\n---\n") is None
    deep = "---\ntags: " + "[" * 50_000 + "\n---\n"
    assert not is_ours(deep) and card_dialect(deep) is None  # RecursionError out of yaml before
    assert time.process_time() - start < 5


def test_config_values_in_the_card_stay_in_their_table_cell():
    """A base model name or patterns from an adapter's config (push fills the card from it) can neither end the table,
    add HTML nor front matter; a string target_modules is shown as the pattern, not split into characters."""
    hostile = "x |\n---\nlicense: evil\n<img src=x onerror=alert(1)>"
    card = model_card(
        {**CONFIG, "base_model_name_or_path": hostile, "target_modules": ".*\\.(q|v)_proj"},
        dialect=None,
        source="a Megatron adapter directory",
        num_tensors=2,
        quantization="fp8 | <b>",
    )
    assert _front(card) == {
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["lora", "megatron", "megatron-peft-export", "dora"],
    }
    prose, code = card.split("```python\n")
    assert "<img" not in prose and "<b>" not in prose and "license: evil\n" not in card
    assert code.count("\n") == 6  # inside the code block as one JSON string (newlines escaped): inert
    row = next(line for line in card.splitlines() if line.startswith("| base model |"))
    assert row == "| base model | x \\| --- license: evil &lt;img src=x onerror=alert(1)&gt; |"
    assert "| target modules | .*\\.(q\\|v)_proj |" in card
    assert "| base quantization | fp8 \\| &lt;b&gt; |" in card
