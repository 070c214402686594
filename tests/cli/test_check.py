"""`megatron-peft-export check` on purpose-made adapters: each incompatibility is flagged with its reason, a clean one passes."""

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_peft_export.cli import main
from megatron_peft_export.compat import check_adapter

HIDDEN, OUT = 16, 24
CLEAN = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
         "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "use_dora": False, "use_rslora": False, "modules_to_save": None}


def _module(name, r):
    prefix = f"base_model.model.model.layers.0.{name}"
    return {f"{prefix}.lora_A.weight": torch.zeros(r, HIDDEN), f"{prefix}.lora_B.weight": torch.zeros(OUT, r)}


def write_adapter(directory, config=None, tensors=None, **changes):
    directory.mkdir(parents=True, exist_ok=True)
    config = {**(config or CLEAN), **changes}
    r = config["r"]
    tensors = tensors if tensors is not None else {**_module("self_attn.q_proj", r), **_module("self_attn.v_proj", r)}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def codes(directory, target="vllm"):
    from megatron_peft_export.compat import check_dir

    return {f.code: f.severity for findings in check_dir(directory, target).values() for f in findings}


def run_check(capsys, *args):
    status = main(["check", *map(str, args)])
    return status, capsys.readouterr().out


def test_a_clean_adapter_passes(tmp_path, capsys):
    status, out = run_check(capsys, write_adapter(tmp_path / "clean"))
    assert status == 0 and "compatible with vllm (0 error(s), 0 warning(s), 0 note(s))" in out


@pytest.mark.parametrize("name,changes,tensors,code", [
    ("dora", {"use_dora": True}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(OUT)}, "dora"),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, {"base_model.model.lm_head.weight": torch.zeros(8, HIDDEN)}, "modules-to-save"),
    ("bias", {"bias": "lora_only"}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(OUT)}, "bias"),
    ("alpha_pattern", {"alpha_pattern": {"v_proj": 64}}, {}, "per-module-scale"),
    ("huge_rank", {"r": 640, "lora_alpha": 1280}, None, "rank-size"),
    ("megatron_names", {}, {"base_model.model.decoder.layers.0.self_attention.linear_qkv.lora_a_default.weight": torch.zeros(16, HIDDEN)}, "megatron-names"),
    ("missing_alpha", {"lora_alpha": None}, {}, "missing-fields"),
    ("wrong_rank", {"rank_pattern": {"v_proj": 8}}, {}, "rank-mismatch"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_refused_feature_is_an_error_with_its_reason(tmp_path, capsys, name, changes, tensors, code):
    config = {**CLEAN, **changes}
    if config["lora_alpha"] is None:
        del config["lora_alpha"]
    base = {**_module("self_attn.q_proj", config["r"]), **_module("self_attn.v_proj", config["r"])}
    directory = write_adapter(tmp_path / name, config, {**base, **(tensors or {})})
    status, out = run_check(capsys, directory)
    assert status == 1 and "NOT compatible with vllm" in out
    assert codes(directory)[code] == "error"
    line = next(line for line in out.splitlines() if f"[{code}]" in line)
    assert "Fix: " in line and line.index(": ") < line.index("Fix: ")  # what, why, then what to change


@pytest.mark.parametrize("changes,module_rank,code", [
    ({"r": 12, "lora_alpha": 24}, None, "rank-size"),                                 # not a --max-lora-rank size
    ({"rank_pattern": {"v_proj": 32}, "alpha_pattern": {"v_proj": 64}}, 32, "per-module-rank"),  # same scale, two ranks
])
def test_warnings_leave_the_exit_status_at_zero(tmp_path, capsys, changes, module_rank, code):
    config = {**CLEAN, **changes}
    tensors = {**_module("self_attn.q_proj", config["r"]), **_module("self_attn.v_proj", module_rank or config["r"])}
    directory = write_adapter(tmp_path / code, config, tensors)
    status, out = run_check(capsys, directory)
    assert status == 0 and codes(directory)[code] == "warning" and f"[{code}]" in out
    if code == "per-module-rank":
        assert "pad_rank_to=32" in out and "fails on the rank-32 modules" in out
    else:
        assert "pad_rank_to=16" in out


def test_fused_module_names_and_the_default_max_lora_rank(tmp_path):
    fused = write_adapter(tmp_path / "fused", tensors=_module("self_attn.qkv_proj", 16))
    assert codes(fused) == {"fused-names": "warning"}
    big = write_adapter(tmp_path / "big", r=64, lora_alpha=128)
    assert codes(big) == {"max-lora-rank": "info"}


def test_the_peft_target_accepts_what_vllm_refuses_but_not_ignored_keys(tmp_path, capsys):
    dora = write_adapter(tmp_path / "dora", {**CLEAN, "use_dora": True, "alpha_pattern": {"v_proj": 64}},
                         {**_module("self_attn.q_proj", 16), **_module("self_attn.v_proj", 16),
                          "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(OUT)})
    assert run_check(capsys, dora, "--target", "peft")[0] == 0
    megatron = write_adapter(tmp_path / "megatron", tensors={"base_model.model.decoder.layers.0.mlp.linear_fc1.lora_a_default.weight": torch.zeros(16, HIDDEN)})
    status, out = run_check(capsys, megatron, "--target", "peft")
    assert status == 1 and "ignores them silently" in out


def test_every_adapter_of_a_multi_adapter_directory_is_checked(tmp_path, capsys):
    root = write_adapter(tmp_path / "adapters")
    write_adapter(root / "math", use_dora=True)
    status, out = run_check(capsys, root)
    assert status == 1
    lines = out.splitlines()
    assert any(line.endswith("compatible with vllm (0 error(s), 0 warning(s), 0 note(s))") for line in lines)
    assert any("(adapter 'math'): NOT compatible with vllm" in line for line in lines)


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["check", str(tmp_path / "empty")]) == 2
    broken = write_adapter(tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    assert main(["check", str(broken)]) == 2
    no_weights = write_adapter(tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    assert main(["check", str(no_weights)]) == 2
    truncated = write_adapter(tmp_path / "truncated")
    (truncated / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    assert main(["check", str(truncated)]) == 2
    assert capsys.readouterr().err.count("error: ") == 5


def test_check_adapter_is_pure_and_orders_errors_first():
    shapes = {k: tuple(v.shape) for k, v in {**_module("self_attn.q_proj", 12), **_module("self_attn.v_proj", 12)}.items()}
    findings = check_adapter({**CLEAN, "r": 12, "lora_alpha": 24, "use_dora": True}, shapes)
    assert [f.code for f in findings] == ["dora", "rank-size"]
