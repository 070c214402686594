"""Pushing to the Hub against a fake Hub on 127.0.0.1 (tests/support/fake_hub.py), in process: one push,
the background pusher's strategies and queue, the CLI, and the error messages."""

import json
import logging

import huggingface_hub.constants
import pytest
import yaml

from megatron_peft_export.cli import main
from megatron_peft_export.errors import ExportError
from megatron_peft_export.services.hub import Adapter, HubPusher, PushConfig, PushError, push_adapters
from tests.support.fake_hub import closed_port, write_adapter

pytestmark = pytest.mark.timeout(120)
ADAPTER = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def _config(hub, **kwargs):
    return PushConfig(**{"repo_id": "me/tiny-lora", "endpoint": hub.endpoint, "retry_wait": 0.0, **kwargs})


def _front_matter(card: bytes) -> dict:
    return yaml.safe_load(card.decode().split("---\n")[1])


class _Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def test_push_creates_the_private_repo_and_uploads_the_adapter_with_a_filled_in_card(hub, tmp_path):
    adapter = write_adapter(tmp_path / "iter_0000007" / "hf_adapter", 7)
    url = push_adapters(_config(hub, private=True), Adapter(adapter, 7))
    assert hub.repos["me/tiny-lora"].private
    [commit] = hub.commits
    assert (commit.summary, commit.revision, sorted(commit.paths)) == (
        "Upload HF adapter (iteration 7)",
        "main",
        ADAPTER,
    )
    assert url.endswith(commit.oid)
    files = hub.files("me/tiny-lora")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert files[name] == (adapter / name).read_bytes()
    meta = _front_matter(files["README.md"])
    assert meta["library_name"] == "peft" and meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert meta["pipeline_tag"] == "text-generation" and {"lora", "megatron-peft-export", "modelopt"} <= set(
        meta["tags"]
    )
    body = files["README.md"].decode()
    assert "| training iteration | 7 |" in body and "| r | 8 |" in body and "| lora_alpha | 16 |" in body
    assert "from iteration 7 (modelopt adapters)" in body and "## Verification" not in body


def test_all_checkpoints_put_each_iteration_in_its_folder_on_a_new_branch(hub, tmp_path):
    adapters = [Adapter(write_adapter(tmp_path / f"iter_000000{i}" / "hf_adapter", i, seed=i), i) for i in (2, 4)]
    push_adapters(_config(hub, revision="dev", commit_message="LoRA run 3"), adapters[-1], adapters)
    [commit] = hub.commits
    assert commit.revision == "dev" and commit.summary == "LoRA run 3 (iterations 2, 4; latest 4 at the root)"
    files = hub.files("me/tiny-lora", "dev")
    assert sorted(files) == sorted([*ADAPTER, *(f"iter_000000{i}/{n}" for i in (2, 4) for n in ADAPTER)])
    assert (
        files["adapter_model.safetensors"]
        == files["iter_0000004/adapter_model.safetensors"]
        != files["iter_0000002/adapter_model.safetensors"]
    )
    assert "| training iteration | 2 |" in files["iter_0000002/README.md"].decode()
    assert hub.files("me/tiny-lora", "main") == {}, "the branch is made from main, main is untouched"


def test_the_verification_result_goes_into_the_card(hub, tmp_path, caplog):
    adapter = write_adapter(tmp_path / "iter_0000003" / "hf_adapter", 3)
    result = {
        "passed": True,
        "status": "passed",
        "max_abs_diff": 2e-7,
        "top1_agreement": 1.0,
        "adapter": str(adapter),
        "logits": [[1.0]],
    }
    (adapter / "verification.json").write_text(json.dumps(result))
    (adapter / "verification").mkdir()
    (adapter / "verification" / "reference.safetensors").write_bytes(b"captured logits")
    push_adapters(_config(hub), Adapter(adapter, 3))
    card = hub.files("me/tiny-lora")["README.md"].decode()
    assert (
        "## Verification" in card
        and "Verification PASSED" in card
        and "| max_abs_diff | 2e-07 |" in card
        and "| top1_agreement | 1 |" in card
    )
    assert "| logits |" not in card and str(tmp_path) not in card, "nested values and local paths stay out of the card"
    assert sorted(hub.files("me/tiny-lora")) == sorted([*ADAPTER, "verification.json"]), (
        "working folders are not pushed"
    )
    (adapter / "verification.json").write_text("{not json")
    push_adapters(_config(hub), Adapter(adapter, 3))
    assert "## Verification" not in hub.files("me/tiny-lora")["README.md"].decode()
    assert any("verification.json is unreadable" in r.getMessage() for r in caplog.records)


