"""Nemotron-H and Qwen3-Next: peft on the transformers model gives the Megatron model's logits (<= ATOL, float32).

megatron-core's own `MambaModel` / `GatedDeltaNet` GPT run their forward on CPU with pure-torch stand-ins for the
triton/CUDA kernels only (tests/support/cpu_kernels.py: the scan, the gated norm, the delta rule); everything the
export depends on (in_proj and its TP split, conv channels, heads, norms, out_proj) is megatron's code. Both models
hold the same weights (tests/support/hybrid_logits.py); the adapters are ModelOpt LoRA on every linear the family
exports, exported live at TP1 and TP2 (at TP2 the kernels see each rank's heads), Megatron-Bridge's LoRA at TP2, and
imported back at the other TP size. The weight-delta tests in test_nemotron_h.py / test_qwen3_next.py stay: they check
the offline path and the deltas exactly."""

from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(400)

ATOL = 2e-5
"""float32 roundoff of these recurrent forwards, not a bound on the export: the base models alone (no adapter) differ
by up to 4.2e-6 and Qwen3-Next with Bridge's LoRA at TP2 by 1.0e-5 on some CPUs (the delta rule's accumulation order
follows the CPU's kernels), while the adapters move the logits by more than 1 (a scale off by 1e-4 would show as
1e-4)."""


def _build(family: str, tp: int):
    """(tiny config, this rank's Megatron model with the HF model's weights, the HF model) of `family`."""
    from tests.support import hybrid_logits as hl
    from tests.support import tiny_hybrid as th
    from tests.support import tiny_qwen3_next as tn

    if family == "nemotron_h":
        cfg = th.TinyHybridConfig()
        th.init_parallel(tp)
        hf = hl.nemotron_h_hf(cfg)
        return cfg, hl.build_nemotron_h(cfg, hf.state_dict()), hf, th.LORA_TARGETS
    cfg = tn.TinyNextConfig()
    tn.init_parallel(tp)
    hf = hl.qwen3_next_hf(cfg)
    return cfg, hl.build_qwen3_next(cfg, hf.state_dict()), hf, tn.LORA_TARGETS


BRIDGE_TARGETS = {
    "nemotron_h": ["in_proj", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
    "qwen3_next": ["in_proj", "out_proj", "linear_qkv", "linear_proj"],
}
"""Megatron-Bridge LoRA's targets: the linears each family exports (as ModelOpt's LORA_TARGETS)."""


def _adapt(model, family, targets, dialect):
    from tests.support import real_bridge
    from tests.support.tiny_gpt import apply_modelopt_lora

    if dialect == "bridge":
        return real_bridge.apply(model, "lora", dim=4, alpha=8, target_modules=BRIDGE_TARGETS[family])
    return apply_modelopt_lora(model, rank=4, scale=2.0, targets=targets)


def _export_and_compare(rank, world, tmp, family, dialect="modelopt"):
    import torch.distributed as dist

    from megatron_peft_export import export_adapter
    from tests.support.tiny_gpt import compare_peft, fill_lora_random, hf_logits, megatron_logits, sample_tokens

    cfg, model, hf, targets = _build(family, world)
    tokens = sample_tokens(cfg)
    base_diff = (megatron_logits(model, tokens) - hf_logits(hf, tokens)).abs().max().item()
    model = _adapt(model, family, targets, dialect)
    fill_lora_random(model, seed=17)
    logits = megatron_logits(model, tokens)
    base = Path(tmp) / "base"
    if rank == 0:
        hf.config.save_pretrained(base)
    dist.barrier()
    out = export_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(base))
    if rank != 0:
        return None
    renames = [("base_model.model.backbone.", "base_model.model.model.")]  # HF's Nemotron-H names, transformers 5's
    diff = compare_peft(out, cfg, tokens, logits, atol=ATOL, base=hf, renames=renames if family == "nemotron_h" else ())
    return {"base": base_diff, "adapter": diff, "logits": logits}


