"""The real vLLM (0.32, CPU) on what the exporter writes, against peft, and `check`'s verdicts against what vLLM did.

Dense adapters are served with vLLM's offline `LLM(enable_lora=True)`: greedy tokens and their log-probs equal
peft's. vLLM's MoE LoRA generation needs Triton kernels (no CPU backend), so MoE adapters are compared through what
vLLM loaded: after `add_lora` and activating it, its LoRA buffers (B @ A with the scaling folded in, per module and
expert) against peft's per-expert deltas (the merged weights minus the base). Then `check` runs twice per base model,
asking vLLM (`--vllm-python`) and by the 0.32 rules, and each verdict must be what vLLM did: compatible where it
served the adapter as peft does, with the engine flags it needed named; NOT compatible where it refused it, applied
part of it nowhere, or served it otherwise. `test_readme_table` renders that comparison as the table in docs/serving.md.

One vLLM engine per base model and engine setting (start-up is most of the cost), in the vLLM venv by subprocess
(tests/support/vllm_engine.py); the peft side runs in a forked child. Marked `vllm`: skipped with the reason where
there is no vLLM venv, failing under CI=true.
"""

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_peft_export.cli import main
from tests.support import serving_models as sm
from tests.support.multiprocess import run_alone
from tests.support.vllm_env import ROOT, require_vllm, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

PROMPTS = [[5, 17, 42, 99], [3, 64, 8, 120, 77, 31], [11, 2]]
MAX_TOKENS = 8
LOGPROB_ATOL = 1e-4  # float32 rounding (measured up to 2.2e-5); a mis-scaled module moves log-probs by ~1
DELTA_ATOL = 1e-6  # float32 weights of std 0.5 merged by peft vs B @ A from vLLM's float32 buffers (measured < 1e-7)


def _uniform(family, r, alpha, **kinds):
    return {m: (r, alpha) for m in sm.megatron_modules(family, **kinds)}


def _mixed():
    """Attention at rank 4 and scale 2, MLP at rank 8 and scale 0.75: two ranks and two scales (rank_pattern,
    alpha_pattern)."""
    return {m: ((4, 8.0) if "self_attention" in m else (8, 6.0)) for m in sm.megatron_modules("llama")}


DENSE = {
    "plain": dict(settings=_uniform("llama", 8, 16.0)),
    "padded": dict(settings=_mixed(), pad_rank_to=16),
    "mixed_rank": dict(settings=_mixed()),
    "lm_head": dict(settings=_uniform("llama", 8, 16.0, lm_head=True)),
    "dora": dict(settings=_uniform("llama", 8, 16.0), dora=True),
}
MOE = {"per_expert": "per_expert", "fused": "fused"}


# ----------------------------------------------------------------------------------------- check's verdicts


def _check(directory: Path, base: Path, *extra: str) -> dict[str, dict]:
    """`megatron-peft-export check` on a directory of adapters: per adapter its verdict and finding codes."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["check", str(directory), "--base", str(base), *extra])
    verdicts, current = {}, None
    for line in out.getvalue().splitlines():
        if match := re.match(r"^.* \(adapter '(?P<name>[^']+)'\): (?P<verdict>NOT compatible|compatible) with ", line):
            current = verdicts[match["name"]] = {"verdict": match["verdict"], "codes": {}, "lines": [line]}
        elif current is not None and (match := re.match(r"^  (error|warning|info) \[([\w-]+)\]", line)):
            current["codes"][match[2]] = match[1]
            current["lines"].append(line)
    assert status in (0, 1) and verdicts, out.getvalue()
    return verdicts


def _checks(root: Path, python: str) -> dict[str, dict]:
    return {
        "asked": _check(root / "adapters", root / "base", "--vllm-python", python),
        "rules": _check(root / "adapters", root / "base", "--vllm-version", "0.32"),
    }


# ----------------------------------------------------------------------------------------- dense: served


def _build_dense(root: Path) -> dict:
    """Base, adapters and peft's generations (in a forked child)."""
    import peft
    from transformers import AutoModelForCausalLM

    base_dir = sm.save_base("llama", root / "base")
    for i, (name, spec) in enumerate(DENSE.items()):
        sm.write_adapter(
            root / "adapters" / name,
            "llama",
            spec["settings"],
            seed=100 + i,
            dora=spec.get("dora", False),
            pad_rank_to=spec.get("pad_rank_to"),
        )
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32").eval()
    out = {"base": sm.greedy(base, PROMPTS, MAX_TOKENS), "adapters": {}}
    for name in DENSE:
        model = peft.PeftModel.from_pretrained(base, str(root / "adapters" / name), adapter_name=name).eval()
        out["adapters"][name] = sm.greedy(model, PROMPTS, MAX_TOKENS)
        base = model.unload()
    return out