def test_a_local_base_model_stays_out_of_the_front_matter_unless_a_hub_id_is_given(hub, tmp_path):
    adapter = write_adapter(tmp_path / "adapter", base_model="/models/Llama-3.2-1B")
    push_adapters(_config(hub), Adapter(adapter))  # the Hub (and the fake) reject base_model: /models/...
    assert "base_model" not in _front_matter(hub.files("me/tiny-lora")["README.md"])
    push_adapters(_config(hub, base_model="meta-llama/Llama-3.2-1B"), Adapter(adapter))
    files = hub.files("me/tiny-lora")
    assert _front_matter(files["README.md"])["base_model"] == "meta-llama/Llama-3.2-1B"
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B"
    assert (
        json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "/models/Llama-3.2-1B"
    )
    assert hub.commits[0].summary == "Upload HF adapter", "no iteration known, none claimed"


def test_a_card_not_written_by_the_exporter_is_uploaded_unchanged(hub, tmp_path):
    adapter = write_adapter(tmp_path / "iter_0000001" / "hf_adapter", 1)
    (adapter / "README.md").write_text("---\nlicense: apache-2.0\n---\n# My adapter\n")
    push_adapters(_config(hub), Adapter(adapter, 1))
    assert hub.files("me/tiny-lora")["README.md"] == b"---\nlicense: apache-2.0\n---\n# My adapter\n"


