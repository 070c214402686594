"""Verification logged to Weights & Biases, offline: the tests read the run's files back (records of the .wandb
file, the table's media file) to check the metric keys, the top-k table, the histogram and the artifact."""

import json
from pathlib import Path

import pytest
import wandb  # noqa: F401  (imported in the parent so forked ranks start fast)

from tests.e2e.test_verify import _hook_run
from tests.support import wandb_files
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
METRICS = {
    "max_abs_diff",
    "mean_abs_diff",
    "top1_agreement",
    "topk_agreement",
    "kl_divergence",
    "adapter_effect_max",
    "adapter_effect_mean",
    "reference_effect_max",
}


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """Offline, silent, and every W&B file under tmp_path (the forked ranks inherit the environment)."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DATA_DIR": tmp_path / "wandb-data",
        "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
        "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
    }.items():
        monkeypatch.setenv(name, str(value))
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)


def _verification_rows(run_dirs):
    return sorted(
        (row for d in run_dirs for row in wandb_files.history(d) if "hf_adapter/iteration" in row),
        key=lambda r: r["hf_adapter/iteration"],
    )


def test_hook_logs_metrics_table_histogram_and_artifact_per_checkpoint(tmp_path):
    verify = {
        "wandb_project": "proj",
        "wandb_exp_name": "sft",
        "wandb_save_dir": str(tmp_path / "wandb"),
        "wandb_artifact": True,
    }
    run_ranks(_hook_run, 2, str(tmp_path), tp=2, iterations=(1, 2), verify=verify)
    (run_dir,) = wandb_files.offline_runs(tmp_path / "wandb")  # one rank logs
    assert wandb_files.run_info(run_dir) | {"id": None} == {
        "project": "proj",
        "name": "sft-hf-adapter",
        "group": "sft",
        "id": None,
    }
    rows = _verification_rows([run_dir])
    assert [r["hf_adapter/iteration"] for r in rows] == [1, 2]
    for iteration, row in zip((1, 2), rows):
        adapter = tmp_path / "save" / f"iter_000000{iteration}" / "hf_adapter"
        result = json.loads((adapter / "verification.json").read_text())
        assert {f"hf_adapter/verify/{m}" for m in METRICS} <= set(row)
        assert row["hf_adapter/verify/passed"] == 1 and row["hf_adapter/verify/status"] == "passed"
        assert (
            row["hf_adapter/verify/max_abs_diff"] == pytest.approx(result["max_abs_diff"])
            and row["hf_adapter/verify/max_abs_diff"] <= 1e-5
        )
        assert row["hf_adapter/verify/logit_diff"]["_type"] == "histogram"
        assert sum(row["hf_adapter/verify/logit_diff"]["values"]) == 2 * 16 * 128
        assert (
            row["hf_adapter/verify/top_k"]["_type"] == "table-file"
            and row["hf_adapter/verify/top_k"]["nrows"] == 2 * 16
        )
        table = wandb_files.table(run_dir, row["hf_adapter/verify/top_k"]["path"])
        assert table["columns"] == [
            "sample",
            "position",
            "input",
            "hf_top_k",
            "megatron_top_k",
            "top1_match",
            "overlap",
        ]
        first, expected = table["data"][0], result["top_k_table"][0]
        assert first[3] == " | ".join(map(str, expected["hf_top_k"])) and first[4] == " | ".join(
            map(str, expected["megatron_top_k"])
        )
        assert all(r[5] is True and r[6] == 1.0 for r in table["data"])
    artifacts = [a for a in wandb_files.artifacts(run_dir) if a["type"] == "model"]
    assert [
        (a["name"], a["aliases"], a["metadata"]["iteration"], a["metadata"]["verification"]) for a in artifacts
    ] == [
        ("sft-hf-adapter", ["iter_0000001", "latest"], 1, "passed"),
        ("sft-hf-adapter", ["iter_0000002", "latest"], 2, "passed"),
    ]
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "verification.json",
        "verification/reference.safetensors",
    } <= set(artifacts[0]["files"])


def _reuse_run(rank, world, tmp):
    """A run someone else started in the writer process is reused, not duplicated."""

    run = wandb.init(project="training", name="main-run", dir=str(Path(tmp) / "wandb"))
    run.log({"loss": 1.0})
    result = _hook_run(rank, world, tmp, iterations=(1,), verify={})
    run.finish()
    return result


def test_an_active_run_is_reused(tmp_path):
    run_ranks(_reuse_run, 1, str(tmp_path))
    (run_dir,) = wandb_files.offline_runs(tmp_path / "wandb")
    assert wandb_files.run_info(run_dir)["name"] == "main-run"
    (row,) = _verification_rows([run_dir])
    assert row["hf_adapter/iteration"] == 1 and row["hf_adapter/verify/passed"] == 1


def _failing_wandb_run(rank, world, tmp):

    from tests.support.hook_loop import LogRecords

    def broken_init(*args, **kwargs):
        raise RuntimeError("W&B is down")

    wandb.init = broken_init
    records = LogRecords()
    result = _hook_run(rank, world, tmp, tp=2, iterations=(1, 2), verify={"wandb_project": "proj"})
    return result, records.messages


def test_a_wandb_failure_never_stops_training(tmp_path):
    (r0, logs0), (r1, logs1) = run_ranks(_failing_wandb_run, 2, str(tmp_path))
    assert [r["status"] for r in r0["results"]] == ["passed", "passed"]
    failures = [m for m in logs0 if "W&B logging" in m]
    assert len(failures) == 2 and all("training continues: RuntimeError: W&B is down" in m for m in failures)
    assert logs1 == []
