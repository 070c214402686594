"""The hook's serve step after verification: an adapter whose verification failed is never offered to the server."""

import json
import logging
from types import SimpleNamespace

from megatron_peft_export.config import ServeConfig
from megatron_peft_export.delivery import RESULT_FILE, Serving
from megatron_peft_export.verify import skipped


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
