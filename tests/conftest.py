"""Import the heavy libraries once in the pytest parent so forked ranks start in a fraction of a second.

No torch compute happens here: forking after torch's thread pools started can hang the children.
Also the fake-Hub fixtures shared by the push tests, and the real-Bridge guard.
"""

import os
import secrets

import huggingface_hub.constants
import megatron.core  # noqa: F401
import megatron.core.models.gpt  # noqa: F401
import megatron.core.pipeline_parallel  # noqa: F401
import modelopt.torch.peft  # noqa: F401
import peft  # noqa: F401
import pytest
import transformers  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401

import megatron_peft_export  # noqa: F401
import tests.support.tiny_gpt  # noqa: F401
import tests.support.tiny_moe  # noqa: F401
from tests.support.fake_hub import FakeHub


@pytest.fixture
def real_bridge():
    """Megatron-Bridge's own code (tests/support/real_bridge.py): skips with the reason when it is not unpacked, fails
    when CI=true."""
    from tests.support import real_bridge

    reason = real_bridge.missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)


@pytest.fixture
def token(monkeypatch, tmp_path):
    """A fresh HF_TOKEN (inherited by forked ranks), with no stored login and the Hub not offline."""
    value = "hf_" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-login"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return value


@pytest.fixture
def hub(token, monkeypatch):
    """A fake Hub on 127.0.0.1 accepting `token`."""
    with FakeHub(token) as server:
        # huggingface_hub's own requests to its default endpoint (it fetches a registry of AI agents for the
        # user-agent header) go to the fake too, so no request leaves 127.0.0.1
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.endpoint)
        yield server


def pytest_collection_modifyitems(config, items):
    """A `family` marker (docs/families.md is generated from them) must name a family, a path and a check kind the
    table knows; a wrong one fails the collection instead of silently dropping a row."""
    from tests.support.families_table import CHECKS, PATHS

    for item in items:
        for mark in item.iter_markers("family"):
            name = mark.args[0] if mark.args else mark.kwargs.get("name")
            path, check = mark.kwargs.get("path"), mark.kwargs.get("check")
            if not name or path not in PATHS or check not in CHECKS:
                raise pytest.UsageError(
                    f"{item.nodeid}: family marker {mark.args} {mark.kwargs}: expected a family name, path in {PATHS} "
                    f"and check in {CHECKS}"
                )
