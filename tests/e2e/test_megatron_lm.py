"""Megatron-LM's real training code: the stock pretrain_gpt.py and megatron.training.pretrain (core_v0.16.1) with
ModelOpt LoRA and the README's two lines, on CPU over gloo, one process per rank (tests/support/megatron_lm.py).

Each run below trains once per module and is shared by the tests that read it. Every checkpoint Megatron-LM
writes must get an adapter: interval saves, the end-of-training save, the exit-interval save, asynchronous
saves through the persistent worker. Every adapter, loaded with peft onto the HF twin of the base, must give
the logits the training model gave at that save (the reference captured with `--hf-adapter-verify`), the
last one also the logits the test support computes itself from the trained model once training ended; and
offline export of each checkpoint must equal the hook's adapter bit for bit. The TP1 and TP2 runs also log
to W&B (offline) with Megatron-LM's own --wandb-* flags, and the TP2 run pushes to a fake Hub at the end.
"""

import json
import secrets
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.e2e.test_verify_wandb import _verification_rows
from tests.support import megatron_lm, tiny_gpt, wandb_files
from tests.support.fake_hub import FakeHub
from tests.support.multiprocess import run_alone

pytestmark = pytest.mark.timeout(900)
CFG = tiny_gpt.TinyGPTConfig()
PARITY_ATOL = 1e-5


def _base_model(root: Path) -> Path:
    base = root / "base"
    run_alone(lambda: tiny_gpt.hf_llama_twin(CFG).save_pretrained(base))
    return base


def _train(tmp_path_factory, name: str, world: int, *argv: str, env: dict | None = None) -> dict:
    """One Megatron-LM run with --export-hf-adapter and verification; returns its paths and per-rank logs."""
    megatron_lm.require_megatron_lm()
    root = tmp_path_factory.mktemp(name)
    base = _base_model(root)
    run = megatron_lm.launch(
        world,
        [
            *megatron_lm.tiny_gpt_flags(CFG),
            "--tensor-model-parallel-size",
            str(world),
            "--save",
            str(root / "save"),
            "--export-hf-adapter",
            "--hf-adapter-base-model",
            str(base),
            "--hf-adapter-verify",
            *argv,
        ],
        root / "logs",
        env={"PROBE_LOGITS_OUT": str(root / "final_logits.safetensors"), **(env or {})},
    ).check()
    return {
        "save": root / "save",
        "base": base,
        "final": root / "final_logits.safetensors",
        "logs": run.logs,
        "root": root,
    }


def _offline_wandb(root: Path) -> dict:
    """W&B offline and silent, every file of it under ``root``, nothing from this machine's W&B settings."""
    names = {"WANDB_DATA_DIR": "wandb-data", "WANDB_CACHE_DIR": "wandb-cache", "WANDB_CONFIG_DIR": "wandb-config"}
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **{k: str(root / v) for k, v in names.items()},
        **dict.fromkeys(("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_DIR")),
    }


WANDB_FLAGS = ("--wandb-project", "proj", "--wandb-exp-name", "llama-sft", "--hf-adapter-wandb-artifact")
PUSH_FLAGS = (
    "--hf-adapter-push-repo-id",
    "me/run",
    "--hf-adapter-push-strategy",
    "end",
    "--hf-adapter-push-private",
    "--hf-adapter-push-revision",
    "exp",
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A fake Hub for the module's runs, with the token they get through HF_TOKEN (and no stored login)."""
    token = "hf_" + secrets.token_hex(16)
    with FakeHub(token) as server:
        server.env = {
            "HF_TOKEN": token,
            "HF_ENDPOINT": server.endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path_factory.mktemp("hf-home")),
        }
        yield server


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    wandb_env = _offline_wandb(tmp_path_factory.mktemp("tp1-wandb"))
    return _train(tmp_path_factory, "tp1", 1, "--train-iters", "5", "--save-interval", "2", *WANDB_FLAGS, env=wandb_env)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, hub):
    wandb_env = _offline_wandb(tmp_path_factory.mktemp("tp2-wandb"))
    return _train(
        tmp_path_factory,
        "tp2",
        2,
        "--train-iters",
        "5",
        "--save-interval",
        "2",
        *WANDB_FLAGS,
        *PUSH_FLAGS,
        env={**wandb_env, **hub.env},
    )


@pytest.fixture(scope="module")
def async_save(tmp_path_factory):
    return _train(
        tmp_path_factory,
        "async",
        1,
        "--train-iters",
        "5",
        "--save-interval",
        "2",
        "--async-save",
        "--use-persistent-ckpt-worker",
    )


@pytest.fixture(scope="module")
def exit_interval(tmp_path_factory):
    return _train(tmp_path_factory, "exit", 1, "--train-iters", "10", "--save-interval", "2", "--exit-interval", "3")


RUNS = ["tp1", "tp2", "async_save", "exit_interval"]
SAVED = {"tp1": [2, 4, 5], "tp2": [2, 4, 5], "async_save": [2, 4, 5], "exit_interval": [2, 3]}


def _iterations(save: Path, pattern: str) -> list[int]:
    """The iterations of the iter_XXXXXXX directories (or of their children) matching ``pattern``."""
    return sorted(
        int((p if p.name.startswith("iter_") else p.parent).name.removeprefix("iter_")) for p in save.glob(pattern)
    )


