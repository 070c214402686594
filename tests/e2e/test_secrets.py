"""Secrets (the Hub token, the W&B API key) never reach a log, a model card, a config or any written file: a whole
export + verify (logged to W&B) + push flow, through the training hook and through the CLI, with both secrets set
to unique values, then every file written and every line printed or logged is searched for them."""

import logging
import secrets
from pathlib import Path

import huggingface_hub.constants
import pytest
import wandb  # noqa: F401  (imported in the parent so forked ranks start fast)

from megatron_peft_export.cli import main
from tests.e2e.test_verify import _cli, _save_base
from tests.support.fake_hub import FakeHub
from tests.support.hook_loop import LogRecords, checkpoint_dir, lora_model, optimizer_step
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _train_verify_push(rank, world, tmp, endpoint):
    """The hook with verification (logged to W&B, the adapter as an artifact) and pushes of every checkpoint."""
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from megatron_peft_export.services.hub import PushConfig
    from megatron_peft_export.services.verify import VerifyConfig

    with LogRecords(logging.DEBUG, logger="") as records:
        base = _save_base(tmp)
        model = lora_model(world)
        verify = VerifyConfig(
            wandb_project="proj", wandb_exp_name="sft", wandb_save_dir=str(Path(tmp) / "wandb"), wandb_artifact=True
        )
        push = PushConfig(repo_id="me/run", strategy="all_checkpoints", endpoint=endpoint, retry_wait=0.0)
        hook = AdapterExportHook(HookConfig(base_model_name_or_path=base, verify=verify, push=push))
        for iteration in (1,):
            optimizer_step(model, iteration)
            hook.on_checkpoint_saved(iteration, checkpoint_dir(Path(tmp) / "save", iteration), model)
        hook.finalize()
        outcome = ([r.status for r in hook.verification.results], list(hook.pusher.pushed))
    return outcome, records.lines


def test_no_secret_reaches_any_written_file_log_or_output(tmp_path, monkeypatch, capfd):
    hub_token, wandb_key = "hf_" + secrets.token_hex(16), secrets.token_hex(20)
    for name, value in {
        "HF_TOKEN": hub_token,
        "WANDB_API_KEY": wandb_key,
        "WANDB_MODE": "offline",
        "WANDB_DIR": tmp_path / "wandb-dir",
        "WANDB_DATA_DIR": tmp_path / "wandb-data",
        "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
        "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
    }.items():
        monkeypatch.setenv(name, str(value))  # the forked ranks inherit them
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-login"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    save, adapter = tmp_path / "save", tmp_path / "save" / "iter_0000001" / "hf_adapter"
    with FakeHub(hub_token) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        (((statuses, pushed), logs),) = run_ranks(_train_verify_push, 1, str(tmp_path), hub.endpoint)
        verified = run_ranks(
            _cli,
            1,
            [
                "verify",
                str(adapter),
                "--base-model",
                str(tmp_path / "base"),
                "--output",
                str(tmp_path / "cli.json"),
                "--wandb-project",
                "proj",
                "--wandb-exp-name",
                "cli",
                "--wandb-save-dir",
                str(tmp_path / "wandb-cli"),
            ],
        )[0]
        with LogRecords(logging.DEBUG, logger="") as records:
            assert (
                main(
                    [
                        "push",
                        str(save),
                        "--repo-id",
                        "me/cli",
                        "--endpoint",
                        hub.endpoint,
                        "--strategy",
                        "all_checkpoints",
                    ]
                )
                == 0
            )
            hub.fail(401)  # the error paths too
            assert main(["push", str(adapter), "--repo-id", "me/cli", "--endpoint", hub.endpoint]) == 2
            hub.heal()
            logging.getLogger("megatron_peft_export").warning(
                "masked: %s %s", hub_token, wandb_key
            )  # our logger masks both
        out, err = capfd.readouterr()
        received = {
            f"hub:{repo}/{path}": data
            for repo, r in hub.repos.items()
            for files in r.branches.values()
            for path, data in files.items()
        }

    assert statuses == ["passed"] and len(pushed) >= 1 and verified == 0, (statuses, pushed, verified)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"adapter_config.json", "README.md", "verification.json"} <= {p.name for p in written}
    assert any(p.suffix == ".wandb" for p in written) and any("hub:me/cli/" in k for k in received), (
        "the checks saw the real files"
    )
    assert "authentication failed (401)" in err, "the checks saw the real output"
    assert any(line.endswith("masked: *** ***") for line in records.lines)
    for name, value in (("HF_TOKEN", hub_token), ("WANDB_API_KEY", wandb_key)):
        leaks = [str(p) for p in written if value.encode() in p.read_bytes()]
        leaks += [key for key, data in received.items() if value.encode() in data]
        leaks += [
            where
            for where, text in (("stdout", out), ("stderr", err), ("logs", "\n".join(logs + records.lines)))
            if value in text
        ]
        assert leaks == [], f"{name} leaked into {leaks}"
