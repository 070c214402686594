"""A real vLLM OpenAI-compatible server on CPU (the vLLM venv), with its runtime LoRA API on, for delivery tests.

Started by the vLLM venv's python as `python -m vllm.entrypoints.openai.api_server` on a free localhost port, with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and `--api-key` from the environment variable the tests name; waits for
`/health`. Start-up takes about a minute on a quiet machine (several under load): one server per test module.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.vllm_env import engine_env

API_KEY = "test-vllm-key-3f9c2a71"  # a made-up key: the tests check it reaches no file and no log line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    python: str
    base: Path
    log_path: Path
    max_lora_rank: int = 16
    max_loras: int = 2
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 900) -> Server:
        self.port = self.port or free_port()
        env = engine_env()
        env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_LOGGING_LEVEL="INFO")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        args = [
            self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.base),
            "--dtype", "float32", "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras), "--max-model-len", "64", "--enforce-eager", "--max-num-seqs", "4",
            "--kv-cache-memory-bytes", str(32 << 20), "--seed", "0", "--host", "127.0.0.1",
            "--port", str(self.port), "--api-key", API_KEY,
        ]  # fmt: skip
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the vLLM server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2)
        self.stop()
        raise AssertionError(f"the vLLM server did not come up within {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def post(self, path: str, body: dict) -> tuple[int, dict | str]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Bearer {API_KEY}")
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                text = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as exc:
            text, status = exc.read().decode(), exc.code
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def greedy(self, model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]] | str:
        """Greedy token ids of `model` (a served name) for each prompt, or the server's error text."""
        out = []
        for prompt in prompts:
            status, body = self.post(
                "/v1/completions",
                {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
            )
            if status != 200:
                return f"HTTP {status}: {body}"
            out.append(list(body["choices"][0]["token_ids"]))
        return out

    def models(self) -> list[str]:
        request = urllib.request.Request(self.url + "/v1/models")
        request.add_header("Authorization", f"Bearer {API_KEY}")
        with urllib.request.urlopen(request, timeout=60) as r:
            return sorted(card["id"] for card in json.loads(r.read())["data"])
