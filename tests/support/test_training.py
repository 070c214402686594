"""The training loop proves itself: the loss falls, the checkpoints follow Megatron-LM's layout and reload.

Every layout trains the same function from the same data (LoRA A is drawn per global
name), so TP=2 and PP=2 must reproduce the single-rank loss history.
"""

import json

import pytest

from tests.support import tiny_gpt as tg
from tests.support import training as tr
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)

STEPS, SAVE_INTERVAL = 30, 12  # saves at 12, 24 and the last step, 30
SAVED = [12, 24, 30]


def _train_and_reload(rank, world, save_dir, tp, pp):
    """Train; then rebuild the model, load the last checkpoint and compare logits with the trained model."""
    tc = tr.TrainConfig(tp=tp, pp=pp)
    saves = []
    history = tr.run_training(
        tc,
        steps=STEPS,
        save_interval=SAVE_INTERVAL,
        save_dir=save_dir,
        log=None,
        on_save=lambda iteration, path, model: saves.append((iteration, str(path), model)),
    )
    trained_model = saves[-1][2]
    tokens = tr.synthetic_batch(tc.model, iteration=10_000, batch_size=2)[:, :-1]
    trained = tg.megatron_logits(trained_model.module, tokens)
    fresh = tr.build_model(tc)
    base_drift = max(
        (p - q).abs().max().item()
        for (name, p), q in zip(trained_model.named_parameters(), fresh.parameters())
        if "lora_" not in name
    )
    untrained = tg.megatron_logits(fresh.module, tokens)
    iteration = tr.load_checkpoint(fresh, saves[-1][1])
    reloaded = tg.megatron_logits(fresh.module, tokens)
    return {
        "history": history,
        "saves": [(it, path) for it, path, _ in saves],
        "base_drift": base_drift,
        "adapter_effect": (trained - untrained).abs().max().item(),
        "loaded_iteration": iteration,
        "reload_diff": (reloaded - trained).abs().max().item(),
        "lora_sums": [p.double().sum().item() for n, p in trained_model.named_parameters() if "lora_" in n],
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("tp1")
    return save_dir, run_ranks(_train_and_reload, 1, str(save_dir), 1, 1)[0]


def _check_run(save_dir, result):
    assert result["saves"] == [(it, str(save_dir / f"iter_{it:07d}")) for it in SAVED]
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)
    for it in SAVED:
        ckpt = save_dir / f"iter_{it:07d}"
        names = {p.name for p in ckpt.iterdir()}
        assert {".metadata", "metadata.json", "common.pt", "modelopt_state"} <= names, names
        assert any(n.endswith(".distcp") for n in names), names
        assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert result["base_drift"] == 0.0, "a base weight changed: only LoRA may train"
    assert result["adapter_effect"] > 0.1, "training did not change the model"
    assert result["loaded_iteration"] == STEPS
    assert result["reload_diff"] <= 1e-6


def test_single_rank_loss_falls_and_checkpoints_reload(single):
    save_dir, result = single
    history = result["history"]
    start, end = sum(history[:3]) / 3, sum(history[-3:]) / 3
    print(f"loss {history[0]:.3f} -> {history[-1]:.3f} (mean of first/last 3: {start:.3f} -> {end:.3f})")
    assert len(history) == STEPS
    assert end < 0.8 * start, history
    _check_run(save_dir, result)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_two_ranks_train_like_one(tmp_path, single, tp, pp):
    results = run_ranks(_train_and_reload, 2, str(tmp_path), tp, pp)
    assert results[0]["history"] == results[1]["history"], "ranks disagree on the loss"
    reference = single[1]["history"]
    assert max(abs(a - b) for a, b in zip(results[0]["history"], reference)) < 1e-3
    for result in results:
        _check_run(tmp_path, result)


def test_data_parallel_replicas_stay_in_sync(tmp_path, single):
    """DP=2: each replica trains on its half of a twice-as-large batch; DDP keeps the adapters identical."""
    results = run_ranks(_train_and_reload, 2, str(tmp_path), 1, 1)
    assert results[0]["lora_sums"] == results[1]["lora_sums"]
    assert results[0]["history"] == results[1]["history"]
    assert results[0]["history"] != single[1]["history"]  # really a different (larger) batch
    history = results[0]["history"]
    assert sum(history[-3:]) < 0.8 * sum(history[:3])
    for result in results:
        _check_run(tmp_path, result)
