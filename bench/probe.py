"""What the machine does on its own, measured at the start of each run: disk and memory rates that bound every
result."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.support.multiprocess import run_alone

from .common import evict_page_cache


def _memory(nbytes: int) -> dict:
    import torch

    torch.set_num_threads(1)
    source = torch.ones(nbytes // 4)
    started = time.perf_counter()
    fresh = source.clone()  # fresh pages: includes the kernel's first-touch cost
    first_touch = time.perf_counter() - started
    started = time.perf_counter()
    fresh.copy_(source)  # the same pages again
    warm = time.perf_counter() - started
    return {
        "host_copy_fresh_gb_s": round(nbytes / first_touch / 1e9, 2),
        "host_copy_warm_gb_s": round(nbytes / warm / 1e9, 2),
    }


def run(scratch: Path, *, small: bool) -> dict:
    nbytes = (256 if small else 1024) << 20
    path = scratch / "probe.bin"
    block = os.urandom(16 << 20)
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - started
    evict_page_cache(scratch)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    read = time.perf_counter() - started
    path.unlink()
    return {
        "disk_write_fsync_gb_s": round(nbytes / write / 1e9, 2),
        "disk_read_cold_gb_s": round(nbytes / read / 1e9, 2),
        **run_alone(_memory, nbytes, timeout=3600),
    }
