"""The verification core without models: metrics, thresholds, key checks, block diagnosis, config and flags."""

import argparse

import pytest
import torch

from megatron_peft_export.config import HookConfig
from megatron_peft_export.errors import ExportError
from megatron_peft_export.services.verify import (
    DEFAULT_THRESHOLDS,
    Thresholds,
    VerifyConfig,
    compare_logits,
    first_divergence,
    histogram,
    key_failures,
    precision_of,
    threshold_failures,
    top_k_rows,
)


def _logits(seed, shape=(2, 3, 11)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_identical_logits_agree_fully_and_the_effect_is_measured_against_the_base():
    ref, base = _logits(0), _logits(1)
    metrics = compare_logits(ref.clone(), ref, base, top_k=3)
    assert metrics["max_abs_diff"] == metrics["mean_abs_diff"] == 0.0
    assert metrics["top1_agreement"] == metrics["topk_agreement"] == 1.0
    assert metrics["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert (
        metrics["adapter_effect_max"]
        == metrics["reference_effect_max"]
        == pytest.approx((ref - base).abs().max().item())
    )
    assert threshold_failures(metrics, DEFAULT_THRESHOLDS["float32"], 3) == []


def test_disagreement_fails_every_limit_it_exceeds_and_names_the_option():
    ref = _logits(0)
    hf = ref.clone()
    hf[0, 0] = hf[0, 0].flip(0)  # one position's ranking reversed: top-1 and top-k change there
    metrics = compare_logits(hf, ref, ref, top_k=3)
    assert metrics["top1_agreement"] == pytest.approx(5 / 6) and metrics["topk_agreement"] < 1
    assert metrics["kl_divergence"] > 0 and metrics["adapter_effect_max"] == metrics["max_abs_diff"]
    failures = threshold_failures(metrics, DEFAULT_THRESHOLDS["float32"], 3)
    assert any(f.startswith("top-1 agreement 0.833 < 0.98 (verify.min_top1_agreement)") for f in failures)
    assert any("(verify.max_abs_diff)" in f for f in failures) and any(
        "(verify.max_kl_divergence)" in f for f in failures
    )


def test_thresholds_default_per_precision_and_can_be_set():
    assert precision_of("float32", "float32") == "float32" and precision_of("float32", "bfloat16") == "bfloat16"
    assert Thresholds.resolve(VerifyConfig(), "float32") == DEFAULT_THRESHOLDS["float32"]
    set_ = Thresholds.resolve(VerifyConfig(max_abs_diff=0.5, min_top1_agreement=0.5), "bfloat16")
    assert (set_.max_abs_diff, set_.min_top1_agreement, set_.mean_abs_diff) == (
        0.5,
        0.5,
        DEFAULT_THRESHOLDS["bfloat16"].mean_abs_diff,
    )


def test_key_failures_name_ignored_and_unfilled_keys():
    file_keys = {"a.q_proj.lora_A.weight", "a.query.lora_A.weight"}
    loaded = {"a.q_proj.lora_A.weight", "a.k_proj.lora_A.weight"}
    ignored, unfilled = key_failures(file_keys, loaded)
    assert "peft silently ignores them: a.query.lora_A.weight" in ignored
    assert "peft leaves them at their initial values: a.k_proj.lora_A.weight" in unfilled
    assert key_failures(loaded, loaded) == []


def test_first_divergence_is_the_first_block_in_forward_order():
    ref = {
        (layer, block): _logits(layer * 2 + (block == "mlp"), (1, 4, 16))
        for layer in range(3)
        for block in ("self_attn", "mlp")
    }
    ours = {k: v.clone() for k, v in ref.items()}
    assert first_divergence(ours, ref, 1e-4) is None
    ours[(1, "mlp")] += 1.0
    ours[(2, "self_attn")] += 1.0
    where = first_divergence(ours, ref, 1e-4)
    assert (where["layer"], where["block"]) == (1, "mlp")


def test_top_k_rows_and_histogram():
    ids, ref = torch.tensor([[3, 4]]), _logits(0, (1, 2, 11))
    rows = top_k_rows(ids, ref, ref, 3, decode=lambda t: f"<{t[0]}>")
    assert (
        len(rows) == 2
        and rows[0]["top1_match"]
        and rows[0]["hf_top_k"] == rows[0]["megatron_top_k"] == ref[0, 0].topk(3).indices.tolist()
    )
    assert rows[1]["input_token"] == "<4>" and len(rows[1]["hf_tokens"]) == 3
    h = histogram(torch.zeros(5), bins=4)
    assert sum(h["counts"]) == 5 and len(h["edges"]) == 5


def test_verify_section_in_yaml():
    config = HookConfig.from_mapping(
        {"verify": {"base_model": "/models/x", "max_abs_diff": 0.01, "wandb_project": "p"}}
    )
    assert config.verify == VerifyConfig(base_model="/models/x", max_abs_diff=0.01, wandb_project="p")
    assert HookConfig.from_mapping({"verify": True}).verify == VerifyConfig()
    assert HookConfig.from_mapping({"verify": False}).verify is None and HookConfig().verify is None
    with pytest.raises(ExportError, match="export_hf_adapter.verify: unknown option.*max_diff; expected some of"):
        HookConfig.from_mapping({"verify": {"max_diff": 1}})
    with pytest.raises(ExportError, match="verify.dtype: expected one of float32, bfloat16, found 'fp8'"):
        VerifyConfig(dtype="fp8")
    with pytest.raises(ExportError, match="verify.prompt needs verify.tokenizer"):
        VerifyConfig(prompt="Hello")


def test_megatron_lm_flags_reuse_megatrons_wandb_arguments():
    from megatron_peft_export.integrations.megatron_lm import add_args, chain, config_from_args

    def megatron_logging(parser):  # as Megatron-LM defines them (core 0.15-0.19)
        for flag in ("--wandb-project", "--wandb-entity", "--wandb-exp-name", "--wandb-save-dir"):
            parser.add_argument(flag, type=str, default="")
        parser.add_argument("--save", type=str, default=None)
        return parser

    parser = chain(megatron_logging, add_args)(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--export-hf-adapter",
            "--hf-adapter-verify",
            "--hf-adapter-verify-required",
            "--hf-adapter-verify-base-model",
            "/models/b",
            "--hf-adapter-wandb-artifact",
            "--wandb-project",
            "proj",
            "--wandb-exp-name",
            "sft",
            "--save",
            "/ckpt",
        ]
    )
    verify = config_from_args(args).verify
    assert (
        verify.base_model,
        verify.required,
        verify.wandb_project,
        verify.wandb_exp_name,
        verify.wandb_entity,
        verify.wandb_artifact,
    ) == ("/models/b", True, "proj", "sft", None, True)
    assert verify.wandb_save_dir == "/ckpt/wandb"  # Megatron-LM's default when --wandb-save-dir is not given
    assert config_from_args(parser.parse_args(["--export-hf-adapter"])).verify is None
