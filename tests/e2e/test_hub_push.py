"""Pushes through the training hook on real megatron-core models in real gloo processes, against the fake
Hub (tests/support/fake_hub.py) running in the pytest process: background pushes (the Megatron-LM flags:
test_megatron_lm.py),
errors that leave training running, and no token in any file or log."""

import logging
import tempfile
from pathlib import Path

import pytest

from megatron_peft_export.cli import main
from tests.support.fake_hub import closed_port, resume_from
from tests.support.hook_loop import LogRecords, checkpoint_dir, lora_model, optimizer_step
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
ADAPTER = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def _train_and_push(rank, world, save, push, saves, resume_endpoint=None):
    """A training loop with the hook; with the fake Hub paused, so no push can finish before training does."""
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from megatron_peft_export.services.hub import PushConfig

    with LogRecords(logging.DEBUG, logger="") as records:
        model = lora_model(world)
        hook = AdapterExportHook(HookConfig(push=PushConfig(**push)))
        outcome = []
        for iteration in range(1, saves + 1):
            optimizer_step(model, iteration)
            hook.on_checkpoint_saved(iteration, checkpoint_dir(save, iteration), model)
            outcome.append(f"trained {iteration}")
        if resume_endpoint and rank == 0:
            resume_from(resume_endpoint)
        hook.finalize()
        outcome.append("finalized")
        pushed = list(hook.pusher.pushed)
    return outcome, pushed, records.lines


def test_the_hook_pushes_in_the_background_and_keeps_every_iteration(hub, tmp_path):
    push = {"repo_id": "me/run", "strategy": "all_checkpoints", "endpoint": hub.endpoint, "retry_wait": 0.0}
    hub.pause()  # every commit waits until rank 0 has finished training
    (out0, pushed0, logs0), (out1, pushed1, _) = run_ranks(
        _train_and_push, 2, str(tmp_path), push, 3, hub.endpoint, timeout=60
    )
    assert out0 == out1 == ["trained 1", "trained 2", "trained 3", "finalized"]
    assert pushed1 == [] and 1 <= len(pushed0) == len(hub.commits) <= 3
    assert any("queued" in line for line in logs0), "a push waiting behind the running one says so"
    named = sorted(
        int(n) for c in hub.commits for n in c.summary.split("(iteration")[1].split(";")[0].strip("s )").split(", ")
    )
    assert named == [1, 2, 3], [c.summary for c in hub.commits]
    files = hub.files("me/run")
    assert sorted(files) == sorted([*ADAPTER, *(f"iter_000000{i}/{n}" for i in (1, 2, 3) for n in ADAPTER)])
    for i in (1, 2, 3):
        local = tmp_path / f"iter_000000{i}" / "hf_adapter"
        assert files[f"iter_000000{i}/adapter_model.safetensors"] == (local / "adapter_model.safetensors").read_bytes()
        assert f"| training iteration | {i} |" in files[f"iter_000000{i}/README.md"].decode()
    assert files["adapter_model.safetensors"] == files["iter_0000003/adapter_model.safetensors"]


DOCUMENTED = {
    401: "authentication failed (401): the Hub did not accept the token",
    403: "permission denied (403): the token may not create or write me/run",
    404: "not found (404): me/run does not exist or the token cannot see it",
    "refused": "cannot reach http://127.0.0.1:",
}


@pytest.mark.parametrize("error", DOCUMENTED, ids=str)
def test_hub_errors_are_logged_once_per_push_and_training_goes_on(hub, tmp_path, error):
    endpoint = closed_port() if error == "refused" else hub.endpoint
    if error != "refused":
        hub.fail(error)
    push = {"repo_id": "me/run", "strategy": "every_save", "endpoint": endpoint, "retries": 2, "retry_wait": 0.0}
    (out0, pushed0, logs0), (out1, _, logs1) = run_ranks(_train_and_push, 2, str(tmp_path), push, 2)
    assert out0 == out1 == ["trained 1", "trained 2", "finalized"]
    failures = [line for line in logs0 if "failed; training continues" in line]
    assert pushed0 == [] and len(failures) == 2 and all(DOCUMENTED[error] in line for line in failures), failures
    assert not any("failed; training continues" in line for line in logs1), "only the writer pushes"
    retries = [line for line in logs0 if "retry 1 of 2" in line]
    assert len(retries) == (2 if error == "refused" else 0), "only the transient error is retried"
    assert (tmp_path / "iter_0000002" / "hf_adapter" / "adapter_model.safetensors").is_file(), "exports go on"


def test_the_token_is_in_no_written_file_and_no_log(hub, token, tmp_path, capfd):
    save = tmp_path / "save"
    staged_before = set(Path(tempfile.gettempdir()).glob("hf-adapter-push-*"))
    push = {"repo_id": "me/run", "strategy": "all_checkpoints", "endpoint": hub.endpoint, "retry_wait": 0.0}
    logs = []
    for result in run_ranks(_train_and_push, 2, str(save), push, 2):
        logs += result[2]
    hub.fail(401)  # the error paths too: the hook's log and the CLI's message
    for result in run_ranks(_train_and_push, 2, str(tmp_path / "failing"), push, 1):
        logs += result[2]
    with LogRecords(logging.DEBUG, logger="") as records:
        assert main(["push", str(save), "--repo-id", "me/run", "--endpoint", hub.endpoint]) == 2
        hub.heal()
        assert (
            main(
                ["push", str(save), "--repo-id", "me/cli", "--endpoint", hub.endpoint, "--strategy", "all_checkpoints"]
            )
            == 0
        )
    out, err = capfd.readouterr()
    assert len(hub.commits) >= 2 and any(
        "failed; training continues: authentication failed (401)" in line for line in logs
    )
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in written) and any(p.name == "README.md" for p in written)
    leaks = [str(p) for p in written if token.encode() in p.read_bytes()]
    leaks += [
        name
        for name, text in (("stdout", out), ("stderr", err), ("logs", "\n".join(logs + records.lines)))
        if token in text
    ]
    leaks += [
        f"hub:{repo}/{path}"
        for repo, r in hub.repos.items()
        for files in r.branches.values()
        for path, data in files.items()
        if token.encode() in data
    ]
    assert leaks == []
    assert "authentication failed (401)" in err and len(logs) > 50, "the checks saw real output"
    hosts = {
        line.split("host='")[1].split("'")[0] for line in logs + records.lines if "connect_tcp.started host='" in line
    }
    assert hosts == {"127.0.0.1"}
    assert set(Path(tempfile.gettempdir()).glob("hf-adapter-push-*")) == staged_before, (
        "no staging directory is left behind"
    )
