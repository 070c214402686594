"""Download the pinned Megatron-Bridge wheels and unpack their `megatron/bridge/` tree for tests/support/real_bridge.py.

    python -m tests.support.fetch_bridge        # .ci/run does this; nothing to do when already unpacked

The wheels declare Python >= 3.12, so pip is asked for a 3.12 wheel without installing it or its dependencies;
the file's sha256 must be the pinned one. Each version is unpacked into a temporary directory next to its
destination and renamed into place, so an interrupted fetch leaves nothing half-unpacked.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .real_bridge import WHEELS, root


def fetch(version: str) -> Path:
    target = root(version)
    if (target / "megatron" / "bridge").is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{version}.") as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--python-version",
                "3.12",
                "--only-binary=:all:",
                f"megatron-bridge=={version}",
                "--dest",
                tmp,
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob(f"megatron_bridge-{version}-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEELS[version]:
            raise SystemExit(f"error: {wheel.name} has sha256 {digest}, expected {WHEELS[version]}; not unpacked")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as archive:  # extract() keeps every member inside `unpacked`
            for member in archive.namelist():
                if member.startswith("megatron/bridge/"):
                    archive.extract(member, unpacked)
        os.replace(unpacked, target)
    return target


def main() -> None:
    for version in WHEELS:
        print(f"Megatron-Bridge {version}: {fetch(version)}")


if __name__ == "__main__":
    main()
