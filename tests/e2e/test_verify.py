"""Verification on real megatron-core models in real gloo processes: reference capture at save, verify after publish,
and the CLI passing correct exports and failing deliberately broken ones, each failure naming what is wrong."""

import json
import shutil
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _save_base(tmp):
    """Rank 0 writes the HF twin of the tiny model (the local base model verification loads)."""
    import torch.distributed as dist

    from tests.support.tiny_gpt import TinyGPTConfig, hf_llama_twin

    base = Path(tmp) / "base"
    if dist.get_rank() == 0 and not base.exists():
        hf_llama_twin(TinyGPTConfig()).save_pretrained(base)
    dist.barrier()
    return str(base)


def _hook_run(rank, world, tmp, *, tp=1, pp=1, vpp=None, sp=False, iterations=(1,), verify=None, base=True):
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from megatron_peft_export.services.verify import VerifyConfig
    from tests.support.hook_loop import checkpoint_dir, optimizer_step
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel

    init_parallel(tp, pp, vpp)
    base_dir = _save_base(tmp) if base else None
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig(), sequence_parallel=sp))
    fill_lora_random(model, seed=3)
    chunks = model if isinstance(model, list) else [model]
    training_modes = [c.training for c in chunks]
    hook = AdapterExportHook(HookConfig(base_model_name_or_path=base_dir, verify=VerifyConfig(**(verify or {}))))
    for iteration in iterations:
        for chunk in chunks:
            optimizer_step(chunk, iteration)
        hook.on_checkpoint_saved(iteration, checkpoint_dir(Path(tmp) / "save", iteration), model)
    hook.finalize()
    modes_restored = [c.training for c in chunks] == training_modes
    return {"results": [r.to_json() for r in hook.verification.results], "modes_restored": modes_restored}


@pytest.mark.parametrize(
    "world,layout",
    [
        (1, {}),
        (2, {"tp": 2}),
        (2, {"pp": 2}),
        (4, {"tp": 2, "pp": 2}),
        (2, {"pp": 2, "vpp": 2}),
        (2, {"tp": 2, "sp": True}),
    ],
    ids=["tp1", "tp2", "pp2", "tp2xpp2", "vpp2", "tp2-sp"],
)
def test_hook_captures_a_reference_and_verifies_each_adapter(tmp_path, world, layout):
    from safetensors import safe_open

    results = run_ranks(_hook_run, world, str(tmp_path), iterations=(1, 2), **layout)
    assert all(r["modes_restored"] for r in results), "capture must restore the model's train/eval modes"
    assert all(r["results"] == [] for r in results[1:]), "only the writer verifies"
    for iteration, result in zip((1, 2), results[0]["results"]):
        adapter = tmp_path / "save" / f"iter_000000{iteration}" / "hf_adapter"
        assert result["status"] == "passed", result["summary"]
        assert result["iteration"] == iteration and result["failures"] == []
        assert result["max_abs_diff"] <= 1e-5 and result["top1_agreement"] == 1.0 and result["topk_agreement"] == 1.0
        assert result["adapter_effect_max"] > 1e-2, "the probe must see the adapter"
        assert result["first_divergence"] is None, "every block's output agrees too"
        assert json.loads((adapter / "verification.json").read_text())["passed"] is True
        with safe_open(adapter / "verification" / "reference.safetensors", "pt") as f:
            assert f.metadata()["iteration"] == str(iteration)
            assert f.get_tensor("logits").shape == (2, 16, 128)  # probe_length 32 is cut to the model's 16
            assert {k for k in f.keys() if k.startswith("blocks.")} == {
                f"blocks.{i}.{b}" for i in range(4) for b in ("self_attn", "mlp")
            }


def _init_functions_seen_while_verifying(rank, world, tmp):
    """The hook verifies in the background while this (training) thread watches torch.nn.init's functions."""
    import threading

    import torch

    _save_base(tmp)  # builds the HF twin here, before watching (the hook's run finds it saved)
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.add(torch.nn.init.kaiming_uniform_.__module__)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = _hook_run(rank, world, tmp, iterations=(1, 2))
    finally:
        done.set()
        watcher.join()
    return sorted(seen), [r["status"] for r in result["results"]]


def test_verification_never_touches_the_training_process_torch_init(tmp_path):
    """transformers replaces torch.nn.init's functions process-wide while it loads a model; verifying in the training
    process let a checkpoint save on the training thread (ModelOpt validating its state) see them and fail."""
    seen, statuses = run_ranks(_init_functions_seen_while_verifying, 1, str(tmp_path))[0]
    assert statuses == ["passed", "passed"]
    assert seen == ["torch.nn.init"]


def test_without_a_local_base_model_verification_is_skipped_with_a_warning(tmp_path):
    (r0, _) = run_ranks(_hook_run, 2, str(tmp_path), tp=2, base=False, verify={"base_model": "some-org/not-downloaded"})
    (result,) = r0["results"]
    assert result["status"] == "skipped" and result["passed"] is False
    assert "no base model available locally (some-org/not-downloaded)" in result["warnings"][0]
    assert (tmp_path / "save" / "iter_0000001" / "hf_adapter" / "verification" / "reference.safetensors").is_file()


