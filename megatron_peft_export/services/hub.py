"""Push adapters to the Hugging Face Hub: the HF Trainer's `push_to_hub` / `hub_strategy` for Megatron runs.

`push_adapters` makes one commit (repo and branch created when missing, retries on transient
errors); `HubPusher` feeds it from the training hook in the background, per strategy:

- `end`: the last adapter, at the repo root, when training finishes (`finalize`);
- `every_save`: each adapter, at the root, as it is published; a newer adapter replaces one still
  waiting (the older is skipped, with a log line);
- `all_checkpoints`: as every_save, and each iteration also under `iter_XXXXXXX/`; adapters that
  pile up behind a running push go together in the next commit, so no folder is lost.

The token is never handled here: huggingface_hub reads it (HF_TOKEN, then the stored login) for
each request, and every message this module logs or raises has it masked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PushConfig
from ..errors import ExportError, PushError
from ..io.checkpoints import ITERATION_GLOB, ITERATION_PLACEHOLDER, iteration_name, iteration_of
from ..io.peft_dir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_CARD,
    has_config,
    read_card,
    read_config,
    read_header,
    write_card,
    write_config,
)
from .delivery import RESULT_FILE as SERVING_RECORD

log = logging.getLogger("megatron_peft_export")
VERIFICATION_FILE = "verification.json"
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_NETWORK_ERRORS = {"TransportError", "ConnectionError", "Timeout", "TimeoutError", "TimeoutException"}


@dataclass(frozen=True)
class Adapter:
    """An adapter directory and the training iteration it holds (None when unknown)."""

    path: Path
    iteration: int | None = None

    @property
    def folder(self) -> str:
        return iteration_name(self.iteration)


def find_adapters(path: str | Path, subdir: str = "hf_adapter") -> list[Adapter]:
    """An adapter directory itself, or every `<path>/iter_*/<subdir>` adapter of a save directory, oldest first."""
    path = Path(path)
    if has_config(path):  # whatever it is: `uploadable` names what is wrong with it
        return [Adapter(path, iteration_of(path))]
    found = [
        Adapter(config.parent, iteration_of(config.parent))
        for config in path.glob(f"{ITERATION_GLOB}/{subdir}/{ADAPTER_CONFIG}")
    ]
    if not found:
        raise PushError(
            f"no adapter at {path}: expected {path}/{ADAPTER_CONFIG} or "
            f"{path}/{ITERATION_GLOB}/{subdir}/{ADAPTER_CONFIG}"
        )
    return sorted(found, key=lambda a: a.iteration if a.iteration is not None else -1)


# ---- one push: stage, commit, retry ----


def _mask(text: str) -> str:
    """`text` with the token huggingface_hub would send (and every other known secret) replaced by ***."""
    from ..redact import redact

    try:
        import huggingface_hub  # noqa: F401  (so redact sees the stored login too)
    except ImportError:
        pass
    return redact(text)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(exc: BaseException, config: PushConfig) -> tuple[str, bool]:
    """What went wrong, in one line with what to do, and whether retrying may help."""
    repo = config.repo_id
    at = f" at revision {config.revision}" if config.revision else ""
    names = {c.__name__ for c in type(exc).__mro__}
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, ExportError):  # ours (a PushError, or an adapter file the strict reader refused)
        return str(exc), False
    if "OfflineModeIsEnabled" in names:
        return "HF_HUB_OFFLINE is set, so huggingface_hub makes no request; unset it to push", False
    if "HfHubHTTPError" in names and isinstance(status, int):
        server = _one_line(getattr(exc, "server_message", None) or "")
        detail = f" (the Hub says: {server})" if server else ""
        if status == 401:
            return (
                f"authentication failed (401): the Hub did not accept the token{detail}; set HF_TOKEN or run "
                f"`hf auth login` with a token that has write access to {repo}"
            ), False
        if status == 403:
            return (
                f"permission denied (403): the token may not create or write {repo}{detail}; use a write token "
                f"of an account that may write to the {repo.split('/')[0]} namespace"
            ), False
        if status == 404:
            return (
                f"not found (404): {repo}{at} does not exist or the token cannot see it{detail}; "
                f"check the repo id and revision"
            ), False
        if status in _TRANSIENT_STATUS:
            return f"the Hub answered {status}{detail}", True
        return f"the Hub refused the push to {repo} ({status}){detail}", False
    if names & _NETWORK_ERRORS:
        endpoint = config.endpoint or "the Hub (HF_ENDPOINT or https://huggingface.co)"
        return (
            f"cannot reach {endpoint}: {_one_line(exc) or type(exc).__name__}; check the network or the endpoint",
            True,
        )
    if isinstance(exc, ValueError) and "metadata" in str(exc):
        return f"the Hub rejected the model card's metadata: {_one_line(exc)}", False
    if isinstance(exc, OSError):
        return f"cannot read the adapter: {_one_line(exc)}", False
    return f"{type(exc).__name__}: {_one_line(exc)}", False


def _commit_message(config: PushConfig, latest: Adapter, checkpoints: Sequence[Adapter]) -> str:
    message = config.commit_message or "Upload HF adapter"
    iterations = sorted({a.iteration for a in (latest, *checkpoints) if a.iteration is not None})
    if len(iterations) == 1:
        return f"{message} (iteration {iterations[0]})"
    if iterations:
        return f"{message} (iterations {', '.join(map(str, iterations))}; latest {latest.iteration} at the root)"
    return message


MAX_VERIFICATION_BYTES = 64 << 20


def _read_verification(adapter: Path) -> dict[str, Any] | None:
    path = adapter / VERIFICATION_FILE
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_VERIFICATION_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, expected at most {MAX_VERIFICATION_BYTES}")
        found = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("%s is unreadable; the pushed model card has no verification result: %s", path, exc)
        return None
    return found if isinstance(found, dict) else {"result": found}


def _kind(mode: int) -> str | None:
    """What an entry that push refuses is; None for a regular file or a directory."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}.get(
        stat.S_IFMT(mode), "a special file"
    )


