"""A hostile or broken vLLM server, and secrets around delivery: local http.server stand-ins (no network beyond
localhost; a real vLLM server cannot be made to misbehave, so these stand in for one answering badly).

Each attack must end in bounded time with one DeliveryError-worded record (`serving.json`), never a raw exception,
and the API key (and credentials in the URL) must reach no other host, no file and no log line."""

from __future__ import annotations

import http.server
import json
import logging
import secrets
import threading
import time
from pathlib import Path

import pytest

from megatron_peft_export.errors import OptionError
from megatron_peft_export.services.delivery import RESULT_FILE, ServeConfig, VllmServer, deliver

pytestmark = pytest.mark.timeout(60)

KEY_ENV = "MPE_TEST_HOSTILE_KEY"


class _Server:
    """A local HTTP server whose every GET/POST is answered by `answer(handler)`; it records the requests' headers."""

    def __init__(self, answer):
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                seen.append((self.command, self.path, dict(self.headers)))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                try:
                    answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(handler, status: int, body: bytes, headers: dict | None = None) -> None:
    handler.send_response(status)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _config(url: str, **kw) -> ServeConfig:
    return ServeConfig(url=url, api_key_env=KEY_ENV, retries=1, backoff=0.0, **kw)


def _adapter(tmp_path: Path, iteration: int = 1) -> Path:
    path = tmp_path / f"iter_{iteration:07d}" / "hf_adapter"
    path.mkdir(parents=True)
    return path


def test_a_redirect_to_another_host_gets_neither_the_key_nor_any_request(tmp_path, monkeypatch):
    key = "sk-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, key)
    with _Server(lambda h: _send(h, 200, b'{"version": "0.11.0"}')) as other:
        target = other.url + "/version"
        with _Server(lambda h: _send(h, 302, b"", {"Location": target})) as server:
            record = deliver(_adapter(tmp_path), 1, _config(server.url))
            assert any(h.get("Authorization") == f"Bearer {key}" for _, _, h in server.seen), "the key was sent"
    assert other.seen == [], "the redirect was followed (and the API key went with it)"
    assert record.status == "refused" and "redirect" in record.message and target in record.message, record


def _drip_body(h):  # announces a large body, then one byte every 0.1 s: each read succeeds within the timeout
    h.send_response(200)
    h.send_header("Content-Length", str(1 << 20))
    h.end_headers()
    for _ in range(600):
        h.wfile.write(b" ")
        h.wfile.flush()
        time.sleep(0.1)


def _drip_headers(h):  # the status line, then one header byte every 0.1 s
    h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(600):
        h.wfile.write(b"a")
        h.wfile.flush()
        time.sleep(0.1)


@pytest.mark.parametrize(
    "drip, words", [(_drip_body, "did not answer"), (_drip_headers, "no whole answer within serve.timeout")]
)
def test_a_slow_drip_ends_within_the_timeout(tmp_path, drip, words):
    """The drip lasts 60 s and each of its reads succeeds within the 1 s socket timeout: a request bounded per read,
    not in all, takes the whole drip (the bound below is half of it: a loaded machine's delays, not a benchmark)."""
    with _Server(drip) as server:
        start = time.monotonic()
        record = deliver(_adapter(tmp_path), 1, _config(server.url, timeout=1.0))
        took = time.monotonic() - start
    assert took < 30.0, f"a 1.0 s timeout took {took:.1f} s"
    assert record.status == "refused" and words in record.message, record


def test_a_never_ending_or_huge_body_is_read_only_up_to_the_limit(tmp_path):
    def endless(h):
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"x" * 65536
        for _ in range(10_000):  # 640 MB, unless the reader stops
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    with _Server(endless) as server:
        record = deliver(_adapter(tmp_path), 1, _config(server.url, timeout=5.0))
    assert record.status == "refused" and "without a version" in record.message, record


@pytest.mark.parametrize(
    "body",
    [b"[" * 200_000, b'{"version": "0.11.0", "x": ' + b"[" * 200_000, b"\xff\xfe not json", b"null", b'{"version": 7}'],
    ids=["deep-json", "deep-after-version", "bytes", "null", "int-version"],
)
def test_malformed_json_is_one_refusal_never_a_raw_exception(tmp_path, body):
    with _Server(lambda h: _send(h, 200, body)) as server:
        record = deliver(_adapter(tmp_path), 1, _config(server.url))
    assert record.status == "refused" and "without a version" in record.message, record
    assert json.loads((tmp_path / "iter_0000001" / "hf_adapter" / RESULT_FILE).read_text())["status"] == "refused"


@pytest.mark.parametrize(
    "models",
    [
        b'{"data": [{"parent": "base"}]}',
        b'{"data": [{"id": ["x"], "parent": "base"}]}',
        b'{"data": [{"id": 7, "parent": "base"}]}',
        b'{"data": 7}',
        b'{"data": ' + b"[" * 200_000,
    ],
    ids=["no-id", "list-id", "int-id", "int-data", "deep"],
)
def test_a_malformed_model_list_is_read_as_no_models(models):
    with _Server(lambda h: _send(h, 200, models)) as server:
        assert VllmServer(_config(server.url)).loaded() == {}


def test_a_wrong_status_on_load_is_one_failure_with_the_servers_message(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-" + secrets.token_hex(16))
    with _Server(lambda h: _send(h, 418, b'{"error": {"message": "' + b"[" * 100_000 + b'"}}')) as server:
        server_ = VllmServer(_config(server.url))
        with pytest.raises(Exception) as caught:
            server_.load("a", Path("/nowhere"))
    assert type(caught.value).__name__ == "DeliveryError" and "HTTP 418" in str(caught.value)
    assert len(str(caught.value)) < 600


def test_the_api_key_a_server_echoes_and_url_credentials_reach_no_file_and_no_log(tmp_path, monkeypatch, caplog):
    key, password = "sk-" + secrets.token_hex(16), "pw" + secrets.token_hex(12)
    monkeypatch.setenv(KEY_ENV, key)

    def echo(h):  # a misconfigured proxy that echoes the Authorization header, and a URL with credentials
        _send(
            h, 200, json.dumps({"version": h.headers["Authorization"] + f" via https://me:{password}@proxy"}).encode()
        )

    with _Server(echo) as server, caplog.at_level(logging.DEBUG):
        record = deliver(_adapter(tmp_path), 1, _config(server.url))
        logging.getLogger("megatron_peft_export").warning("pushing to %s", f"https://me:{password}@hub.example/x")
    written = (tmp_path / "iter_0000001" / "hf_adapter" / RESULT_FILE).read_text()
    assert record.status == "refused", record
    for what, value in (("the API key", key), ("the URL's password", password)):
        leaks = [w for w, text in (("serving.json", written), ("logs", caplog.text)) if value in text]
        leaks += ["the record"] if value in json.dumps(record.to_json()) else []
        assert leaks == [], f"{what} leaked into {leaks}"
    assert "Bearer ***" in written and "https://***@proxy" in written, "the checks saw the masked values"
    assert "https://***@hub.example/x" in caplog.text


@pytest.mark.parametrize("url", ["http://user:{}@127.0.0.1:8000", "ftp://user:{}@host", "http://{}@host:1/"])
def test_a_server_url_with_credentials_is_refused_without_echoing_them(url):
    password = "pw" + secrets.token_hex(12)
    with pytest.raises(OptionError) as caught:
        ServeConfig(url=url.format(password))
    message = str(caught.value)
    assert password not in message and message.startswith("serve.url: expected") and "***@" in message, message
