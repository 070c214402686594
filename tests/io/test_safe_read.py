"""safe_read: regular files only, inside the directory being read, sizes from the opened file, bounded reads."""

import os

import pytest

from megatron_peft_export.errors import ExportError
from megatron_peft_export.io.safe_read import open_regular, read_bytes, read_json, read_text, read_yaml


def test_a_regular_file_and_links_inside_the_directory_are_read(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link.json").symlink_to(tmp_path / "a.json")
    assert read_json(tmp_path / "a.json", within=tmp_path) == {"x": 1}
    assert read_json(tmp_path / "sub" / "link.json", within=tmp_path) == {"x": 1}
    with open_regular(tmp_path / "a.json", within=tmp_path) as f:
        assert f.size == 8 and f.read(2, 3) == b'x":'
        with pytest.raises(ExportError, match=r"a read claims bytes 6 to 10, but the file has 8 bytes"):
            f.read(6, 4)


def test_the_hugging_face_caches_links_into_blobs_are_read(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text('{"r": 8}')
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "adapter_config.json").symlink_to("../../blobs/abc123")
    assert read_json(snapshot / "adapter_config.json", within=snapshot) == {"r": 8}


def test_a_link_leaving_the_directory_is_refused(tmp_path):
    (tmp_path / "token").write_text("hf_secret")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").symlink_to(tmp_path / "token")
    with pytest.raises(
        ExportError,
        match=r"adapter_config.json: a symbolic link to .*/token, outside .*adapter; expected a text file inside "
        r"the directory being read",
    ):
        read_text(tmp_path / "adapter" / "adapter_config.json", limit=100, within=tmp_path / "adapter")
    assert read_text(tmp_path / "adapter" / "adapter_config.json", limit=100) == "hf_secret", (
        "without `within`, links are followed"
    )


@pytest.mark.parametrize(
    "special,kind", [("fifo", "a FIFO"), ("/dev/zero", "a character device"), ("dir", "a directory")]
)
def test_anything_but_a_regular_file_is_refused_without_blocking(tmp_path, special, kind):
    path = tmp_path / "config.json"
    if special == "fifo":
        os.mkfifo(path)
    elif special == "dir":
        path.mkdir()
    else:
        path.symlink_to(special)
    with pytest.raises(ExportError, match=f"config.json: expected a JSON document, found {kind}"):
        read_json(path)


def test_sizes_are_checked_before_reading_and_documents_parsed_strictly(tmp_path):
    (tmp_path / "big.json").write_text("[" + "0," * 1000 + "0]")
    with pytest.raises(ExportError, match=r"big.json: 2003 bytes; expected a JSON document of at most 1000 bytes"):
        read_json(tmp_path / "big.json", limit=1000)
    assert len(read_bytes(tmp_path / "big.json", limit=2003)) == 2003
    (tmp_path / "nan.json").write_text('{"a": NaN}')
    with pytest.raises(ExportError, match="NaN is not valid JSON"):
        read_json(tmp_path / "nan.json")
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ExportError, match="nested too deeply"):
        read_json(tmp_path / "deep.json")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(ExportError, match="not readable YAML"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "latin1.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ExportError, match="not UTF-8 text"):
        read_text(tmp_path / "latin1.txt", limit=10)
    with pytest.raises(ExportError, match="missing.json: missing; expected a JSON document"):
        read_json(tmp_path / "missing.json")
