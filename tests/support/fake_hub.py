"""A stand-in for the Hugging Face Hub on 127.0.0.1: just the endpoints `HfApi.create_repo`,
`create_branch` and `upload_folder` (huggingface_hub 2.x) call, with error injection.

Point an `HfApi` at it with `endpoint=hub.endpoint`. What it answers:

- `POST /api/repos/create` (create_repo): 409 when the repo exists (create_repo(exist_ok=True) accepts that);
- `GET /api/models/{repo}` and `.../revision/{rev}` (repo_info: create_repo's fallback after 401/403);
- `POST /api/validate-yaml` (upload_folder checks README.md's front matter first): the front matter
  must parse as a YAML mapping and `base_model` must be a Hub id, as on the Hub;
- `POST /api/models/{repo}/preupload/{rev}`: every file is a "regular" upload, so the file bytes
  travel inside the commit and no LFS/Xet storage endpoint is ever used (the real Hub answers
  "lfs" for *.safetensors; that path is not exercised here);
- `POST /api/models/{repo}/commit/{rev}` (ndjson: header, file, deletedFile, deletedFolder);
- `POST /api/models/{repo}/branch/{branch}` (create_branch; 409 when it exists).

Every request must carry `Authorization: Bearer <token>` with the token given at start (else 401,
as the Hub does for writes). `fail(status, ...)` makes the next requests answer an error; `pause()`
holds commits (a slow upload); a closed port (`closed_port()`) gives "connection refused". State is in memory:
`repos[repo_id]` holds the
branches (path -> bytes), `commits` and `requests` (never the token itself).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$"), "branch"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "info"),
]
_ERROR_MESSAGES = {
    401: "Invalid credentials in Authorization header",
    403: "You don't have the rights to create a model under this namespace",
    404: "Repository not found",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    paths: list[str]
    oid: str


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})


@dataclass
class _Failure:
    status: int
    endpoint: str | None
    times: int | None


class FakeHub:
    """Start with `FakeHub(token)` (or as a context manager); `close()` stops it."""

    def __init__(self, token: str) -> None:
        self._token = token
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.requests: list[tuple[str, str, str]] = []
        """(endpoint name, method, path) of every request, in arrival order."""
        self._failures: list[_Failure] = []
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, status: int, *, endpoint: str | None = None, times: int | None = None) -> None:
        """Answer `status` to the next `times` requests (all, when None) to `endpoint` (any, when None)."""
        with self._lock:
            self._failures.append(_Failure(status, endpoint, times))

    def heal(self) -> None:
        """Forget every injected failure."""
        with self._lock:
            self._failures.clear()

    def pause(self) -> None:
        """Hold every commit request until `resume()` (a slow upload)."""
        self._open.clear()

    def resume(self) -> None:
        """Let commits through again; other processes can POST /_fake/resume (see `resume_from`)."""
        self._open.set()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[revision])

    def close(self) -> None:
        self._open.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- request handling (server threads) ----

    def _injected(self, endpoint: str) -> int | None:
        with self._lock:
            for failure in self._failures:
                if failure.endpoint in (None, endpoint) and failure.times != 0:
                    if failure.times is not None:
                        failure.times -= 1
                    return failure.status
        return None

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        if (method, path) == ("POST", "/_fake/resume"):  # for test code in other processes (forked ranks)
            self.resume()
            return _json(200, {})
        route = next(
            ((name, m) for verb, pattern, name in _ROUTES if verb == method and (m := pattern.match(path))), None
        )
        if route is None:
            return _json(404, {"error": f"fake hub: no route for {method} {path}"})
        name, match = route
        with self._lock:
            self.requests.append((name, method, path))
        status = self._injected(name)
        if status is not None:
            return _error(status, _ERROR_MESSAGES.get(status, f"injected error {status}"))
        if headers.get("Authorization") != f"Bearer {self._token}":
            return _error(401, _ERROR_MESSAGES[401])
        if name == "commit" and not self._open.wait(timeout=120):
            return _error(504, "fake hub: paused for too long")
        params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        with self._lock:
            return getattr(self, f"_{name}")(params, body)

    def _repo(self, repo_id: str) -> Repo | None:
        return self.repos.get(repo_id)

    def _create(self, _, body):
        payload = json.loads(body)
        repo_id = (
            f"{payload['organization']}/{payload['name']}" if payload.get("organization") else f"user/{payload['name']}"
        )
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return _json(409, {"error": "You already created this model repo", "url": url})
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return _json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _info(self, params, _):
        repo = self._repo(params["repo"])
        if repo is None:
            return _error(404, _ERROR_MESSAGES[404], code="RepoNotFound")
        revision = params.get("rev", "main")
        if revision not in repo.branches:
            return _error(404, "Invalid rev id", code="RevisionNotFound")
        files = [{"rfilename": p} for p in sorted(repo.branches[revision])]
        return _json(
            200, {"id": params["repo"], "sha": repo.heads[revision], "private": repo.private, "siblings": files}
        )

    def _validate(self, _, body):
        content = json.loads(body)["content"]
        errors = []
        if content.startswith("---\n"):
            front = content[4:].split("\n---\n", 1)[0]
            try:
                meta = yaml.safe_load(front)
            except yaml.YAMLError as exc:
                meta, errors = None, [f"invalid YAML: {exc}"]
            if not errors and not isinstance(meta, dict):
                errors.append("metadata must be a mapping")
            elif isinstance(meta, dict) and "base_model" in meta and not _HUB_ID.match(str(meta["base_model"])):
                errors.append(f'"base_model" must be a Hub model id, found {meta["base_model"]!r}')
        if errors:
            return _json(400, {"errors": [{"message": e} for e in errors], "warnings": []})
        return _json(200, {"errors": [], "warnings": []})

    def _preupload(self, params, body):
        repo = self._repo(params["repo"])
        if repo is None:
            return _error(404, _ERROR_MESSAGES[404], code="RepoNotFound")
        if params["rev"] not in repo.branches:
            return _error(404, "Invalid rev id", code="RevisionNotFound")
        files = json.loads(body)["files"]
        return _json(
            200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        )

    def _commit(self, params, body):
        repo = self._repo(params["repo"])
        if repo is None:
            return _error(404, _ERROR_MESSAGES[404], code="RepoNotFound")
        revision = params["rev"]
        if revision not in repo.branches:
            return _error(404, "Invalid rev id", code="RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        tree = dict(repo.branches[revision])
        paths = []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                tree[value["path"]] = base64.b64decode(value["content"])
                paths.append(value["path"])
            elif key == "lfsFile":
                return _json(400, {"error": "fake hub: LFS uploads are not supported; preupload answered 'regular'"})
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                tree = {p: d for p, d in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        oid = hashlib.sha1(f"{params['repo']}{revision}{len(self.commits)}".encode()).hexdigest()
        repo.branches[revision], repo.heads[revision] = tree, oid
        self.commits.append(
            Commit(params["repo"], revision, header["summary"], header.get("description", ""), paths, oid)
        )
        return _json(
            200,
            {"commitUrl": f"{self.endpoint}/{params['repo']}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
        )

    def _branch(self, params, body):
        repo = self._repo(params["repo"])
        if repo is None:
            return _error(404, _ERROR_MESSAGES[404], code="RepoNotFound")
        branch = params["branch"]
        if branch in repo.branches:
            return _json(409, {"error": f"Reference already exists: refs/heads/{branch}"})
        start = (json.loads(body or b"{}") or {}).get("startingPoint", "main")
        repo.branches[branch], repo.heads[branch] = dict(repo.branches[start]), repo.heads[start]
        return _json(200, {})


def _json(status: int, payload: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


def _error(status: int, message: str, code: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
    return _json(status, {"error": message}, headers)


def _handler(hub: FakeHub) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            body = self._body() if self.command == "POST" else b""
            status, headers, payload = hub.handle(self.command, urlsplit(self.path).path, self.headers, body)
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(payload))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:  # quiet: nothing of the requests reaches stderr
            pass

    return Handler


def resume_from(endpoint: str) -> None:
    """`FakeHub.resume()` from another process."""
    import urllib.request

    urllib.request.urlopen(
        urllib.request.Request(f"{endpoint}/_fake/resume", data=b"", method="POST"), timeout=10
    ).read()


def closed_port() -> str:
    """An endpoint on 127.0.0.1 where nothing listens: connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def write_adapter(path, iteration: int | None = None, *, base_model: str = "meta-llama/Llama-3.2-1B", seed: int = 0):
    """A small adapter directory as the exporter writes it (card by model_card), without torch."""
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import save_file

    from megatron_peft_export.core.peft_format import model_card

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {
        f"base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight": rng.standard_normal(shape).astype(
            np.float32
        )
        for ab, shape in (("A", (8, 16)), ("B", (16, 8)))
    }
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj"],
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    source = f"iteration {iteration}" if iteration is not None else "a live Megatron model"
    (path / "README.md").write_text(model_card(config, dialect="modelopt", source=source, num_tensors=len(tensors)))
    return path
