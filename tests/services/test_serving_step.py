"""The hook's serve step after verification: an adapter whose verification failed is never offered to the server."""

import json
import logging
import threading
import time
from types import SimpleNamespace

from megatron_peft_export.config import ServeConfig
from megatron_peft_export.services.delivery import RESULT_FILE, Deliverer, Serving
from megatron_peft_export.services.verify import skipped


class _Recorder:
    def __init__(self):
        self.submitted = []

    def submit(self, path, iteration):
        self.submitted.append((path, iteration))


def test_a_failed_verification_is_recorded_and_not_delivered(tmp_path, caplog):
    failed, fine, unverified = (tmp_path / n for n in ("failed", "fine", "unverified"))
    for d in (failed, fine, unverified):
        d.mkdir()
    verification = SimpleNamespace(
        results=[
            skipped(failed, "logits differ by 0.7", failed=True, iteration=1),
            skipped(fine, "no base model available locally", failed=False, iteration=2),
        ]
    )
    serving = Serving(ServeConfig(url="http://127.0.0.1:9"), verification)
    serving.deliverer = _Recorder()  # what would reach the server; no server here
    with caplog.at_level(logging.WARNING, "megatron_peft_export"):
        for iteration, path in enumerate((failed, fine, unverified), start=1):
            serving.after_publish(iteration, path)
    assert serving.deliverer.submitted == [(fine, 2), (unverified, 3)]  # skipped verification is no failure
    record = json.loads((failed / RESULT_FILE).read_text())
    assert record["status"] == "skipped" and "logits differ by 0.7" in record["message"] and record["names"] == []
    assert not (fine / RESULT_FILE).exists()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


class _SlowServer:
    """Answers /version only when released: the first delivery stays in flight while newer adapters arrive."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def version(self):
        self.calls += 1
        assert self.release.wait(30)
        return "0.32.0"

    def lora_limits(self):
        return {}


def test_while_a_delivery_is_in_flight_only_the_newest_waiting_adapter_follows(tmp_path):
    server = _SlowServer()
    deliverer = Deliverer(ServeConfig(url="http://127.0.0.1:9"), server)
    paths = [tmp_path / f"iter_{i}" for i in range(4)]
    for p in paths:
        p.mkdir()
    deliverer.submit(paths[0], 0)
    for _ in range(300):  # until the first is in flight (its /version asked)
        if server.calls:
            break
        time.sleep(0.01)
    for i in (1, 2, 3):
        deliverer.submit(paths[i], i)  # never blocks on the server
    server.release.set()
    assert deliverer.wait(timeout=30)
    deliverer.close(timeout=5)
    # the first, then only the newest of those that waited (none of these directories is an adapter: refused)
    assert [r.adapter for r in deliverer.results] == [str(paths[0].absolute()), str(paths[3].absolute())]
    assert all(r.status == "refused" for r in deliverer.results)
