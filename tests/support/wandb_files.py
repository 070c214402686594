"""Read back what an offline W&B run wrote (test support): the records of its `.wandb` file and its media files.

The `.wandb` file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB
blocks of chunks (CRC32C 4 bytes, length 2, type 1: full/first/middle/last), each record a
serialized `wandb_internal_pb2.Record`. wandb 0.31 ships no Python reader, so this is one.
"""

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7


def _chunks(data: bytes):
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield body
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            yield pending + body
            pending = b""
        elif kind == 0 and length == 0:
            pos += (_BLOCK - pos % _BLOCK) % _BLOCK


def records(run_dir: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    return [wandb_internal_pb2.Record.FromString(chunk) for chunk in _chunks(data)]


def offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted(Path(wandb_dir).glob("**/offline-run-*"))


def history(run_dir: Path) -> list[dict]:
    """Every logged row: {key: decoded JSON value}; media (tables, histograms) as {field: value} under their key."""
    rows = []
    for record in records(run_dir):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            path = [item.key] if item.key else list(item.nested_key)
            target = row
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def artifacts(run_dir: Path) -> list[dict]:
    """Logged artifacts: name, type, aliases, metadata, file paths."""
    out = []
    for record in records(run_dir):
        if record.WhichOneof("record_type") == "artifact":
            a = record.artifact
            out.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "aliases": sorted(a.aliases),
                    "metadata": json.loads(a.metadata or "{}"),
                    "files": sorted(e.path for e in a.manifest.contents),
                }
            )
    return out


def run_info(run_dir: Path) -> dict:
    for record in records(run_dir):
        if record.WhichOneof("record_type") == "run":
            return {
                "project": record.run.project,
                "name": record.run.display_name,
                "group": record.run.run_group,
                "id": record.run.run_id,
            }
    return {}


def table(run_dir: Path, relative_path: str) -> dict:
    """A logged wandb.Table, from the run's media files."""
    return json.loads((Path(run_dir) / "files" / relative_path).read_text())