def test_the_stored_login_is_used_when_hf_token_is_unset(hub, token, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    stored = tmp_path / "hf_home" / "token"
    stored.parent.mkdir()
    stored.write_text(token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(stored))
    push_adapters(_config(hub), Adapter(write_adapter(tmp_path / "adapter")))
    assert len(hub.commits) == 1  # the fake answers 401 to any request without the token


def test_no_token_is_a_clear_error_before_any_request(hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PushError, match=r"no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push_adapters(_config(hub), Adapter(write_adapter(tmp_path / "adapter")))
    assert hub.requests == []


ERRORS = {
    401: r"authentication failed \(401\): the Hub did not accept the token .*set HF_TOKEN or run `hf auth login` "
    r"with a token that has write access to me/tiny-lora",
    403: r"permission denied \(403\): the token may not create or write me/tiny-lora.*use a write token",
    404: r"not found \(404\): me/tiny-lora does not exist or the token cannot see it",
    "refused": r"cannot reach http://127\.0\.0\.1:\d+: .*[Cc]onnection refused.*check the network or the endpoint "
    r"\(after 4 attempts\)",
}


@pytest.mark.parametrize("error", ERRORS, ids=str)
def test_errors_have_a_clear_message_and_only_transient_ones_are_retried(hub, tmp_path, error):
    if error == "refused":
        config = _config(hub, endpoint=closed_port(), retries=3, retry_wait=0.5)
    else:
        hub.fail(error)
        config = _config(hub, retries=3, retry_wait=0.5)
    sleeps = _Sleeps()
    with pytest.raises(PushError, match=ERRORS[error]):
        push_adapters(config, Adapter(write_adapter(tmp_path / "adapter")), sleep=sleeps)
    assert sleeps == ([0.5, 1.0, 2.0] if error == "refused" else []), (
        "backoff doubles; auth/permission/not-found are final"
    )
    assert hub.commits == []


def test_a_transient_server_error_is_retried_and_the_push_lands(hub, tmp_path):
    hub.fail(503, endpoint="create", times=2)
    sleeps = _Sleeps()
    push_adapters(
        _config(hub, retry_wait=1.0), Adapter(write_adapter(tmp_path / "iter_0000005" / "a"), 5), sleep=sleeps
    )
    assert sleeps == [1.0, 2.0] and [c.summary for c in hub.commits] == ["Upload HF adapter (iteration 5)"]


def test_a_branch_that_exists_is_reused_and_a_missing_adapter_is_an_error(hub, tmp_path):
    adapter = write_adapter(tmp_path / "iter_0000001" / "hf_adapter", 1)
    for _ in range(2):
        push_adapters(_config(hub, revision="exp"), Adapter(adapter, 1))
    assert [c.revision for c in hub.commits] == ["exp", "exp"]
    with pytest.raises(PushError, match="expected an adapter directory with adapter_config.json at .*gone"):
        push_adapters(_config(hub), Adapter(tmp_path / "gone", 2))


def test_config_errors_say_what_is_expected():
    with pytest.raises(ExportError, match=r"push.repo_id: expected OWNER/NAME .*found 'tiny-lora'"):
        PushConfig(repo_id="tiny-lora")
    with pytest.raises(
        ExportError, match=r"push.strategy: expected one of end, every_save, all_checkpoints, found 'checkpoint'"
    ):
        PushConfig(repo_id="me/x", strategy="checkpoint")


# ---- the background pusher ----


def _published(tmp_path, iterations):
    return {i: write_adapter(tmp_path / f"iter_{i:07d}" / "hf_adapter", i, seed=i) for i in iterations}


def test_every_save_queues_one_push_and_skips_older_waiting_ones(hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, "megatron_peft_export")
    adapters = _published(tmp_path, (1, 2, 3))
    pusher = HubPusher(_config(hub, strategy="every_save"))
    hub.pause()  # push 1 hangs in its commit: the next publishes must not wait for it
    for i, path in adapters.items():
        pusher.after_publish(i, path)
    hub.resume()
    pusher.finalize()
    assert [c.summary for c in hub.commits] == ["Upload HF adapter (iteration 1)", "Upload HF adapter (iteration 3)"]
    assert (
        hub.files("me/tiny-lora")["adapter_model.safetensors"]
        == (adapters[3] / "adapter_model.safetensors").read_bytes()
    )
    messages = [r.getMessage() for r in caplog.records]
    assert any("push of iteration 2 to me/tiny-lora queued: a previous push is still running" in m for m in messages)
    assert any("push of iteration 2 to me/tiny-lora skipped: iteration 3 is newer" in m for m in messages)
    assert len(pusher.pushed) == 2 and pusher.failures == []


def test_all_checkpoints_pushes_waiting_iterations_together_and_loses_none(hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, "megatron_peft_export")
    adapters = _published(tmp_path, (1, 2, 3))
    pusher = HubPusher(_config(hub, strategy="all_checkpoints"))
    hub.pause()
    for i, path in adapters.items():
        pusher.after_publish(i, path)
    hub.resume()
    pusher.finalize()
    assert [c.summary for c in hub.commits] == [
        "Upload HF adapter (iteration 1)",
        "Upload HF adapter (iterations 2, 3; latest 3 at the root)",
    ]
    folders = {p.split("/")[0] for p in hub.files("me/tiny-lora") if "/" in p}
    assert folders == {"iter_0000001", "iter_0000002", "iter_0000003"}
    assert any(
        "push of iteration 3 to me/tiny-lora queued with iteration(s) 2 in one commit" in r.getMessage()
        for r in caplog.records
    )


def test_end_pushes_only_the_last_adapter_at_finalize(hub, tmp_path):
    adapters = _published(tmp_path, (1, 2))
    pusher = HubPusher(_config(hub, strategy="end"))
    for i, path in adapters.items():
        pusher.after_publish(i, path)
    assert hub.requests == []
    pusher.finalize()
    pusher.finalize()  # a second finalize (atexit) pushes nothing again
    assert [c.summary for c in hub.commits] == ["Upload HF adapter (iteration 2)"]
    assert sorted(hub.files("me/tiny-lora")) == ADAPTER


def test_a_failing_push_is_logged_and_never_raised(hub, tmp_path, caplog):
    hub.fail(403)
    pusher = HubPusher(_config(hub))
    pusher.after_publish(1, _published(tmp_path, (1,))[1])
    pusher.finalize()
    assert pusher.pushed == [] and len(pusher.failures) == 1
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "pushing the HF adapter of iteration 1 to me/tiny-lora failed; training continues: permission denied (403)"
        in record.getMessage()
    )


# ---- the CLI ----


def test_cli_pushes_the_latest_adapter_of_a_save_directory(hub, tmp_path, capsys):
    adapters = _published(tmp_path / "save", (10, 20))
    code = main(
        [
            "push",
            str(tmp_path / "save"),
            "--repo-id",
            "me/tiny-lora",
            "--endpoint",
            hub.endpoint,
            "--private",
            "--revision",
            "v1",
        ]
    )
    assert code == 0
    [commit] = hub.commits
    assert (commit.revision, commit.summary, sorted(commit.paths)) == (
        "v1",
        "Upload HF adapter (iteration 20)",
        ADAPTER,
    )
    assert hub.repos["me/tiny-lora"].private
    assert (
        hub.files("me/tiny-lora", "v1")["adapter_model.safetensors"]
        == (adapters[20] / "adapter_model.safetensors").read_bytes()
    )
    assert f"pushed {adapters[20]} (iteration 20) to me/tiny-lora@v1: " in capsys.readouterr().out


def test_cli_all_checkpoints_and_an_adapter_directory(hub, tmp_path):
    _published(tmp_path / "save", (10, 20))
    assert (
        main(
            [
                "push",
                str(tmp_path / "save"),
                "--repo-id",
                "me/tiny-lora",
                "--endpoint",
                hub.endpoint,
                "--strategy",
                "all_checkpoints",
                "--commit-message",
                "nightly",
            ]
        )
        == 0
    )
    assert hub.commits[-1].summary == "nightly (iterations 10, 20; latest 20 at the root)"
    assert {p.split("/")[0] for p in hub.files("me/tiny-lora") if "/" in p} == {"iter_0000010", "iter_0000020"}
    assert (
        main(
            [
                "push",
                str(tmp_path / "save" / "iter_0000010" / "hf_adapter"),
                "--repo-id",
                "me/other",
                "--endpoint",
                hub.endpoint,
            ]
        )
        == 0
    )
    assert hub.commits[-1].summary == "Upload HF adapter (iteration 10)" and sorted(hub.files("me/other")) == ADAPTER


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repo-id", "tiny-lora"], "error: push.repo_id: expected OWNER/NAME"),
        (["--repo-id", "me/x", "--dir-name", "peft"], "error: no adapter at "),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(hub, tmp_path, capsys, argv, message):
    _published(tmp_path / "save", (1,))
    assert main(["push", str(tmp_path / "save"), "--endpoint", hub.endpoint, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_hub_errors_exit_2_with_the_documented_message(hub, tmp_path, capsys):
    _published(tmp_path / "save", (1,))
    hub.fail(401)
    assert main(["push", str(tmp_path / "save"), "--repo-id", "me/x", "--endpoint", hub.endpoint]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: authentication failed (401)") and err.count("\n") == 1


def test_the_yaml_push_section_and_no_token_option():
    from megatron_peft_export.config import HookConfig

    config = HookConfig.from_mapping({"push": {"repo_id": "me/x", "strategy": "end", "private": True}})
    assert config.push == PushConfig(repo_id="me/x", strategy="end", private=True)
    assert HookConfig().push is None
    with pytest.raises(ExportError, match=r"export_hf_adapter.push: unknown option\(s\) token"):
        HookConfig.from_mapping({"push": {"repo_id": "me/x", "token": "hf_x"}})


def test_megatron_lm_flags_build_the_push_config():
    import argparse

    from megatron_peft_export.integrations.megatron_lm import add_args, config_from_args

    parser = add_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--export-hf-adapter",
            "--hf-adapter-push-repo-id",
            "me/x",
            "--hf-adapter-push-strategy",
            "all_checkpoints",
            "--hf-adapter-push-private",
            "--hf-adapter-push-revision",
            "exp",
        ]
    )
    assert config_from_args(args).push == PushConfig(
        repo_id="me/x", strategy="all_checkpoints", private=True, revision="exp"
    )
    assert config_from_args(parser.parse_args(["--export-hf-adapter"])).push is None


def test_a_multi_adapter_directory_goes_up_whole_and_the_card_keeps_the_quantization_and_the_adapter_table(
    hub, tmp_path
):
    from megatron_peft_export.core.peft_format import model_card
    from megatron_peft_export.multi_adapter import _layout_section

    adapter = write_adapter(tmp_path / "iter_0000004" / "hf_adapter", 4)
    write_adapter(adapter / "math", 4, seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    card = model_card(
        config,
        dialect="modelopt",
        source="iteration 4",
        num_tensors=2,
        quantization="ModelOpt fake quantization: weights int8 per-channel",
    )
    (adapter / "README.md").write_text(card + _layout_section(["default", "math"]))
    push_adapters(_config(hub), Adapter(adapter, 4))
    files = hub.files("me/tiny-lora")
    assert sorted(files) == sorted([*ADAPTER, *(f"math/{n}" for n in ADAPTER)])
    assert files["math/adapter_model.safetensors"] == (adapter / "math" / "adapter_model.safetensors").read_bytes()
    pushed = files["README.md"].decode()
    assert "| base quantization | ModelOpt fake quantization: weights int8 per-channel |" in pushed
    assert 'model.load_adapter("<this directory>/math", adapter_name="math")' in pushed