def _served(peft_out: dict, served: dict, base_tokens) -> dict:
    """What vLLM did with a generated adapter, against peft."""
    if "error" in served:
        return {"did": "refused", "error": served["error"]}
    diff = max(abs(a - b) for s, p in zip(served["logprobs"], peft_out["logprobs"]) for a, b in zip(s, p))
    same = served["tokens"] == peft_out["tokens"] and diff <= LOGPROB_ATOL
    return {
        "did": "as peft" if same else "otherwise",
        "logprob_diff": diff,
        "tokens_equal": served["tokens"] == peft_out["tokens"],
        "peft_changed_tokens": peft_out["tokens"] != base_tokens,
    }


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    python = require_vllm()
    root = tmp_path_factory.mktemp("dense")
    peft_side = run_alone(_build_dense, root, timeout=600)
    job = {
        "base": str(root / "base"),
        "max_lora_rank": 16,
        "prompts": PROMPTS,
        "max_tokens": MAX_TOKENS,
        "adapters": [{"name": n, "path": str(root / "adapters" / n), "mode": "generate"} for n in DENSE],
    }
    served = run_engine(python, job, root / "engine")
    outcome = {n: _served(peft_side["adapters"][n], served["adapters"][n], peft_side["base"]["tokens"]) for n in DENSE}
    result = {"root": root, "peft": peft_side, "vllm": served, "outcome": outcome, "check": _checks(root, python)}
    (root / "comparison.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "root"}, indent=1, default=str)
    )
    return result


@pytest.mark.parametrize("name", ["plain", "padded", "mixed_rank", "lm_head"])
def test_vllm_serves_dense_adapters_with_peft_tokens_and_logprobs(dense, name):
    peft_out, served = dense["peft"]["adapters"][name], dense["vllm"]["adapters"][name]
    assert "error" not in served, f"vLLM refused {name}: {served.get('error')}"
    assert peft_out["tokens"] != dense["peft"]["base"]["tokens"], "the adapter must change peft's greedy tokens"
    assert served["tokens"] == peft_out["tokens"]
    diff = dense["outcome"][name]["logprob_diff"]
    assert diff <= LOGPROB_ATOL, f"{name}: max |log-prob vLLM - peft| {diff:.2e}"


def test_check_takes_relative_paths_for_the_adapters_the_base_and_vllms_python(dense, monkeypatch):
    """The probe runs in a directory of its own: relative paths given on the command line still name the same files."""
    python = require_vllm()
    monkeypatch.chdir(dense["root"])
    relative = _check(Path("adapters"), Path("base"), "--vllm-python", os.path.relpath(python))
    assert {n: v["codes"] for n, v in relative.items()} == {n: v["codes"] for n, v in dense["check"]["asked"].items()}
    assert any("vllm-refuses" in v["codes"] for v in relative.values()), "vLLM itself must have been asked"


def test_vllm_refuses_dora(dense):
    assert "DoRA" in dense["vllm"]["adapters"]["dora"].get("error", "")


def test_padding_leaves_one_rank_and_one_scale(dense):
    config = sm.adapter_config(dense["root"] / "adapters" / "padded")
    assert (config["r"], config["rank_pattern"], config["alpha_pattern"]) == (16, {}, {})


# ----------------------------------------------------------------------------------------- MoE: loaded