def test_required_verification_without_a_base_model_fails(tmp_path):
    (r0, _) = run_ranks(
        _hook_run,
        2,
        str(tmp_path),
        tp=2,
        base=False,
        verify={"base_model": "some-org/not-downloaded", "required": True},
    )
    (result,) = r0["results"]
    assert result["status"] == "failed" and "no base model available locally" in result["failures"][0]


# ------------------------------------------------------------------------ CLI on broken exports


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A correct TP2 export with its reference (written by the hook), and the HF base model."""
    tmp = tmp_path_factory.mktemp("verify")
    results = run_ranks(_hook_run, 2, str(tmp), tp=2, verify={"wandb": False})
    assert results[0]["results"][0]["status"] == "passed"
    return tmp / "save" / "iter_0000001" / "hf_adapter", tmp / "base"


def _cli(rank, world, argv):
    from megatron_peft_export.cli import main

    return main(argv)


def _broken_copy(adapter, tmp_path, edit):
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "verification.json").unlink()
    tensors = load_file(broken / "adapter_model.safetensors")
    edit(tensors, torch)
    save_file(tensors, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    return broken


def _swap_gate_up(tensors, torch):
    gate, up = (
        "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight",
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight",
    )
    tensors[gate], tensors[up] = tensors[up], tensors[gate]


def _shuffle_kv_head(tensors, torch):
    key = "base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight"
    head_dim = 8
    rows = tensors[key].clone()
    rows[head_dim : 2 * head_dim] = rows[head_dim : 2 * head_dim].flip(0)  # KV head 1's rows, reversed
    tensors[key] = rows


def _rename_key(tensors, torch):
    old = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[old.replace("q_proj", "query_proj")] = tensors.pop(old)


def _verify_cli(adapter, base, *extra):
    (status,) = run_ranks(_cli, 1, ["verify", str(adapter), "--base-model", str(base), *extra])
    result = (
        json.loads((Path(adapter) / "verification.json").read_text())
        if (Path(adapter) / "verification.json").exists()
        else None
    )
    return status, result


def test_cli_passes_a_correct_export(exported):
    adapter, base = exported
    status, result = _verify_cli(adapter, base)
    assert status == 0 and result["passed"] and result["max_abs_diff"] <= 1e-5
    assert result["keys"]["ignored_by_peft"] == [] and result["keys"]["missing_from_file"] == []
    assert len(result["top_k_table"]) == 2 * 16 and len(result["top_k_table"][0]["hf_top_k"]) == 5


def test_cli_bfloat16_uses_the_bfloat16_limits_and_custom_thresholds(exported, tmp_path):
    adapter, base = exported
    status, _ = _verify_cli(adapter, base, "--dtype", "bfloat16", "--output", str(tmp_path / "bf16.json"))
    result = json.loads((tmp_path / "bf16.json").read_text())
    assert status == 0 and result["precision"] == "bfloat16" and result["thresholds"]["max_abs_diff"] == 1.0
    assert 1e-5 < result["max_abs_diff"] < 1.0  # bfloat16 rounding is visible, and within its limits
    status, _ = _verify_cli(
        adapter, base, "--dtype", "bfloat16", "--max-abs-diff", "1e-6", "--output", str(tmp_path / "strict.json")
    )
    strict = json.loads((tmp_path / "strict.json").read_text())
    assert status == 1 and strict["failures"][0].endswith("> 1e-06 (verify.max_abs_diff)")


@pytest.mark.parametrize(
    "edit,expected",
    [
        (_swap_gate_up, ["model.layers.1.mlp", "gate/up order", "max |HF - Megatron| logit difference"]),
        (_shuffle_kv_head, ["model.layers.2.self_attn", "KV head order"]),
        (
            _rename_key,
            [
                "peft silently ignores them: base_model.model.model.layers.0.self_attn.query_proj.lora_A.weight",
                "missing from the file, so peft leaves them at their initial values: "
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            ],
        ),
    ],
    ids=["gate-up-swapped", "kv-head-shuffled", "key-renamed"],
)
def test_cli_fails_a_broken_export_and_names_what_is_wrong(exported, tmp_path, edit, expected):
    adapter, base = exported
    broken = _broken_copy(adapter, tmp_path, edit)
    status, result = _verify_cli(broken, base)
    assert status == 1 and result["status"] == "failed"
    text = "\n".join(result["failures"])
    for fragment in expected:
        assert fragment in text, text


def test_cli_bad_input_exits_2(exported, tmp_path):
    adapter, base = exported
    assert _verify_cli(adapter, tmp_path / "no-such-base")[0] == 2
    no_reference = tmp_path / "no_reference"
    shutil.copytree(adapter, no_reference)
    shutil.rmtree(no_reference / "verification")
    assert _verify_cli(no_reference, base)[0] == 2
    assert _verify_cli(tmp_path / "nothing-here", base)[0] == 2