def _refuse(path: Path, kind: str) -> PushError:
    target = f" to {os.readlink(path)}" if kind == "a symbolic link" else ""
    return PushError(
        f"{path} is {kind}{target}; push uploads only regular files inside the adapter directory. "
        "Replace it with the file itself, or remove it. Nothing was uploaded"
    )


def uploadable(adapter_dir: str | Path) -> list[tuple[str, Path]]:
    """(path in the repo folder, local file) of everything push uploads from one adapter directory, checked.

    Its top-level files and, in peft's multi-adapter layout, the files of each subdirectory holding an
    adapter_config.json; never hidden entries or other folders (verification's reference logits). Every one must be a
    regular file inside the directory: a symbolic link (to the Hub token file or anything else, a linked folder
    included), a FIFO, socket or device is refused with a PushError naming it, before anything is read or uploaded.
    """
    root = Path(adapter_dir)
    found: list[tuple[str, Path]] = []
    try:
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name == SERVING_RECORD:  # this machine's server, not the adapter
                continue
            path, mode = root / entry.name, entry.stat(follow_symlinks=False).st_mode
            if (kind := _kind(mode)) is not None:
                raise _refuse(path, kind)
            if stat.S_ISREG(mode):
                found.append((entry.name, path))
            elif has_config(path):  # peft's multi-adapter layout
                for inner in sorted(os.scandir(path), key=lambda e: e.name):
                    inner_mode = inner.stat(follow_symlinks=False).st_mode
                    if inner.name.startswith(".") or stat.S_ISDIR(inner_mode):
                        continue
                    if (kind := _kind(inner_mode)) is not None:
                        raise _refuse(path / inner.name, kind)
                    found.append((f"{entry.name}/{inner.name}", path / inner.name))
    except OSError as exc:
        raise PushError(f"cannot list the adapter directory {root}: {exc}") from None
    return found


def _stage(adapter: Adapter, into: Path, config: PushConfig) -> None:
    """Link the adapter's files into `into` (no copies), with the model card (and config) filled in for the Hub."""
    from ..core.peft_format import card_dialect, card_quantization, is_ours, model_card
    from ..multi_adapter import LAYOUT_HEADING

    source = adapter.path
    files = dict(uploadable(source)) if source.is_dir() else {}
    if ADAPTER_CONFIG not in files:
        raise PushError(
            f"expected an adapter directory with {ADAPTER_CONFIG} at {source}; was it removed before the push?"
        )
    for name, path in files.items():
        (into / name).parent.mkdir(exist_ok=True)
        (into / name).symlink_to(path.absolute())
    config_json = read_config(files[ADAPTER_CONFIG])
    if config.base_model:
        config_json["base_model_name_or_path"] = config.base_model
        write_config(into, config_json)
    card = files.get(MODEL_CARD)
    old_card = read_card(card) if card is not None else None
    if card is not None and (old_card is None or not is_ours(old_card)):
        return  # the user's own card goes up unchanged
    weights = files.get(ADAPTER_WEIGHTS)
    text = model_card(
        config_json,
        dialect=card_dialect(old_card) if old_card else None,
        source=f"iteration {adapter.iteration}" if adapter.iteration is not None else "a Megatron adapter directory",
        num_tensors=len(read_header(weights)) if weights is not None else 0,
        iteration=adapter.iteration,
        verification=_read_verification(source) if VERIFICATION_FILE in files else None,
        quantization=card_quantization(old_card) if old_card else None,
    )
    if old_card and LAYOUT_HEADING in old_card:  # the multi-adapter table the export appended
        text += old_card[old_card.index(LAYOUT_HEADING) :]
    write_card(into, text)


