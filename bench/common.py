"""Shared pieces of the benchmarks: models with an adapter of a chosen size, timing, memory and page-cache probes.

Everything that builds or runs a model is called inside ranks forked by ``tests.support.multiprocess.run_ranks``
(gloo world up, CPU shims installed, one intra-op thread per rank); the parent only orchestrates.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

from tests.support.tiny_gpt import TinyGPTConfig

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ models


WIDE = TinyGPTConfig(
    num_layers=1,
    hidden_size=1024,
    ffn_hidden_size=1280,
    num_attention_heads=8,
    num_query_groups=8,
    kv_channels=128,
    vocab_size=128,
)
"""The stall and scaling benchmarks' layers: rank-256 LoRA on them is 12.3 MB of float32 per layer."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The tiny GPT of the tests (local spec, SwiGLU, float32) at `model`'s sizes, with ModelOpt LoRA of `rank` on qkv,
    proj, fc1 and fc2 of every layer."""

    model: TinyGPTConfig
    rank: int = 256
    scale: float = 2.0

    def resized(self, **model_sizes) -> Geometry:
        """The same geometry with some TinyGPTConfig fields replaced (num_layers=..., vocab_size=...)."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **model_sizes))

    @property
    def layers(self) -> int:
        return self.model.num_layers

    @property
    def adapter_bytes(self) -> int:
        """The HF adapter's float32 bytes (the fused qkv/fc1 A counted once, as Megatron holds it)."""
        m, r = self.model, self.rank
        h, f, attention = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads * m.kv_channels
        qkv_rows = attention + 2 * m.num_query_groups * m.kv_channels
        per_layer = r * h + qkv_rows * r + r * attention + h * r + r * h + 2 * f * r + r * f + h * r
        return 4 * m.num_layers * per_layer

    @property
    def base_bytes(self) -> int:
        m = self.model
        h, f, attention = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads * m.kv_channels
        qkv_rows = attention + 2 * m.num_query_groups * m.kv_channels
        per_layer = qkv_rows * h + h * attention + 2 * f * h + h * f + 2 * h
        return 4 * (m.num_layers * per_layer + 2 * m.vocab_size * h + h)


def wide(layers: int) -> Geometry:
    return Geometry(WIDE).resized(num_layers=layers)


def build_lora_model(geometry: Geometry, tp: int, *, fill: str = "uniform", seed: int = 7):
    """This rank's GPTModel at tensor-parallel size ``tp`` with ModelOpt LoRA; base weights are zeros.

    fill="uniform": every adapter parameter gets local random values (resident memory, fast);
    fill="global": layout-independent values from tiny_gpt.fill_lora_random (identical adapters across layouts and
    vocabularies).
    """
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from tests.support.tiny_gpt import apply_modelopt_lora, fill_lora_random, init_parallel, transformer_config

    init_parallel(tp)
    cfg = geometry.model
    config = transformer_config(cfg)
    # Base weights start at zero: no adapter export reads them, and megatron's CPU init (a global master weight
    # per tensor, drawn on every rank) would cost minutes at these sizes. The TP attributes are set as usual.
    config.init_method = config.output_layer_init_method = config.embedding_init_method = torch.nn.init.zeros_
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    apply_modelopt_lora(model, rank=geometry.rank, scale=geometry.scale)
    if fill == "global":
        fill_lora_random(model, seed=seed)
    else:
        generator = torch.Generator().manual_seed(seed + torch.distributed.get_rank())
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.uniform_(-0.05, 0.05, generator=generator)
    return model


def adapter_parameters(model) -> list:
    return [p for name, p in model.named_parameters() if "lora_" in name]


# ------------------------------------------------------------------------------ measuring


def return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the kernel at once (fixed mmap and trim thresholds of 1 MiB).

    With its default dynamic threshold, blocks freed by an earlier variant stay in the heap and the next one
    reuses them without raising the resident set, so peak-RSS deltas would read ~0. Call first in every worker;
    it applies to timing and memory runs alike (every variant pays the same page faults on fresh memory).
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@contextmanager
def peak_rss():
    """Peak resident memory of this process above its level at entry, in bytes (``box[0]`` after the block).

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` 5) at entry and reads VmHWM at exit, so the
    number covers every thread of the process, including the hook's background export.
    """
    Path("/proc/self/clear_refs").write_text("5")
    start = _status_kib("VmRSS")
    box = [0]
    yield box
    box[0] = max(0, _status_kib("VmHWM") - start) * 1024


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def timed_both(fn, *args, **kwargs) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of the calling thread, result): on a machine shared with other jobs the thread's
    CPU time says what the call itself cost (background threads excluded, time spent descheduled excluded)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    result = fn(*args, **kwargs)
    return time.perf_counter() - wall, time.thread_time() - cpu, result


def median(values) -> float:
    return statistics.median(values)


def rotated(items: list, rep: int) -> list:
    """The items in a different order each repetition, so no variant always runs first (or right after another)."""
    shift = rep % len(items)
    return items[shift:] + items[:shift]


def evict_page_cache(directory: Path) -> None:
    """Drop this directory's files from the page cache (fsync, then POSIX_FADV_DONTNEED), so reads go to the disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ machine


def machine() -> dict:
    """CPU model, cores and RAM from /proc, plus the versions that matter."""
    import megatron.core
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }
