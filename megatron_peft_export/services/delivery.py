"""Live delivery: each published adapter loaded into a running vLLM server through its runtime LoRA API.

The server is vLLM's OpenAI-compatible one, started with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and
`--enable-lora`. For an adapter of iteration N this module

1. asks the server its version (`GET /version`) and, where it tells them (`GET /server_info`, vLLM's development
   endpoints), its LoRA limits (`--max-lora-rank`, `--max-cpu-loras`);
2. checks the adapter by the rules of that vLLM version (`compat`) and against those limits: a failing check loads
   nothing, so whatever the server served before stays served;
3. loads it under a name of its own, `<name>-iter_0000N` (`POST /v1/load_lora_adapter`), then moves the stable
   `<name>` to it (the same request with `load_inplace`: the server swaps the weights under that name at once, so
   clients asking for `<name>` always get the newest adapter that loaded);
4. unloads the per-iteration names beyond the newest `keep` (`POST /v1/unload_lora_adapter`);
5. writes what happened to `serving.json` in the adapter directory (server, names, status, times), atomically.

A request that fails for want of an answer (connection refused, a timeout, a 5xx) is retried with exponential
backoff a bounded number of times; then the delivery is given up with one warning, and the next adapter is tried
afresh. In the training hook this runs on a thread of its own behind a queue of one: while a delivery is in flight,
a newer adapter replaces an older one that waits (only the newest matters to a server), so a slow or dead server
never holds training up. The API key comes from the environment variable the configuration names and is sent only
in the Authorization header, never after a redirect (none is followed); it is masked (`redact`) in every log line
and in serving.json, should a server echo it. Each request takes at most `timeout` seconds in all and reads at most
ANSWER_LIMIT bytes; a malformed answer is a refusal, never a raw exception.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compat import check_adapter, has_errors
from ..config import ServeConfig
from ..errors import DeliveryError, ExportError
from ..io import checkpoints
from ..io.atomic_dir import write_file
from ..io.peft_dir import adapter_dirs, read_adapter
from ..redact import redact, secret_variable

log = logging.getLogger("megatron_peft_export")

RESULT_FILE = "serving.json"
__all__ = ["RESULT_FILE", "Deliverer", "Delivery", "ServeConfig", "Serving", "VllmServer", "deliver"]


def served_name(config: ServeConfig, iteration: int) -> str:
    """The name an iteration's adapter is served under, beside the stable `config.name`."""
    return f"{config.name}-{checkpoints.iteration_name(iteration)}"


class _NoAnswer(Exception):
    """The server did not answer (worth retrying)."""


ANSWER_LIMIT = 1 << 20
"""Bytes of an answer read at most (vLLM's answers are a few kB); the rest is never read."""
ERROR_LIMIT = 1 << 16
_LATE = "no whole answer within serve.timeout"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


class _Deadline:
    """One request's opener (no redirects) whose sockets are shut when `seconds` have passed: a server dripping its
    status line, headers or body a byte at a time (each read within the socket's timeout) cannot hold a request."""

    def __init__(self, seconds: float) -> None:
        self.sockets: list[Any] = []
        self.expired = False
        self.opener = urllib.request.build_opener(
            _NoRedirect, self._watching(urllib.request.HTTPHandler), self._watching(urllib.request.HTTPSHandler)
        )
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _watching(self, base: type) -> Any:
        sockets = self.sockets

        class Watching(base):  # type: ignore[misc,valid-type]
            def do_open(self, http_class: Any, req: Any, **kw: Any) -> Any:
                def connection(host: str, **args: Any) -> Any:
                    conn = http_class(host, **args)
                    connect = conn.connect

                    def watched() -> None:
                        connect()
                        sockets.append(conn.sock)

                    conn.connect = watched
                    return conn

                return super().do_open(connection, req, **kw)

        return Watching()

    def _expire(self) -> None:
        self.expired = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


def _read(response: Any, limit: int, deadline: _Deadline) -> str:
    """Up to `limit` bytes of `response` as text (the rest is never read); the deadline's expiry ends it."""
    chunks, size = [], 0
    read = getattr(response, "read1", None) or response.read
    while size < limit:
        chunk = read(min(1 << 16, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if deadline.expired:
        raise _NoAnswer(_LATE)
    return b"".join(chunks).decode("utf-8", "replace")


def _json(text: str) -> Any:
    """The JSON document `text` is, or None for anything else (malformed, nested too deeply, NaN literals)."""
    try:
        return json.loads(text, parse_constant=lambda name: None)
    except (ValueError, RecursionError):
        return None


@dataclass
class VllmServer:
    """The few requests of vLLM's OpenAI-compatible server this module makes, with retries for missing answers."""

    config: ServeConfig
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        secret_variable(self.config.api_key_env)  # masked wherever a server or proxy echoes it

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, str]:
        """(status, text) of one request, within `timeout` seconds in all (a slow drip of bytes included), the
        answer read up to ANSWER_LIMIT bytes; a redirect is not followed (the API key would go with it)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.config.url.rstrip("/") + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        key = os.environ.get(self.config.api_key_env, "").strip()
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        with _Deadline(self.config.timeout) as deadline:
            try:
                with deadline.opener.open(request, timeout=self.config.timeout) as response:
                    return response.status, _read(response, ANSWER_LIMIT, deadline)
            except urllib.error.HTTPError as exc:
                if 300 <= exc.code < 400:
                    raise DeliveryError(
                        f"{self.config.url}{path} answered HTTP {exc.code}, a redirect to "
                        f"{exc.headers.get('Location')!r}; expected the vLLM server itself: give its own URL (a "
                        "redirect is not followed, the API key would go with it)"
                    ) from None
                text = _read(exc, ERROR_LIMIT, deadline)
                if exc.code >= 500 and "load" not in path:
                    raise _NoAnswer(f"HTTP {exc.code}") from None
                return exc.code, text
            except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
                if deadline.expired:
                    raise _NoAnswer(_LATE) from None
                reason = getattr(exc, "reason", exc)
                raise _NoAnswer(str(reason) or type(reason).__name__) from None

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, str]:
        """(status, text) of one request, retried with backoff while the server does not answer."""
        delay = self.config.backoff
        for attempt in range(self.config.retries):
            try:
                return self._request(method, path, body)
            except _NoAnswer as exc:
                if attempt + 1 == self.config.retries:
                    raise DeliveryError(
                        f"the vLLM server at {self.config.url} did not answer {method} {path} "
                        f"({self.config.retries} attempts, last: {exc}); expected a running server with "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                    ) from None
                self.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def version(self) -> str:
        status, text = self.request("GET", "/version")
        answer = _json(text) if status == 200 else None
        version = answer.get("version") if isinstance(answer, dict) else None
        if not isinstance(version, str) or not 0 < len(version) <= 100:
            raise DeliveryError(
                f"{self.config.url}/version answered HTTP {status} without a version; expected a vLLM server"
            )
        return version

    def lora_limits(self) -> dict[str, int]:
        """max_lora_rank and max_cpu_loras where the server reports them (development endpoints), else {}."""
        try:
            status, text = self.request("GET", "/server_info?config_format=json")
        except DeliveryError:
            return {}
        answer = _json(text) if status == 200 else None
        vllm = answer.get("vllm_config") if isinstance(answer, dict) else None
        lora = vllm.get("lora_config") if isinstance(vllm, dict) else None
        if not isinstance(lora, Mapping):
            return {}
        return {k: lora[k] for k in ("max_lora_rank", "max_cpu_loras", "max_loras") if isinstance(lora.get(k), int)}

    def loaded(self) -> dict[str, str]:
        """{served name: adapter path} of the LoRA adapters the server holds (`GET /v1/models`)."""
        status, text = self.request("GET", "/v1/models")
        answer = _json(text) if status == 200 else None
        cards = answer.get("data") if isinstance(answer, dict) else None
        return {
            c["id"]: c.get("root", "")
            for c in (cards if isinstance(cards, list) else [])
            if isinstance(c, dict) and c.get("parent") and isinstance(c.get("id"), str)
        }

    def load(self, name: str, path: Path, *, in_place: bool = False) -> None:
        body = {"lora_name": name, "lora_path": str(path), "load_inplace": in_place}
        status, text = self.request("POST", "/v1/load_lora_adapter", body)
        if status != 200:
            raise DeliveryError(f"the vLLM server refused to load {path} as {name!r}: HTTP {status}: {_message(text)}")

    def unload(self, name: str) -> None:
        status, text = self.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):
            raise DeliveryError(f"the vLLM server did not unload {name!r}: HTTP {status}: {_message(text)}")


def _message(text: str) -> str:
    body = _json(text)
    if body is not None:
        found = body.get("error", body) if isinstance(body, dict) else body
        text = found.get("message", text) if isinstance(found, dict) else str(found)
    return " ".join(str(text).split())[:400]


@dataclass
class Delivery:
    """What `serving.json` records of one delivery."""

    server: str
    adapter: str
    iteration: int | None
    names: list[str] = field(default_factory=list)
    status: str = "pending"
    message: str = ""
    vllm: str | None = None
    unloaded: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "adapter": self.adapter,
            "iteration": self.iteration,
            "status": self.status,
            "names": self.names,
            "message": self.message,
            "vllm": self.vllm,
            "unloaded": self.unloaded,
            "started": self.started,
            "finished": self.finished,
            "seconds": None if self.finished is None else round(self.finished - self.started, 3),
        }


def _check(path: Path, version: str, limits: Mapping[str, int], config: ServeConfig) -> None:
    """Raise DeliveryError when vLLM `version` would refuse or mis-serve the adapter, or it exceeds the limits.

    The adapter is read whole by the strict reader first: a malformed directory or NaN/Inf values load nothing.
    """
    if set(adapter_dirs(path)) != {"default"}:
        raise DeliveryError(
            f"{path} holds several adapters (peft's multi-adapter layout); a vLLM server loads one adapter per "
            "directory: deliver each subdirectory on its own"
        )
    adapter_config, shapes = read_adapter(path, values=True, remedy="export it again")
    findings = check_adapter(adapter_config, shapes, "vllm", vllm_version=version)
    if has_errors(findings):
        errors = "; ".join(f.what for f in findings if f.severity == "error")
        raise DeliveryError(f"check against vLLM {version} failed: {errors}")
    max_rank = limits.get("max_lora_rank", config.max_lora_rank)
    rank = max((shape[0] for key, shape in shapes.items() if ".lora_A." in key and shape), default=0)
    if max_rank is not None and rank > max_rank:
        raise DeliveryError(
            f"the adapter's rank {rank} exceeds the server's --max-lora-rank {max_rank}; export with a smaller "
            "rank or restart the server with a larger --max-lora-rank"
        )


def deliver(path: str | Path, iteration: int | None, config: ServeConfig, server: VllmServer | None = None) -> Delivery:
    """Load the adapter at `path` into the server (checked first), move the stable name, unload old iterations.

    Returns the record written to `serving.json`; never raises for what the server or the check did (status
    "refused" or "failed" with the message), only for a serving.json that cannot be written.
    """
    path = Path(path).absolute()
    server = server or VllmServer(config)
    record = Delivery(server=config.url, adapter=str(path), iteration=iteration)
    try:
        record.vllm = server.version()
        _check(path, record.vllm, server.lora_limits(), config)
    except (DeliveryError, ExportError) as exc:
        return _finish(path, record, "refused", str(exc))
    name = served_name(config, iteration) if iteration is not None else None
    try:
        if name is not None:
            server.load(name, path, in_place=True)
            record.names.append(name)
        server.load(config.name, path, in_place=True)
        record.names.append(config.name)
        if name is not None:
            record.unloaded = _unload_old(server, config, keep_from=iteration)
    except DeliveryError as exc:
        return _finish(path, record, "failed", str(exc))
    return _finish(path, record, "loaded", "")


def _unload_old(server: VllmServer, config: ServeConfig, keep_from: int) -> list[str]:
    """Unload this configuration's per-iteration names beyond the newest `keep` (those up to `keep_from`)."""
    prefix = config.name + "-"
    found = {n: checkpoints.parse_iteration(n[len(prefix) :]) for n in server.loaded() if n.startswith(prefix)}
    ours = sorted((i, n) for n, i in found.items() if i is not None and i <= keep_from)
    old = [n for _, n in ours[: max(0, len(ours) - config.keep)]]
    for name in old:
        server.unload(name)
    return old


def _finish(path: Path, record: Delivery, status: str, message: str) -> Delivery:
    """Log the outcome and write serving.json, every text the server or the configuration gave masked (`redact`)."""
    record.status, record.message, record.finished = status, redact(message), time.time()
    record.server, record.vllm = redact(record.server), record.vllm and redact(record.vllm)
    if status != "loaded":
        log.warning("adapter %s not loaded into %s (%s): %s", path, record.server, status, message)
    else:
        log.info("adapter %s served by %s as %s", path, record.server, ", ".join(record.names))
    if path.is_dir():
        write_file(path / RESULT_FILE, json.dumps(record.to_json(), indent=2).encode() + b"\n", "serving.json")
    return record


class Deliverer:
    """Deliveries on a thread of their own behind a queue of one: the newest waiting adapter replaces an older one.

    `submit` never blocks on the server; `close` waits (bounded) for what is in flight and pending.
    """

    def __init__(self, config: ServeConfig, server: VllmServer | None = None) -> None:
        self.config = config
        self.server = server or VllmServer(config)
        self.results: list[Delivery] = []
        self._pending: tuple[Path, int | None] | None = None
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, path: str | Path, iteration: int | None) -> None:
        with self._cond:
            if self._thread is None:  # started by the first adapter: ranks that never publish have no thread
                self._thread = threading.Thread(target=self._run, name="hf-adapter-serve", daemon=True)
                self._thread.start()
            if self._pending is not None:
                log.info("adapter %s superseded before delivery by %s", self._pending[0], path)
            self._pending = (Path(path), iteration)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                (path, iteration), self._pending = self._pending, None
                self._busy = True
            try:
                self.results.append(deliver(path, iteration, self.config, self.server))
            except Exception as exc:  # serving.json unwritable and the like: a warning, never the training run
                log.warning("delivery of %s to %s failed: %s", path, self.config.url, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or in flight; False when `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> None:
        self.wait(timeout)
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


class Serving:
    """The training hook's `serve` option: after each publish (and its verification, when on), the adapter goes to
    a Deliverer; an adapter whose verification failed is not loaded (serving.json says why)."""

    def __init__(self, config: ServeConfig, verification: Any = None) -> None:
        self.config = config
        self.verification = verification
        self.deliverer = Deliverer(config)

    def after_publish(self, iteration: int, path: Path) -> None:
        results = getattr(self.verification, "results", None) or []
        verdict = next((r for r in reversed(results) if Path(r.adapter).resolve() == Path(path).resolve()), None)
        if verdict is not None and verdict.status == "failed":
            record = Delivery(server=self.config.url, adapter=str(path), iteration=iteration)
            _finish(Path(path), record, "skipped", f"verification failed: {verdict.summary}")
            return
        self.deliverer.submit(path, iteration)

    def finalize(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the delivery in flight and the pending one; never raises."""
        if not self.deliverer.wait(timeout):
            log.warning("delivery to %s still running after %.0f s at finalize; left behind", self.config.url, timeout)
        self.deliverer.close(0)
