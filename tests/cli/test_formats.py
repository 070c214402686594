from megatron_peft_export.cli import main


def test_formats_lists_dialects_and_model_types(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "modelopt, megatron-bridge" in out and "llama, mistral, qwen2, qwen3" in out