def push_adapters(
    config: PushConfig,
    latest: Adapter,
    checkpoints: Sequence[Adapter] = (),
    *,
    api: Any = None,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """One commit: `latest` at the repo root, each of `checkpoints` under its `iter_XXXXXXX/`. Returns the commit URL.

    Creates the repository (private when asked) and the branch when missing; retries transient
    errors `config.retries` times with doubling waits; raises PushError with a one-line message.
    """
    missing = [a.path for a in checkpoints if a.iteration is None]
    if missing:
        raise PushError(
            f"cannot name a folder for {missing[0]}: expected it under an {ITERATION_PLACEHOLDER} directory"
        )
    message = _commit_message(config, latest, checkpoints)
    attempt = 0
    while True:
        try:
            return _push_once(config, latest, checkpoints, message, api)
        except Exception as exc:
            problem, transient = describe(exc, config)
            problem = _mask(problem)
            if not transient or attempt == config.retries:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                raise PushError(f"{problem}{tries}") from None
        wait = config.retry_wait * 2**attempt
        attempt += 1
        log.warning("push to %s: %s; retry %d of %d in %.3g s", config.repo_id, problem, attempt, config.retries, wait)
        sleep(wait)


def _push_once(config: PushConfig, latest: Adapter, checkpoints: Sequence[Adapter], message: str, api: Any) -> str:
    if api is None:
        from huggingface_hub import HfApi, get_token

        if get_token() is None:
            raise PushError(
                f"no Hugging Face token: set HF_TOKEN or run `hf auth login` (pushing to {config.repo_id} needs "
                f"write access)"
            )
        api = HfApi(endpoint=config.endpoint)
    staging = Path(tempfile.mkdtemp(prefix="hf-adapter-push-"))
    try:
        _stage(latest, staging, config)
        for adapter in checkpoints:
            (staging / adapter.folder).mkdir()
            _stage(adapter, staging / adapter.folder, config)
        api.create_repo(config.repo_id, private=True if config.private else None, exist_ok=True)
        if config.revision and config.revision != "main":
            api.create_branch(config.repo_id, branch=config.revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=config.repo_id, folder_path=staging, commit_message=message, revision=config.revision
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(getattr(info, "commit_url", info))


# ---- the training hook's background pusher ----


@dataclass
class _Job:
    latest: Adapter
    checkpoints: tuple[Adapter, ...] = ()


class HubPusher:
    """`after_publish(iteration, path)` and `finalize()` for AdapterExportHook; pushes never block the caller.

    One push runs at a time on a thread of its own; at most one more waits. Failures are logged
    (token masked) and never raised: training goes on.
    """

    def __init__(self, config: PushConfig, *, api: Any = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self._api, self._sleep = api, sleep
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future | None = None
        self._waiting: _Job | None = None
        self._last: Adapter | None = None
        self.pushed: list[str] = []
        """Commit URLs of the pushes that succeeded (writer only)."""
        self.failures: list[str] = []
        """One line per push that failed."""

    def after_publish(self, iteration: int, path: Path) -> None:
        adapter = Adapter(Path(path), iteration)
        if self.config.strategy == "end":
            self._last = adapter
            return
        self._submit(_Job(adapter, (adapter,) if self.config.strategy == "all_checkpoints" else ()))

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._running is None:
                log.info(
                    "pushing the HF adapter of iteration %s to %s in the background",
                    job.latest.iteration,
                    self.config.repo_id,
                )
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-adapter-push")
                try:
                    self._running = self._executor.submit(self._work, job)
                    return
                # interpreter exit (finalize from atexit): no new thread starts; push in this one, below
                except RuntimeError:
                    self._running = Future()
            else:
                self._queue(job)
                return
        self._work(job)

    def _queue(self, job: _Job) -> None:
        """Behind the running push (the lock is held)."""
        old, busy = self._waiting, "a previous push is still running"
        if old is None:
            self._waiting = job
            log.info("push of iteration %s to %s queued: %s", job.latest.iteration, self.config.repo_id, busy)
        elif self.config.strategy == "all_checkpoints":
            self._waiting = _Job(job.latest, old.checkpoints + job.checkpoints)
            log.info(
                "push of iteration %s to %s queued with iteration(s) %s in one commit: %s",
                job.latest.iteration,
                self.config.repo_id,
                ", ".join(str(a.iteration) for a in old.checkpoints),
                busy,
            )
        else:
            self._waiting = job
            log.warning(
                "push of iteration %s to %s skipped: iteration %s is newer and replaces it in the queue (%s)",
                old.latest.iteration,
                self.config.repo_id,
                job.latest.iteration,
                busy,
            )

    def _work(self, job: _Job | None) -> None:
        while job is not None:
            try:
                url = push_adapters(self.config, job.latest, job.checkpoints, api=self._api, sleep=self._sleep)
                self.pushed.append(url)
                log.info(
                    "pushed the HF adapter of iteration %s to %s: %s", job.latest.iteration, self.config.repo_id, url
                )
            except Exception as exc:  # never the reason training stops
                problem = _mask(str(exc) if isinstance(exc, PushError) else describe(exc, self.config)[0])
                self.failures.append(problem)
                log.warning(
                    "pushing the HF adapter of iteration %s to %s failed; training continues: %s",
                    job.latest.iteration,
                    self.config.repo_id,
                    problem,
                )
            with self._lock:
                job, self._waiting = self._waiting, None
                if job is None:
                    self._running = None

    def finalize(self) -> None:
        """Push the last adapter (strategy end) and wait for every push to finish."""
        if self._last is not None:
            last, self._last = self._last, None
            self._submit(_Job(last))
        with self._lock:
            running = self._running
        if running is not None:
            running.result()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