@pytest.mark.parametrize(
    "family,tp",
    [
        pytest.param(
            "nemotron_h",
            1,
            id="nemotron_h-TP1",
            marks=pytest.mark.family("nemotron_h", path="export", layout="TP1", check="logits"),
        ),
        pytest.param(
            "nemotron_h",
            2,
            id="nemotron_h-TP2",
            marks=pytest.mark.family("nemotron_h", path="export", layout="TP2", check="logits"),
        ),
        pytest.param(
            "qwen3_next",
            1,
            id="qwen3_next-TP1",
            marks=pytest.mark.family("qwen3_next", path="export", layout="TP1", check="logits"),
        ),
        pytest.param(
            "qwen3_next",
            2,
            id="qwen3_next-TP2",
            marks=pytest.mark.family("qwen3_next", path="export", layout="TP2", check="logits"),
        ),
    ],
)
def test_live_export_matches_megatron_logits(tmp_path, family, tp):
    """The base models agree, and peft with the exported adapter gives the adapted Megatron model's logits (compare_peft
    also checks that the adapter moves the logits and that peft loads every tensor of the file)."""
    result = run_ranks(_export_and_compare, tp, str(tmp_path), family, timeout=360)[0]
    assert result["base"] <= ATOL
    assert result["adapter"] <= ATOL


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(
            "nemotron_h",
            marks=pytest.mark.family("nemotron_h", path="export", layout="Bridge LoRA TP2", check="logits"),
        ),
        pytest.param(
            "qwen3_next",
            marks=pytest.mark.family("qwen3_next", path="export", layout="Bridge LoRA TP2", check="logits"),
        ),
    ],
)
def test_megatron_bridge_lora_export_matches_megatron_logits(real_bridge, tmp_path, family):
    """Megatron-Bridge's own LoRA (wrapping in_proj, attention and MLP linears by name) at TP2."""
    result = run_ranks(_export_and_compare, 2, str(tmp_path), family, dialect="bridge", timeout=360)[0]
    assert result["adapter"] <= ATOL


def _import_logits(rank, world, tmp, family):
    """A fresh model at TP `world` with zero ModelOpt adapters, filled from the exported HF adapter: its logits."""
    import torch

    from megatron_peft_export import load_hf_adapter
    from tests.support.tiny_gpt import megatron_logits, sample_tokens

    cfg, model, _, targets = _build(family, world)
    model = _adapt(model, family, targets, "modelopt")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora" in name:
                param.zero_()
    load_hf_adapter(model, Path(tmp) / "adapter", base_model_name_or_path=str(Path(tmp) / "base"))
    return megatron_logits(model, sample_tokens(cfg))


@pytest.mark.parametrize(
    ("family", "export_tp", "import_tp"),
    [
        pytest.param(
            "nemotron_h",
            2,
            1,
            marks=pytest.mark.family("nemotron_h", path="import", layout="TP2 -> TP1", check="logits"),
        ),
        pytest.param(
            "nemotron_h",
            1,
            2,
            marks=pytest.mark.family("nemotron_h", path="import", layout="TP1 -> TP2", check="logits"),
        ),
        pytest.param(
            "qwen3_next",
            2,
            1,
            marks=pytest.mark.family("qwen3_next", path="import", layout="TP2 -> TP1", check="logits"),
        ),
        pytest.param(
            "qwen3_next",
            1,
            2,
            marks=pytest.mark.family("qwen3_next", path="import", layout="TP1 -> TP2", check="logits"),
        ),
    ],
)
def test_import_back_gives_the_exporting_models_logits(tmp_path, family, export_tp, import_tp):
    """Exported at one TP size (and checked against peft), imported into a fresh model at another: its logits are the
    exporting model's (the export's compare_peft asserts the adapter moves them by more than 1e-3 from the base's)."""
    exported = run_ranks(_export_and_compare, export_tp, str(tmp_path), family, timeout=360)[0]
    imported = run_ranks(_import_logits, import_tp, str(tmp_path), family, timeout=360)[0]
    assert (imported - exported["logits"]).abs().max().item() <= ATOL