@pytest.mark.parametrize("name", RUNS)
def test_every_checkpoint_megatron_lm_writes_gets_an_adapter(name, request):
    """Interval saves, the end-of-training save (iteration 5 with --save-interval 2), the exit-interval save,
    asynchronous saves finalized by the persistent worker (the last one after train() closed it)."""
    run = request.getfixturevalue(name)
    checkpoints = _iterations(run["save"], "iter_*")
    assert checkpoints == SAVED[name], "Megatron-LM saved other iterations than this test expects"
    assert _iterations(run["save"], "iter_*/hf_adapter") == checkpoints
    assert (run["save"] / "latest_checkpointed_iteration.txt").read_text().strip() == str(checkpoints[-1])
    assert not list(run["save"].glob("iter_*/.hf_adapter*")), "a staging directory was left behind"


def test_the_hook_flags_chain_with_modelopts_arguments(tp1):
    """pretrain_gpt.py passes ModelOpt's extra_args_provider; install() chains ours in front: both sets parsed."""
    arguments = tp1["logs"][0].split("------------------------ arguments ------------------------")[1]
    assert "export_hf_adapter ............................... True" in arguments
    assert "export_te_mcore_model" in arguments  # one of ModelOpt's


def _check_adapters(save: str, base: str, final: str) -> list[dict]:
    """In a fresh process: per adapter, peft on the HF twin against the logits captured at its save (and the last
    adapter against the logits computed after training by the test support), and offline export of its checkpoint."""
    from megatron_peft_export.export import ExportOptions
    from megatron_peft_export.offline.export import export_checkpoint

    results = []
    adapters = sorted(Path(save).glob("iter_*/hf_adapter"))
    for adapter in adapters:
        reference = load_file(str(adapter / "verification" / "reference.safetensors"))
        result = {
            "iteration": int(adapter.parent.name.removeprefix("iter_")),
            "verification": json.loads((adapter / "verification.json").read_text()),
            "diff_at_save": tiny_gpt.compare_peft(
                adapter, CFG, reference["input_ids"], reference["logits"], atol=PARITY_ATOL
            ),
        }
        if adapter == adapters[-1]:
            trained = load_file(final)
            result["diff_after_training"] = tiny_gpt.compare_peft(
                adapter, CFG, trained["tokens"], trained["logits"], atol=PARITY_ATOL
            )
        offline = Path(save).parent / "offline" / adapter.parent.name
        export_checkpoint(adapter.parent, offline, options=ExportOptions(base_model_name_or_path=base), quiet=True)
        result["offline_equal"] = (offline / "adapter_model.safetensors").read_bytes() == (
            adapter / "adapter_model.safetensors"
        ).read_bytes()
        results.append(result)
    return results


@pytest.mark.parametrize("name", RUNS)
def test_each_adapter_gives_the_trained_models_logits_and_equals_offline_export(name, request):
    run = request.getfixturevalue(name)
    results = run_alone(_check_adapters, str(run["save"]), str(run["base"]), str(run["final"]), timeout=300)
    assert [r["iteration"] for r in results] == SAVED[name]
    for r in results:  # compare_peft raised already if a diff exceeded PARITY_ATOL or the adapter changed nothing
        assert r["verification"]["status"] == "passed" and r["verification"]["iteration"] == r["iteration"], r[
            "verification"
        ]["summary"]
        assert r["verification"]["max_abs_diff"] <= PARITY_ATOL
        assert r["offline_equal"], f"iteration {r['iteration']}: offline export differs from the hook's adapter"
    assert results[-1]["diff_after_training"] <= PARITY_ATOL


@pytest.mark.parametrize("name", ["tp1", "tp2"], ids=["megatron-run-on-the-writer", "megatron-run-on-the-last-rank"])
def test_megatron_lms_wandb_flags_are_reused(name, request):
    """Megatron-LM starts its W&B run on the last rank and finishes it in pretrain(), before the hook's last
    export (the end-of-training save's) is verified at exit."""
    run = request.getfixturevalue(name)
    runs = wandb_files.offline_runs(run["save"] / "wandb")  # Megatron-LM's default --wandb-save-dir
    infos = [wandb_files.run_info(d) for d in runs]
    rows = _verification_rows(runs)
    assert [r["hf_adapter/iteration"] for r in rows] == [2, 4, 5] and all(
        r["hf_adapter/verify/passed"] == 1 for r in rows
    )
    megatron_runs = {i["id"] for i in infos if i["name"] == "llama-sft"}
    assert len(megatron_runs) == 1
    logged_to = {wandb_files.run_info(d)["id"] for d in runs if _verification_rows([d])}
    # the writer is Megatron-LM's last rank: its run is reused (and resumed once Megatron-LM finished it)
    if name == "tp1":
        assert logged_to == megatron_runs
    else:  # the writer starts its own run beside Megatron-LM's, grouped under the experiment name
        (own,) = [i for i in infos if i["id"] in logged_to]
        assert (own["name"], own["group"], own["project"]) == ("llama-sft-hf-adapter", "llama-sft", "proj")
    ours = [
        a
        for d in runs
        for a in wandb_files.artifacts(d)
        if a["type"] == "model" and a["name"] == "llama-sft-hf-adapter"
    ]
    assert sorted(a["aliases"][0] for a in ours) == ["iter_0000002", "iter_0000004", "iter_0000005"]


def test_megatron_lms_push_flags_push_the_end_of_training_adapter(tp2, hub):
    [commit] = hub.commits
    assert (commit.revision, commit.summary) == ("exp", "Upload HF adapter (iteration 5)")
    assert hub.repos["me/run"].private and hub.files("me/run", "main") == {}
    last = tp2["save"] / "iter_0000005" / "hf_adapter"
    assert hub.files("me/run", "exp")["adapter_model.safetensors"] == (last / "adapter_model.safetensors").read_bytes()
