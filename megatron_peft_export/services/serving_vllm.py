"""Asking vLLM itself what it does with an adapter: its own loader, for the base model's architecture.

vLLM is not a dependency: it lives in its own environment (it pins its own torch and transformers). `check` uses
it when told where (`--vllm-python PATH`, or $MEGATRON_PEFT_EXPORT_VLLM_PYTHON: a python that imports vllm) or
when vLLM is importable here, and runs `vllm_probe.py` with that python in a subprocess (vLLM's imports and
process-group state stay out of this process). The answer becomes findings: what vLLM refuses (its message),
modules it loads and applies nowhere, engine flags the adapter needs, and modules it scales differently from
peft. The version rules in `compat` cover the rest, and everything when vLLM is not at hand.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..compat import Finding, check_adapter, peft_scales
from ..errors import ExportError
from ..io.peft_dir import ADAPTER_WEIGHTS

ENV_VAR = "MEGATRON_PEFT_EXPORT_VLLM_PYTHON"
PROBE = Path(__file__).with_name("vllm_probe.py")
PROBE_TIMEOUT = 900
FEATURE_CODES = frozenset(
    {"dora", "modules-to-save", "bias", "unsupported-feature", "per-module-scale", "per-module-rank", "missing-fields"}
)
"""Rule findings vLLM's own config checks decide (PEFTHelper), so they give way to the probe's answer."""
MODULE_CODES = frozenset({"megatron-names", "fused-names", "applied-nowhere", "engine-flags"})
"""Rule findings vLLM's loader decides on the base model's architecture (only when the probe built it)."""


class ProbeFailed(RuntimeError):
    """vLLM could not be asked (it crashed, timed out or is missing); the rules decide instead."""


def engine_python(explicit: str | None = None) -> str | None:
    """The python to ask: `explicit`, else $MEGATRON_PEFT_EXPORT_VLLM_PYTHON, else this one if it has vLLM, else
    None."""
    for value, source in ((explicit, "--vllm-python"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if value:
            if not (os.path.isfile(value) and os.access(value, os.X_OK)):
                raise ExportError(
                    f"{source} {value!r}: expected the python executable of an environment with vLLM (e.g. "
                    f".venv-vllm/bin/python), found no executable file"
                )
            return os.path.abspath(value)  # the probe runs in a directory of its own; a venv's link is kept
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def run_probe(
    python: str, adapters: Mapping[str, Path], base: Path | None, timeout: float = PROBE_TIMEOUT
) -> dict[str, Any]:
    """vllm_probe.py's RESULT for `adapters` (name -> directory) on `base` (a model directory, or None)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        VLLM_LOGGING_LEVEL="ERROR",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    with tempfile.TemporaryDirectory(prefix="vllm-probe-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(
            json.dumps(
                {
                    "base": str(Path(base).absolute()) if base else None,
                    "adapters": {k: str(Path(v).absolute()) for k, v in adapters.items()},
                    "weights_file": ADAPTER_WEIGHTS,
                }
            )
        )
        try:
            proc = subprocess.run(
                [python, str(PROBE), str(job), str(result)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=tmp,
            )
        except subprocess.TimeoutExpired:
            raise ProbeFailed(f"vLLM did not answer within {timeout:.0f} s") from None
        except OSError as exc:
            raise ProbeFailed(f"cannot run {python}: {exc}") from None
        try:
            found = json.loads(result.read_text())
        except (OSError, ValueError):
            tail = " | ".join(line for line in (proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise ProbeFailed(f"{python} exited {proc.returncode} without an answer ({tail[-400:]})") from None
    if not isinstance(found, dict) or not isinstance(found.get("adapters"), dict):
        raise ProbeFailed("the probe's answer is not what vllm_probe.py writes")
    return found


def engine_findings(
    result: Mapping[str, Any],
    name: str,
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    model_type: str | None,
) -> list[Finding]:
    """The findings for adapter `name`: vLLM's answer, plus the rules (of vLLM's version) it does not decide."""
    entry, version = result["adapters"][name], str(result["vllm"])
    model = result.get("model")
    rules = check_adapter(config, shapes, "vllm", vllm_version=version, model_type=model_type)
    decided = FEATURE_CODES | (MODULE_CODES if model else frozenset())
    found = [f for f in rules if f.code not in decided]
    found += _refused(entry, version, model, [f for f in rules if f.code in decided])
    found += _applied_nowhere(entry, version, model, rules)
    found += _engine_flags(entry, version)
    found += _scale_mismatch(entry, version, peft_scales(config, shapes))
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(found, key=lambda f: order[f.severity])


def _holds(version: str) -> str:
    return f"vLLM {version}, asked"


def _refused(entry: Mapping[str, Any], version: str, model: Any, decided: list[Finding]) -> list[Finding]:
    if not entry.get("refused"):
        return []
    what_for = f"for {model['class']}" if model else "by its config checks (no base model to load it on)"
    fixes = sorted({f.fix for f in decided if f.severity == "error"})
    return [
        Finding(
            "vllm-refuses",
            "error",
            entry["refused"],
            f"vLLM {version} refuses to load the adapter {what_for}",
            "; ".join(fixes) or "change what vLLM's message names",
            _holds(version),
        )
    ]


def _applied_nowhere(entry: Mapping[str, Any], version: str, model: Any, rules: list[Finding]) -> list[Finding]:
    nowhere = entry.get("nowhere") or []
    if not nowhere:
        return []
    fix = next(
        (f.fix for f in rules if f.code == "applied-nowhere"),
        "name the modules as the model does (see the applied modules)",
    )
    return [
        Finding(
            "applied-nowhere",
            "error",
            f"{len(nowhere)} module(s) loaded and applied nowhere "
            f"({', '.join(nowhere[:2])}{' ...' if len(nowhere) > 2 else ''})",
            f"vLLM {version}'s {model['class'] if model else 'model'} has no LoRA module these fill: it loads "
            f"them without an error and serves the base model there",
            fix,
            _holds(version),
        )
    ]


def _engine_flags(entry: Mapping[str, Any], version: str) -> list[Finding]:
    if not entry.get("flags"):
        return []
    return [
        Finding(
            "engine-flags",
            "warning",
            "fused expert LoRA (peft target_parameters)",
            f"vLLM {version} refuses it unless the engine runs with enable_mixed_moe_lora_format=True "
            f"(--enable-mixed-moe-lora-format) "
            "and the LoRARequest has is_3d_lora_weight=True; with both it applies it",
            "start vLLM with --enable-mixed-moe-lora-format and send is_3d_lora_weight=True, or export with "
            "expert_layout='per_expert'",
            _holds(version),
        )
    ]


def _scale_mismatch(entry: Mapping[str, Any], version: str, peft: Mapping[str, Any]) -> list[Finding]:
    scaling = entry.get("scaling") or {}
    off = sorted(
        m
        for m, (_, scale) in scaling.items()
        if m in peft and peft[m] is not None and abs(scale - peft[m]) > 1e-6 * abs(peft[m])
    )
    if not off:
        return []
    m = off[0]
    return [
        Finding(
            "scale-mismatch",
            "error",
            f"{len(off)} module(s) scaled by vLLM otherwise than by peft "
            f"(e.g. {m}: {scaling[m][1]:g}, peft {peft[m]:g})",
            f"vLLM {version} serves these modules at another scale than peft computes, without any error",
            "export with pad_rank_to (one rank and one scale, each module's scale folded into its lora_B)",
            _holds(version),
        )
    ]


def applied_summary(entry: Mapping[str, Any]) -> list[str]:
    """What vLLM applies, grouped over layers and experts: `model.layers.N.self_attn.qkv_proj <- q_proj, v_proj (2)`."""
    groups: dict[tuple[str, tuple[str, ...]], int] = {}
    for module, parts in sorted((entry.get("applied") or {}).items()):
        parent = module.rsplit(".", 1)[0] + "."
        short = tuple(sorted({re.sub(r"(^|\.)\d+\.", r"\1N.", p.removeprefix(parent)) for p in parts}))
        key = (re.sub(r"\.\d+\.", ".N.", module), short)
        groups[key] = groups.get(key, 0) + 1
    return [f"{module} <- {', '.join(parts)} ({count})" for (module, parts), count in groups.items()]
