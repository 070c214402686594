"""`megatron-peft-export check` on purpose-made adapters, by the rules (no vLLM here; tests/services asks the real one):
each incompatibility is flagged with its reason and the versions it holds for, a clean one passes, a malformed one
is bad input (exit 2, one error line), and patterns cannot make it run long."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_peft_export.cli import main
from megatron_peft_export.compat import check_adapter, check_dir

HIDDEN, OUT = 16, 24
CLEAN = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 16,
    "lora_alpha": 32,
    "target_modules": ["q_proj", "v_proj"],
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "use_dora": False,
    "use_rslora": False,
    "modules_to_save": None,
}


@pytest.fixture(autouse=True)
def _rules_only(monkeypatch):
    """These tests judge the rules: a vLLM python named by the environment (as a developer may set it) is not asked."""
    monkeypatch.delenv("MEGATRON_PEFT_EXPORT_VLLM_PYTHON", raising=False)


def _module(name, r, layer=0, hidden=HIDDEN, out=OUT):
    prefix = f"base_model.model.model.layers.{layer}.{name}"
    return {f"{prefix}.lora_A.weight": torch.zeros(r, hidden), f"{prefix}.lora_B.weight": torch.zeros(out, r)}


def write_adapter(directory, config=None, tensors=None, **changes):
    directory.mkdir(parents=True, exist_ok=True)
    config = {**(config or CLEAN), **changes}
    r = config["r"]
    tensors = tensors if tensors is not None else {**_module("self_attn.q_proj", r), **_module("self_attn.v_proj", r)}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def codes(directory, target="vllm", **kwargs):
    return {f.code: f.severity for findings in check_dir(directory, target, **kwargs).values() for f in findings}


def run_check(capsys, *args):
    status = main(["check", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_a_clean_adapter_passes(tmp_path, capsys):
    status, out, _ = run_check(capsys, write_adapter(tmp_path / "clean"))
    assert (
        status == 0 and "compatible with vLLM 0.32 (rules, no base model): 0 error(s), 0 warning(s), 0 note(s)" in out
    )


@pytest.mark.parametrize(
    "name,changes,tensors,code",
    [
        (
            "dora",
            {"use_dora": True},
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(OUT)},
            "dora",
        ),
        (
            "modules_to_save",
            {"modules_to_save": ["lm_head"]},
            {"base_model.model.lm_head.weight": torch.zeros(8, HIDDEN)},
            "modules-to-save",
        ),
        (
            "bias",
            {"bias": "lora_only"},
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(OUT)},
            "bias",
        ),
        ("pissa", {"init_lora_weights": "pissa"}, {}, "unsupported-feature"),
        ("huge_rank", {"r": 640, "lora_alpha": 1280}, None, "rank-size"),
        (
            "megatron_names",
            {},
            {
                "base_model.model.decoder.layers.0.self_attention.linear_qkv.lora_a_default.weight": torch.zeros(
                    16, HIDDEN
                )
            },
            "megatron-names",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_refused_feature_is_an_error_with_its_reason(tmp_path, capsys, name, changes, tensors, code):
    config = {**CLEAN, **changes}
    base = {**_module("self_attn.q_proj", config["r"]), **_module("self_attn.v_proj", config["r"])}
    directory = write_adapter(tmp_path / name, config, {**base, **(tensors or {})})
    for version in ("0.31", "0.32"):
        status, out, _ = run_check(capsys, directory, "--vllm-version", version)
        assert status == 1 and f"NOT compatible with vLLM {version}" in out
        assert codes(directory, vllm_version=version)[code] == "error"
        line = next(line for line in out.splitlines() if f"[{code}]" in line)
        assert (
            "Fix: " in line and line.index(": ") < line.index("Fix: ") and line.endswith(")")
        )  # what, why, fix, (versions)


def _mixed(tmp_path, name="mixed"):
    """q_proj at rank 16 and scale 2, v_proj at rank 32 and scale 1 (rank_pattern and alpha_pattern)."""
    config = {**CLEAN, "rank_pattern": {"v_proj": 32}, "alpha_pattern": {"v_proj": 32}}
    return write_adapter(
        tmp_path / name, config, {**_module("self_attn.q_proj", 16), **_module("self_attn.v_proj", 32)}
    )


def test_per_module_ranks_and_scales_depend_on_the_vllm_version(tmp_path, capsys):
    directory = _mixed(tmp_path)
    status, out, _ = run_check(
        capsys, directory, "--vllm-version", "0.31"
    )  # neither pattern read: v_proj served at scale 2
    assert status == 1 and codes(directory, vllm_version="0.31") == {
        "per-module-scale": "error",
        "per-module-rank": "warning",
        "max-lora-rank": "info",
    }
    assert "(vLLM <= 0.31)" in next(line for line in out.splitlines() if "[per-module-scale]" in line)
    assert "--max-lora-rank 32" in next(line for line in out.splitlines() if "[per-module-rank]" in line)
    status, out, _ = run_check(capsys, directory)  # 0.32 reads both patterns (peft's rule), checks the largest rank
    assert status == 0 and codes(directory) == {"max-lora-rank": "info"}
    assert "compatible with vLLM 0.32 (rules, no base model): 0 error(s), 0 warning(s), 1 note(s)" in out


def test_warnings_leave_the_exit_status_at_zero(tmp_path, capsys):
    directory = write_adapter(tmp_path / "r12", r=12, lora_alpha=24)
    status, out, _ = run_check(capsys, directory)
    assert status == 0 and codes(directory) == {"rank-size": "warning"} and "pad_rank_to=16" in out


def test_fused_module_names_and_the_default_max_lora_rank(tmp_path):
    fused = write_adapter(tmp_path / "fused", tensors=_module("self_attn.qkv_proj", 16))
    assert codes(fused) == {"fused-names": "warning"}
    big = write_adapter(tmp_path / "big", r=64, lora_alpha=128)
    assert codes(big) == {"max-lora-rank": "info"}


EXPERTS, R, EXPERT_FFN = 4, 4, 8


def _fused_experts(tmp_path, name, family):
    """peft's fused expert layout (target_parameters) as the exporter writes it for transformers v5: lora_A [experts *
    r, in]."""
    tensors = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.mlp"
        tensors[f"{prefix}.experts.base_layer.lora_A.weight"] = torch.zeros(EXPERTS * R, HIDDEN)  # gate_up_proj
        tensors[f"{prefix}.experts.base_layer.lora_B.weight"] = torch.zeros(2 * EXPERT_FFN, R * EXPERTS)
        tensors[f"{prefix}.experts.lora_A.weight"] = torch.zeros(EXPERTS * R, EXPERT_FFN)  # down_proj
        tensors[f"{prefix}.experts.lora_B.weight"] = torch.zeros(HIDDEN, R * EXPERTS)
        tensors.update(_module("self_attn.q_proj", R, layer))
    config = {
        **CLEAN,
        "r": R,
        "lora_alpha": 2 * R,
        "target_modules": ["q_proj"],
        "target_parameters": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
    }
    directory = write_adapter(tmp_path / name, config, tensors)
    base = tmp_path / f"{family}-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": family, "architectures": ["X"]}))
    return directory, base


def test_fused_expert_ranks_are_read_as_r_and_vllm_applies_them_by_the_model_family(tmp_path, capsys):
    qwen, qwen_base = _fused_experts(tmp_path, "qwen", "qwen3_moe")
    for target in ("vllm", "peft"):
        assert "rank-mismatch" not in codes(qwen, target), "lora_A holds experts x r rows: the rank is r"
    status, out, _ = run_check(capsys, qwen, "--base", qwen_base)  # Qwen3-MoE: per-expert LoRA in vLLM, so flags
    assert status == 0 and "with vLLM 0.32 (rules, qwen3_moe)" in out
    line = next(line for line in out.splitlines() if "[engine-flags]" in line)
    assert (
        line.startswith("  warning")
        and "enable_mixed_moe_lora_format=True" in line
        and "is_3d_lora_weight=True" in line
    )
    mixtral, mixtral_base = _fused_experts(tmp_path, "mixtral", "mixtral")
    status, out, _ = run_check(capsys, mixtral, "--base", mixtral_base)  # vLLM's Mixtral: block_sparse_moe.experts
    assert status == 1 and "[applied-nowhere]" in out and "expert_layout='per_expert'" in out
    status, out, _ = run_check(capsys, qwen)  # no base: the flags, and a hint to pass --base
    assert status == 0 and "pass --base" in out


def test_per_expert_mixtral_names_are_applied(tmp_path):
    tensors = {}
    for e in range(EXPERTS):
        for w, (inp, out) in {
            "w1": (HIDDEN, EXPERT_FFN),
            "w3": (HIDDEN, EXPERT_FFN),
            "w2": (EXPERT_FFN, HIDDEN),
        }.items():
            tensors.update(_module(f"block_sparse_moe.experts.{e}.{w}", 8, hidden=inp, out=out))
    directory = write_adapter(
        tmp_path / "per_expert", {**CLEAN, "r": 8, "lora_alpha": 16, "target_modules": ["w1", "w2", "w3"]}, tensors
    )
    assert codes(directory, model_type="mixtral") == {}


@pytest.mark.parametrize(
    "name,changes,tensors",
    [
        ("float_r", {"r": 8.0}, None),
        ("infinite_alpha", {"lora_alpha": 1e999}, None),
        ("null_alpha", {"lora_alpha": None}, None),
        ("string_alpha", {"lora_alpha": "32"}, None),
        ("int_target_modules", {"target_modules": 5}, None),
        ("dict_target_modules", {"target_modules": {"q_proj": 1}}, None),
        ("list_rank_pattern", {"rank_pattern": ["v_proj"]}, None),
        ("list_alpha_pattern", {"alpha_pattern": []}, None),
        (
            "int32_tensor",
            {},
            {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(
                    16, HIDDEN, dtype=torch.int32
                ),
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(OUT, 16),
            },
        ),
        ("contradicting_rank", {"rank_pattern": {"v_proj": 8}}, None),
        ("backtracking_pattern", {"rank_pattern": {"(.*)*q_proj_x": 16}}, None),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_adapters_are_bad_input_not_compatible(tmp_path, capsys, name, changes, tensors):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({**CLEAN, **changes}).replace("Infinity", "1e999"))
    save_file(
        tensors or {**_module("self_attn.q_proj", 16), **_module("self_attn.v_proj", 16)},
        str(directory / "adapter_model.safetensors"),
    )
    for target in ("vllm", "peft"):
        status, out, err = run_check(capsys, directory, "--target", target)
        assert status == 2 and "compatible" not in out
        assert err.count("error: ") == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.timeout(120)
def test_patterns_cost_is_bounded_on_long_module_names(tmp_path, capsys):
    """`.*.*.*x` passes the pattern checks but takes Python's backtracking re over a second per 400-character name;
    the check matches it on an automaton (linear in the name) and finishes."""
    long = "a." * 200
    tensors = {}
    for i in range(40):
        tensors.update(_module(f"{long}m{i}.q_proj", 16))
    directory = write_adapter(tmp_path / "long", {**CLEAN, "rank_pattern": {".*.*.*x": 8}}, tensors)
    status, out, _ = run_check(capsys, directory)
    assert status == 0 and "compatible with vLLM" in out


def test_the_peft_target_accepts_what_vllm_refuses_but_not_ignored_keys(tmp_path, capsys):
    dora = write_adapter(
        tmp_path / "dora",
        {**CLEAN, "use_dora": True, "alpha_pattern": {"v_proj": 64}},
        {
            **_module("self_attn.q_proj", 16),
            **_module("self_attn.v_proj", 16),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(OUT),
        },
    )
    status, out, _ = run_check(capsys, dora, "--target", "peft")
    assert status == 0 and "compatible with peft" in out
    megatron = write_adapter(
        tmp_path / "megatron",
        tensors={"base_model.model.decoder.layers.0.mlp.linear_fc1.lora_a_default.weight": torch.zeros(16, HIDDEN)},
    )
    status, out, _ = run_check(capsys, megatron, "--target", "peft")
    assert status == 1 and "ignores them silently" in out


def test_every_adapter_of_a_multi_adapter_directory_is_checked(tmp_path, capsys):
    root = write_adapter(tmp_path / "adapters")
    write_adapter(
        root / "math",
        use_dora=True,
        tensors={
            **_module("self_attn.q_proj", 16),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(OUT),
        },
    )
    status, out, _ = run_check(capsys, root)
    assert status == 1
    lines = out.splitlines()
    assert any(
        line.endswith("compatible with vLLM 0.32 (rules, no base model): 0 error(s), 0 warning(s), 0 note(s)")
        for line in lines
    )
    assert any("(adapter 'math'): NOT compatible with vLLM 0.32" in line for line in lines)


def test_versions_outside_the_known_ones_say_so(tmp_path, capsys):
    directory = write_adapter(tmp_path / "clean")
    status, out, _ = run_check(capsys, directory, "--vllm-version", "0.40.1")
    assert status == 0 and out.startswith("note: rules read from vLLM 0.31-0.32; 0.40.1 may differ")


def test_bad_input_exits_2(tmp_path, capsys):
    clean = write_adapter(tmp_path / "clean")
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
    assert main(["check", str(clean), "--vllm-version", "latest"]) == 2
    assert main(["check", str(clean), "--vllm-version", "0.32", "--vllm-python", "/usr/bin/python3"]) == 2
    assert main(["check", str(clean), "--vllm-python", str(tmp_path / "no-python")]) == 2
    assert main(["check", str(clean), "--base", str(tmp_path / "no-base")]) == 2
    assert capsys.readouterr().err.count("error: ") == 9


def test_check_adapter_is_pure_and_orders_errors_first():
    shapes = {
        k: tuple(v.shape) for k, v in {**_module("self_attn.q_proj", 12), **_module("self_attn.v_proj", 12)}.items()
    }
    findings = check_adapter({**CLEAN, "r": 12, "lora_alpha": 24, "use_dora": True}, shapes)
    assert [f.code for f in findings] == ["dora", "rank-size"]
    assert all(f.holds == "vLLM 0.31-0.32" for f in findings)


def test_export_logs_what_vllm_makes_of_the_family_s_expert_layout(tmp_path, caplog):
    """The serving check every export runs knows the name map's family: a fused Mixtral adapter is applied nowhere."""
    import logging

    from tests.support import serving_models as sm

    logs = {}
    for family in ("mixtral", "qwen3_moe"):
        settings = {m: (8, 16.0) for m in sm.megatron_modules(family)}
        for layout in ("fused", "per_expert"):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="megatron_peft_export"):
                sm.write_adapter(tmp_path / f"{family}-{layout}", family, settings, seed=1, expert_layout=layout)
            logs[family, layout] = "\n".join(
                r.getMessage() for r in caplog.records if "serving check" in r.getMessage()
            )
    assert (
        "error [applied-nowhere]" in logs["mixtral", "fused"]
        and "expert_layout='per_expert'" in logs["mixtral", "fused"]
    )
    assert (
        "warning [engine-flags]" in logs["qwen3_moe", "fused"] and "applied-nowhere" not in logs["qwen3_moe", "fused"]
    )
    assert logs["mixtral", "per_expert"] == logs["qwen3_moe", "per_expert"] == ""


