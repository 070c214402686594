"""Run Megatron-LM's real training code (``megatron.training.pretrain`` with the stock ``pretrain_gpt.py``) on CPU.

Megatron-LM's training side is not on the package index; its source at tag core_v0.16.1 (whose
``megatron/core`` is the installed megatron-core 0.16.1) is found at ``$MEGATRON_LM`` or
``../shared/thirdparty/megatron-lm-core_v0.16.1`` from the repository root. Without it the tests
that need it skip with the reason, except in CI (``CI=true``), where they fail.

``launch`` starts one process per rank with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) running ``tests/support/pretrain_gpt_lora.py``: real processes, so
``sys.exit`` on an exit condition, atexit handlers and Megatron's own helper processes behave as
in a user's run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .tiny_gpt import TinyGPTConfig

ROOT = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).with_name("pretrain_gpt_lora.py")
TAG = "core_v0.16.1"
# Megatron-LM's tokenizer for mock data: the NullTokenizer adds one id (end of document) to --vocab-size.
NULL_TOKENIZER_EXTRA_IDS = 1


def megatron_lm_dir() -> Path | None:
    """Megatron-LM's source directory, or None when it is not on this machine."""
    found = Path(os.environ.get("MEGATRON_LM") or ROOT.parent / "shared" / "thirdparty" / f"megatron-lm-{TAG}")
    return found.resolve() if (found / "megatron" / "training" / "training.py").is_file() else None


def require_megatron_lm() -> Path:
    """The source directory; skips the test without it (fails in CI) and without its extra packages."""
    found = megatron_lm_dir()
    missing = [] if found else [f"Megatron-LM's source ($MEGATRON_LM or ../shared/thirdparty/megatron-lm-{TAG})"]
    for module in ("six", "einops", "flask_restful", "sentencepiece", "tiktoken", "triton"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the package providing {module!r} (pip install -c constraints.txt -e '.[megatron-lm]')")
    if missing:
        reason = "Megatron-LM's training code cannot run here: missing " + "; ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI must run these tests)", pytrace=False)
        pytest.skip(reason)
    return found


def tiny_gpt_flags(cfg: TinyGPTConfig = TinyGPTConfig()) -> list[str]:
    """Megatron-LM flags for the tiny Llama-shaped GPT of ``tests.support.tiny_gpt`` on CPU, with mock data.

    Three flags only because of the CPU: ``--distributed-backend gloo``; ``--rerun-mode disabled`` (the rerun
    state machine saves the CUDA RNG state before every step); ``--clip-grad 0`` (megatron's gradient clipping
    asserts CUDA tensors). Fusions are CUDA kernels, so they are off; ``--transformer-impl local``: no
    Transformer Engine.
    """
    return [
        "--distributed-backend",
        "gloo",
        "--rerun-mode",
        "disabled",
        "--clip-grad",
        "0",
        "--transformer-impl",
        "local",
        "--use-cpu-initialization",
        "--no-masked-softmax-fusion",
        "--no-bias-swiglu-fusion",
        "--no-bias-dropout-fusion",
        "--no-rope-fusion",
        "--no-gradient-accumulation-fusion",
        "--no-persist-layer-norm",
        "--num-layers",
        str(cfg.num_layers),
        "--hidden-size",
        str(cfg.hidden_size),
        "--num-attention-heads",
        str(cfg.num_attention_heads),
        "--group-query-attention",
        "--num-query-groups",
        str(cfg.num_query_groups),
        "--kv-channels",
        str(cfg.kv_channels),
        "--ffn-hidden-size",
        str(cfg.ffn_hidden_size),
        "--seq-length",
        str(cfg.seq_length),
        "--max-position-embeddings",
        str(cfg.seq_length),
        *(["--swiglu"] if cfg.gated_linear_unit else []),
        "--normalization",
        "RMSNorm",
        "--norm-epsilon",
        str(cfg.layernorm_epsilon),
        "--position-embedding-type",
        "rope",
        "--rotary-base",
        str(cfg.rotary_base),
        "--untie-embeddings-and-output-weights",
        "--disable-bias-linear",
        "--attention-dropout",
        "0",
        "--hidden-dropout",
        "0",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        str(cfg.vocab_size - NULL_TOKENIZER_EXTRA_IDS),
        "--make-vocab-size-divisible-by",
        "64",
        "--mock-data",
        "--seed",
        "1234",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--lr",
        "1e-2",
        "--lr-decay-style",
        "constant",
        "--eval-iters",
        "0",
        "--eval-interval",
        "1000",
        "--log-interval",
        "1",
        "--ckpt-format",
        "torch_dist",
    ]


@dataclasses.dataclass
class Run:
    """A finished launch: each rank's exit code and combined output."""

    returncodes: list[int]
    logs: list[str]

    def check(self) -> Run:
        if any(self.returncodes):
            tails = "\n".join(
                f"--- rank {r} (exit {c}) ---\n{log[-6000:]}"
                for r, (c, log) in enumerate(zip(self.returncodes, self.logs))
            )
            raise AssertionError(f"Megatron-LM run failed:\n{tails}")
        return self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    world: int, argv: list[str], log_dir: Path, *, env: dict[str, str | None] | None = None, timeout: float = 240
) -> Run:
    """Run ``pretrain_gpt.py`` (through ``pretrain_gpt_lora.py``) on ``world`` ranks with ``argv``; wait for all of
    them.

    ``env`` adds to (None: removes from) this process's environment. Each rank's output goes to
    ``log_dir/rank<r>.log``. After ``timeout`` seconds every rank is killed and the test fails.
    """
    source = require_megatron_lm()
    log_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        rank_env = {
            **os.environ,
            "MEGATRON_LM": str(source),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "CUDA_DEVICE_MAX_CONNECTIONS": "1",
            **(env or {}),
        }
        rank_env = {k: v for k, v in rank_env.items() if v is not None}
        log = open(log_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ENTRY), *argv],
                env=rank_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=log_dir,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        # every thread's stack into the rank's log (pretrain_gpt_lora.py; its forks too), then kill its group
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGUSR1)
        time.sleep(2)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        tails = "\n".join(f"--- rank {r} ---\n{(log_dir / f'rank{r}.log').read_text()[-8000:]}" for r in range(world))
        raise TimeoutError(
            f"Megatron-LM ranks did not finish within {timeout} s; killed (logs in {log_dir}):\n{tails}"
        ) from None
    finally:
        for log in logs:
            log.close()
    return Run([p.returncode for p in procs], [(log_dir / f"rank{r}.log").read_text() for r in range(world)])