def _hf_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """peft's deltas: the adapter merged into the base (peft's own merge) minus the base, per parameter."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32").eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return {
        k: (v.double() - before[k].double()) for k, v in merged.state_dict().items() if not torch.equal(v, before[k])
    }


def _build_moe(root: Path, family: str) -> dict:
    """Base, the same Megatron LoRA (attention, experts, router) exported per expert and fused, and peft's deltas for
    it."""
    base_dir = sm.save_base(family, root / "base")
    settings = _uniform(family, 8, 16.0, router=True)
    sources = {
        name: sm.write_adapter(root / "adapters" / name, family, settings, seed=300, expert_layout=layout)
        for name, layout in MOE.items()
    }
    assert all(torch.equal(sources["fused"][m].b, s.b) for m, s in sources["per_expert"].items()), (
        "one source for both layouts"
    )
    deltas = _hf_deltas(base_dir, root / "adapters" / "fused")  # peft on transformers v5 loads the fused layout
    torch.save(deltas, root / "peft_deltas.pt")
    return {"configs": {n: sm.adapter_config(root / "adapters" / n) for n in MOE}}


def _expected(vllm_key: str, peft: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor | None]:
    """The peft delta a vLLM buffer key holds ({module}.{slice}, MoE: {experts module}.w1/w2/w3 [experts, out, in])."""
    layer, rest = (
        re.match(r"^(model\.layers\.\d+)\.(.+)$", vllm_key).groups()
        if vllm_key.startswith("model.layers.")
        else ("", vllm_key)
    )
    qkv = {"self_attn.qkv_proj.0": "q_proj", "self_attn.qkv_proj.1": "k_proj", "self_attn.qkv_proj.2": "v_proj"}
    if rest in qkv:
        name = f"{layer}.self_attn.{qkv[rest]}.weight"
        return name, peft.get(name)
    if rest == "self_attn.o_proj.0":
        name = f"{layer}.self_attn.o_proj.weight"
    elif rest in ("mlp.gate.0", "block_sparse_moe.gate.0"):
        name = f"{layer}.mlp.gate.weight"
    elif rest.endswith(("experts.w1", "experts.w3")):
        name = f"{layer}.mlp.experts.gate_up_proj"  # [experts, 2 * ffn, hidden]: gate rows then up rows
        full = peft.get(name)
        half = None if full is None else full.shape[1] // 2
        return name + (".gate" if rest.endswith("w1") else ".up"), None if full is None else (
            full[:, :half] if rest.endswith("w1") else full[:, half:]
        )
    elif rest.endswith("experts.w2"):
        name = f"{layer}.mlp.experts.down_proj"
    else:
        return vllm_key, None  # lm_head, embed_tokens: no adapter there
    return name, peft.get(name)


def _loaded(entry: dict, peft: dict[str, torch.Tensor]) -> dict:
    """What vLLM did with a loaded adapter: per peft delta, whether vLLM's buffers hold it."""
    if "error" in entry:
        return {"did": "refused", "error": entry["error"]}
    held = load_file(entry["deltas"])
    covered, wrong, nowhere, diff = set(), [], [], 0.0
    for key, delta in held.items():
        name, want = _expected(key, peft)
        if want is None:
            if delta.abs().max() > 0:
                wrong.append(key)
            continue
        covered.add(name.removesuffix(".gate").removesuffix(".up"))
        if delta.abs().max() == 0:
            nowhere.append(name)
            continue
        d = (delta - want.reshape(delta.shape)).abs().max().item()
        diff = max(diff, d)
        if d > DELTA_ATOL:
            wrong.append(key)
    nowhere += sorted(set(peft) - covered)  # peft deltas on modules vLLM has no LoRA buffers for
    did = "as peft" if not wrong and not nowhere else ("part applied nowhere" if nowhere and not wrong else "otherwise")
    return {"did": did, "delta_diff": diff, "nowhere": sorted(nowhere), "wrong": wrong, "modules": len(held)}


def _moe(tmp_path_factory, family: str) -> dict:
    python = require_vllm()
    root = tmp_path_factory.mktemp(family)
    built = run_alone(_build_moe, root, family, timeout=600)
    peft = torch.load(root / "peft_deltas.pt")
    adapters = {n: str(root / "adapters" / n) for n in MOE}
    jobs = {"default": ({}, [{"name": n, "path": p, "mode": "loaded"} for n, p in adapters.items()])}
    if family == "qwen3_moe":  # the fused layout asks for these; Mixtral's v5 names are applied nowhere either way
        jobs["mixed"] = (
            {"enable_mixed_moe_lora_format": True},
            [{"name": "fused", "path": adapters["fused"], "mode": "loaded", "is_3d": True}],
        )
    engines = {}
    for setting, (engine, requests) in jobs.items():
        job = {
            "base": str(root / "base"),
            "max_lora_rank": 16,
            "prompts": [],
            "max_tokens": 1,
            "engine": engine,
            "adapters": requests,
        }
        engines[setting] = run_engine(python, job, root / f"engine-{setting}")
    outcome = {
        (setting, n): _loaded(entry, peft)
        for setting, served in engines.items()
        for n, entry in served["adapters"].items()
    }
    result = {
        "root": root,
        "configs": built["configs"],
        "vllm": engines,
        "outcome": outcome,
        "check": _checks(root, python),
        "peft_modules": sorted(peft),
    }
    (root / "comparison.json").write_text(
        json.dumps(
            {
                k: (v if k != "outcome" else {"/".join(x): y for x, y in v.items()})
                for k, v in result.items()
                if k != "root"
            },
            indent=1,
            default=str,
        )
    )
    return result


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return _moe(tmp_path_factory, "qwen3_moe")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return _moe(tmp_path_factory, "mixtral")


def test_qwen_moe_per_expert_adapter_is_loaded_as_peft_computes_it(qwen):
    outcome = qwen["outcome"][("default", "per_expert")]
    assert outcome["did"] == "as peft", outcome
    assert any(".mlp.experts." in m for m in qwen["peft_modules"]) and any(
        m.endswith("mlp.gate.weight") for m in qwen["peft_modules"]
    )


