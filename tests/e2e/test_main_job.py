"""The main job (the README's first command runs examples/train_tiny_gpt.py): it trains with verification on,
every adapter carries its reference and a passed verification.json, and the run prints one line per checkpoint."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).parents[2]


def test_the_main_job_verifies_every_adapter_and_prints_one_line_per_checkpoint(tmp_path):
    save = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_tiny_gpt.py"),
            "--save",
            str(save),
            "--steps",
            "20",
            "--save-interval",
            "10",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = re.findall(
        r"^  (iter_\d{7}): verification (\w+): max \|diff\| (\S+) against the training model's logits$",
        done.stdout,
        re.M,
    )
    assert [(name, verdict) for name, verdict, _ in lines] == [
        ("iter_0000010", "passed"),
        ("iter_0000020", "passed"),
    ], done.stdout
    for name, _, printed in lines:
        adapter = save / name / "hf_adapter"
        result = json.loads((adapter / "verification.json").read_text())
        assert result["passed"] is True and result["iteration"] == int(name.removeprefix("iter_"))
        assert float(printed) == pytest.approx(result["max_abs_diff"], rel=0.06) and result["max_abs_diff"] <= 1e-5
        assert result["adapter_effect_max"] > 0.1, "the check needs an adapter that moves the logits"
        assert (adapter / "verification" / "reference.safetensors").is_file()
    assert "matches the Megatron logits" in done.stdout