def test_gpt_oss_takes_the_fused_expert_layout_itself_and_needs_both_expert_parameters(tmp_path, capsys):
    """vLLM's GPT-OSS (is_3d_moe_weight) loads peft's fused layout without engine flags, and asserts that both
    gate_up_proj and down_proj carry LoRA."""
    both, base = _fused_experts(tmp_path, "gpt_oss", "gpt_oss")
    status, out, _ = run_check(capsys, both, "--base", base)
    assert status == 0 and "engine-flags" not in out and "one-expert-parameter" not in out, out
    config = json.loads((both / "adapter_config.json").read_text())
    config["target_parameters"] = ["mlp.experts.gate_up_proj"]
    tensors = {k: torch.zeros(v.shape) for k, v in load_file(both / "adapter_model.safetensors").items()}
    tensors = {k: v for k, v in tensors.items() if "experts.lora_" not in k}  # down_proj's (outermost) LoRA gone
    tensors = {k.replace("experts.base_layer.", "experts."): v for k, v in tensors.items()}
    lone = write_adapter(tmp_path / "gpt_oss_gate_up_only", config, tensors)
    status, out, _ = run_check(capsys, lone, "--base", base)
    assert status == 1 and "[one-expert-parameter]" in out and "gate_up_proj and down_proj" in out, out


def test_a_python_without_vllm_leaves_the_verdict_to_the_rules_with_a_note(tmp_path, capsys):
    import sys

    directory = _mixed(tmp_path)
    status, out, _ = run_check(capsys, directory, "--vllm-python", sys.executable)  # this venv has no vLLM
    assert status == 0 and out.startswith("note: could not ask vLLM (") and "the rules for vLLM 0.32 decide" in out
    assert "compatible with vLLM 0.32 (rules, no base model)" in out