def test_qwen_moe_fused_adapter_needs_the_mixed_format_flags_and_is_then_loaded_as_peft_computes_it(qwen):
    refused = qwen["outcome"][("default", "fused")]
    assert refused["did"] == "refused" and "enable_mixed_moe_lora_format" in refused["error"]
    assert qwen["outcome"][("mixed", "fused")]["did"] == "as peft", qwen["outcome"][("mixed", "fused")]


def test_mixtral_per_expert_adapter_is_loaded_and_the_v5_names_are_applied_nowhere(mixtral):
    assert mixtral["outcome"][("default", "per_expert")]["did"] == "as peft", mixtral["outcome"][
        ("default", "per_expert")
    ]
    fused = mixtral["outcome"][("default", "fused")]
    assert fused["did"] == "part applied nowhere" and not fused["wrong"]
    gate_up = {f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(sm.LAYERS)}
    halves = {f"{m}.{half}" for m in gate_up for half in ("gate", "up")}
    assert set(fused["nowhere"]) == ({m for m in mixtral["peft_modules"] if ".mlp." in m} - gate_up) | halves


# ----------------------------------------------------------------------------------------- verdicts


def _truth(family: str, name: str, result: dict) -> tuple[str, bool]:
    """(what vLLM did, whether it needed engine flags) for one adapter; flags count only if it then served it as
    peft."""
    if family == "llama":
        return result["outcome"][name]["did"], False
    default = result["outcome"][("default", name)]
    mixed = result["outcome"].get(("mixed", name))
    if default["did"] == "refused" and mixed is not None:
        return mixed["did"], mixed["did"] == "as peft"
    return default["did"], False


CASES = [("llama", n) for n in DENSE] + [(f, n) for f in ("qwen3_moe", "mixtral") for n in MOE]


@pytest.mark.parametrize("family,name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
@pytest.mark.parametrize("mode", ["asked", "rules"])
def test_check_verdict_is_what_vllm_did(request, family, name, mode):
    result = request.getfixturevalue({"llama": "dense", "qwen3_moe": "qwen", "mixtral": "mixtral"}[family])
    did, flags = _truth(family, name, result)
    verdict = result["check"][mode][name]
    assert verdict["verdict"] == ("compatible" if did == "as peft" else "NOT compatible"), (did, verdict["lines"])
    assert ("engine-flags" in verdict["codes"]) == flags, verdict["lines"]
    if did == "part applied nowhere":
        assert verdict["codes"].get("applied-nowhere") == "error", verdict["lines"]


LABELS = {
    "plain": "dense, plain",
    "padded": "dense, mixed ranks padded (`pad_rank_to=16`)",
    "mixed_rank": "dense, mixed ranks and scales",
    "lm_head": "dense, with `lm_head`",
    "dora": "dense, DoRA",
    "per_expert": "per expert",
    "fused": "fused (`target_parameters`)",
}
FAMILY = {"llama": "Llama", "qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral"}


def _row(family: str, name: str, result: dict) -> str:
    did, flags = _truth(family, name, result)
    label = LABELS[name] if family == "llama" else f"{FAMILY[family]}, {LABELS[name]}"
    how = {
        "as peft": ("greedy tokens and log-probs as peft's" if family == "llama" else "LoRA buffers = peft's deltas"),
        "refused": "refuses it",
        "part applied nowhere": "loads it, applies the expert and router LoRA nowhere",
        "otherwise": "serves it otherwise than peft",
    }[did]
    if flags:
        how += " with `enable_mixed_moe_lora_format` + `is_3d_lora_weight` (refused without)"

    def verdict(mode: str) -> str:
        v = result["check"][mode][name]
        codes = ", ".join(f"`{c}`" for c, s in v["codes"].items() if s != "info" and c not in ("rank-size",))
        return v["verdict"] + (f" ({codes})" if codes else "")

    return f"| {label} | {how} | {verdict('asked')} | {verdict('rules')} |"


def test_readme_table(dense, qwen, mixtral):
    results = {"llama": dense, "qwen3_moe": qwen, "mixtral": mixtral}
    rows = [_row(f, n, results[f]) for f, n in CASES]
    table = "\n".join(
        [
            "| adapter (as the exporter writes it) | vLLM 0.32 | `check`, asking vLLM | `check`, 0.32 rules |",
            "| --- | --- | --- | --- |",
            *rows,
        ]
    )
    readme = (ROOT / "docs" / "serving.md").read_text()
    assert table in readme, "docs/serving.md's vLLM table differs from what vLLM did; the table now:\n" + table
