"""The real vLLM serves what the exporter writes: dense adapters give peft's greedy tokens and log-probs.

One vLLM engine per base model (start-up is most of the cost), run in the vLLM venv by subprocess
(tests/support/vllm_engine.py); the peft side runs here in a forked child. Marked `vllm`: skipped with the
reason where there is no vLLM venv, failing under CI=true.
"""

import json
from pathlib import Path

import pytest

from tests.support import serving_models as sm
from tests.support.multiprocess import run_alone
from tests.support.vllm_env import require_vllm, run_engine

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 17, 42, 99], [3, 64, 8, 120, 77, 31], [11, 2]]
MAX_TOKENS = 8
LOGPROB_ATOL = 1e-4  # float32 rounding; a mis-scaled module moves log-probs by ~1 (measured max 2.2e-5)


def _uniform(r, alpha, **kinds):
    return {m: (r, alpha) for m in sm.megatron_modules("llama", **kinds)}


def _mixed():
    """Attention at rank 4 and scale 2, MLP at rank 8 and scale 0.75: two ranks and two scales (rank_pattern, alpha_pattern)."""
    return {m: ((4, 8.0) if "self_attention" in m else (8, 6.0)) for m in sm.megatron_modules("llama")}


DENSE = {
    "plain": dict(settings=_uniform(8, 16.0)),
    "padded": dict(settings=_mixed(), pad_rank_to=16),
    "mixed_rank": dict(settings=_mixed()),
    "lm_head": dict(settings=_uniform(8, 16.0, lm_head=True)),
    "dora": dict(settings=_uniform(8, 16.0), dora=True),
}
SERVED = ["plain", "padded", "mixed_rank", "lm_head"]


def _greedy(model, prompts, steps):
    """peft's greedy continuation of each prompt and the log-prob of each chosen token (float32, full recompute)."""
    import torch

    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids, chosen, lps = torch.tensor([prompt]), [], []
            for _ in range(steps):
                lp = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
                t = int(lp.argmax())
                chosen.append(t)
                lps.append(float(lp[t]))
                ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
            tokens.append(chosen)
            logprobs.append(lps)
    return {"tokens": tokens, "logprobs": logprobs}


def _build_dense(root: Path) -> dict:
    """Base, adapters and peft's generations (in a forked child)."""
    import peft
    from transformers import AutoModelForCausalLM

    base_dir = sm.save_base("llama", root / "base")
    for i, (name, spec) in enumerate(DENSE.items()):
        sm.write_adapter(root / "adapters" / name, "llama", spec["settings"], seed=100 + i, dora=spec.get("dora", False),
                         pad_rank_to=spec.get("pad_rank_to"))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32").eval()
    out = {"base": _greedy(base, PROMPTS, MAX_TOKENS), "adapters": {}}
    for name in DENSE:
        model = peft.PeftModel.from_pretrained(base, str(root / "adapters" / name), adapter_name=name).eval()
        out["adapters"][name] = _greedy(model, PROMPTS, MAX_TOKENS)
        base = model.unload()
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    python = require_vllm()
    root = tmp_path_factory.mktemp("dense")
    peft_side = run_alone(_build_dense, root, timeout=600)
    ranks = {sm.adapter_config(root / "adapters" / n)["r"] for n in DENSE} | {
        r for n in DENSE for r in sm.adapter_config(root / "adapters" / n)["rank_pattern"].values()}
    job = {"base": str(root / "base"), "max_lora_rank": 16 if max(ranks) <= 16 else 32, "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
           "adapters": [{"name": n, "path": str(root / "adapters" / n), "mode": "generate"} for n in DENSE]}
    served = run_engine(python, job, root / "engine")
    (root / "comparison.json").write_text(json.dumps({"peft": peft_side, "vllm": served}, indent=1))
    return {"root": root, "peft": peft_side, "vllm": served}


@pytest.mark.parametrize("name", SERVED)
def test_vllm_serves_dense_adapters_with_peft_tokens_and_logprobs(dense, name):
    peft_out, served = dense["peft"]["adapters"][name], dense["vllm"]["adapters"][name]
    assert "error" not in served, f"vLLM refused {name}: {served.get('error')}"
    assert peft_out["tokens"] != dense["peft"]["base"]["tokens"], "the adapter must change peft's greedy tokens"
    assert served["tokens"] == peft_out["tokens"]
    diff = max(abs(a - b) for s, p in zip(served["logprobs"], peft_out["logprobs"]) for a, b in zip(s, p))
    assert diff <= LOGPROB_ATOL, f"{name}: max |log-prob vLLM - peft| {diff:.2e}"


def test_vllm_refuses_dora(dense):
    assert "DoRA" in dense["vllm"]["adapters"]["dora"].get("error", "")
