"""Push uploads only regular files inside the adapter directory: a symbolic link (to the stored Hub token, or a linked
folder), a FIFO or a device is refused with a message naming it, before any request reaches the Hub (fake Hub)."""

import os

import huggingface_hub.constants
import pytest

from megatron_peft_export.cli import main
from megatron_peft_export.services.hub import Adapter, PushConfig, PushError, push_adapters, uploadable
from tests.support.fake_hub import write_adapter

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def stored_token(token, tmp_path, monkeypatch):
    """The token as `hf auth login` stores it, in a file of its own."""
    path = tmp_path / "hf-home" / "token"
    path.parent.mkdir()
    path.write_text(token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(path))
    return path


def _push(adapter, hub, *extra):
    return main(["push", str(adapter), "--repo-id", "me/run", "--endpoint", hub.endpoint, "--retries", "0", *extra])


def _uploaded(hub) -> dict:
    return {path: data for r in hub.repos.values() for files in r.branches.values() for path, data in files.items()}


BAD_ENTRIES = {  # name: (how to make it inside the adapter directory, what the one error line says)
    "a link to the stored token": (lambda a, token: (a / "token").symlink_to(token), "token is a symbolic link to "),
    "the weights as a link to the token": (
        lambda a, token: (a / "extra.json").symlink_to(token),
        "extra.json is a symbolic link",
    ),
    "a relative link inside": (
        lambda a, token: (a / "copy.safetensors").symlink_to("adapter_model.safetensors"),
        "copy.safetensors is a symbolic link",
    ),
    "a linked folder": (
        lambda a, token: (a / "hf-home").symlink_to(token.parent, target_is_directory=True),
        "hf-home is a symbolic link",
    ),
    "a FIFO": (lambda a, token: os.mkfifo(a / "notes"), "notes is a FIFO"),
    "a FIFO as the config": (
        lambda a, token: ((a / "adapter_config.json").unlink(), os.mkfifo(a / "adapter_config.json")),
        "adapter_config.json is a FIFO",
    ),
    "a socket": (lambda a, token: _socket(a / "sock"), "sock is a socket"),
    "a link in a multi-adapter subfolder": (
        lambda a, token: (write_adapter(a / "math"), (a / "math" / "token").symlink_to(token)),
        "math/token is a symbolic link",
    ),
}


def _socket(path):
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_push_refuses_anything_but_regular_files_before_any_request(hub, stored_token, tmp_path, capsys, case):
    adapter = write_adapter(tmp_path / "iter_0000003" / "hf_adapter", 3)
    make, fragment = BAD_ENTRIES[case]
    make(adapter, stored_token)
    assert _push(adapter, hub) == 2, "the CLI"
    err = capsys.readouterr().err
    assert err.startswith(f"error: {adapter}/") and err.count("\n") == 1 and fragment in err, err
    assert "push uploads only regular files inside the adapter directory" in err and "Nothing was uploaded" in err
    assert _push(tmp_path, hub) == 2, "a save directory: its latest adapter"
    with pytest.raises(PushError, match=fragment):  # the library, as the training hook's pusher calls it
        push_adapters(PushConfig(repo_id="me/run", endpoint=hub.endpoint, retries=0), Adapter(adapter, 3))
    assert hub.requests == [] and hub.commits == [], "nothing reaches the Hub"
    assert not any(stored_token.read_bytes() in data for data in _uploaded(hub).values())


def test_hidden_entries_and_working_folders_are_not_uploaded_even_as_links(hub, stored_token, tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    (adapter / ".token").symlink_to(stored_token)
    (adapter / "verification").mkdir()
    (adapter / "verification" / "token").symlink_to(stored_token)
    assert sorted(name for name, _ in uploadable(adapter)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert _push(adapter, hub) == 0
    assert sorted(_uploaded(hub)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert not any(stored_token.read_bytes() in data for data in _uploaded(hub).values())


def test_a_link_named_as_the_adapter_directory_is_followed_since_the_user_named_it(hub, tmp_path):
    adapter = write_adapter(tmp_path / "real")
    (tmp_path / "alias").symlink_to(adapter)
    assert _push(tmp_path / "alias", hub) == 0
    assert _uploaded(hub)["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "endpoint", ["https://me:hf_secretvalue@hub.example", "ftp://hub.example", "hub.example", "https://"]
)
def test_an_endpoint_that_is_no_plain_http_url_is_refused_before_any_request(tmp_path, capsys, endpoint):
    """Credentials in the endpoint would ride along in every log line and error; the token goes in HF_TOKEN."""
    adapter = write_adapter(tmp_path / "adapter")
    assert main(["push", str(adapter), "--repo-id", "me/run", "--endpoint", endpoint, "--retries", "0"]) == 2
    err = capsys.readouterr().err
    assert "endpoint" in err and "http(s)://host" in err and "hf_secretvalue" not in err
    assert len(err.strip().splitlines()) == 1
