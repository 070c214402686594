"""The training hook's verifications, in a Python process of their own.

Loading a model with transformers replaces `torch.nn.init`'s functions process-wide for a while
(transformers' `guard_torch_init_functions` and `no_init_weights`). In the training process that would
race with training code using `torch.nn.init` on the training thread while the hook verifies in the
background: ModelOpt validating its saved state at a Megatron-LM checkpoint save found transformers'
functions there and failed the save. So the writer verifies in a child process, started at the first
verification and reused: `python -m megatron_peft_export.services.verify_worker` reads one JSON
request per line on stdin and answers one JSON line on its own copy of stdout (anything libraries
print goes to stderr). It ends when stdin closes, so it never outlives the training process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .verify import VerificationInputError, VerificationResult, VerifyConfig


class VerifyProcess:
    """The child process, from the training process's side; `verify` is called from one thread at a time."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def verify(self, adapter_dir: Path, base_dir: str, config: VerifyConfig) -> VerificationResult:
        """`verify_adapter(adapter_dir, base_dir, config)` in the child; raises as it does (VerificationInputError)."""
        request = json.dumps({"adapter": str(adapter_dir), "base": str(base_dir), "config": dataclasses.asdict(config)})
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                package_root = str(Path(__file__).resolve().parents[2])  # this copy of the package, installed or not
                env = {
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
                }
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
                )
            try:
                self._proc.stdin.write(request + "\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
            except OSError as exc:
                line, error = "", exc
            else:
                error = None
            if not line:
                code = self._proc.poll()
                self.close()
                raise RuntimeError(
                    f"the verification process ended (exit status {code}){f': {error}' if error else ''}"
                )
        reply = json.loads(line)
        if "input_error" in reply:
            raise VerificationInputError(reply["input_error"])
        if "error" in reply:
            raise RuntimeError(reply["error"])
        known = {f.name for f in dataclasses.fields(VerificationResult)}
        return VerificationResult(**{k: v for k, v in reply["result"].items() if k in known})

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


def _serve() -> None:
    from .verify import verify_adapter

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever transformers, peft or torch print goes to stderr, never into a reply
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request: dict[str, Any] = json.loads(line)
        try:
            result = verify_adapter(Path(request["adapter"]), request["base"], VerifyConfig(**request["config"]))
            reply = {"result": dataclasses.asdict(result)}
        except VerificationInputError as exc:
            reply = {"input_error": str(exc)}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve()
