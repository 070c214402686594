"""All the collectives of an export, in one place. Process groups are passed in; nothing reads global state.

Export traffic runs on a gloo group (CPU tensors), apart from the NCCL groups of training, so an
export never allocates on the GPU beyond the shard being copied off it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .errors import ExportError

_GLOO_GROUPS: dict[tuple[int, ...], Any] = {}


@dataclass(frozen=True)
class RankLayout:
    """This rank's place in the parallel layout, as the export needs it."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    is_data_parallel_source: bool
    """True on the one data-parallel (and context-parallel) replica whose shards are exported."""

    @classmethod
    def from_megatron(cls) -> "RankLayout":
        from megatron.core import parallel_state as ps

        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            is_data_parallel_source=ps.get_data_parallel_rank(with_context_parallel=True) == 0,
        )


def export_group() -> Any:
    """The default group when it is gloo; otherwise one gloo group over all ranks, made once (collectively)."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    key = tuple(range(dist.get_world_size()))
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = dist.new_group(backend="gloo")
    return _GLOO_GROUPS[key]


def all_gather(obj: Any, group: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _as_export_error(exc: BaseException) -> ExportError:
    return exc if isinstance(exc, ExportError) else ExportError(f"{type(exc).__name__}: {exc}")


def agree(error: ExportError | None, group: Any) -> None:
    """Raise the same error on every rank if any rank reports one (no rank is left in a collective)."""
    errors = [(rank, e) for rank, e in enumerate(all_gather(error, group)) if e is not None]
    if errors:
        rank, first = errors[0]
        more = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
        raise type(first)(f"rank {rank}: {first}{more}")


def broadcast_outcome(run: Callable[[], Any], src: int, group: Any) -> Any:
    """Run `run` on `src` only and make every rank raise if it failed; returns its result on `src`."""
    result, failure = None, None
    if dist.get_rank() == src:
        try:
            result = run()
        except Exception as exc:  # any failure must reach the other ranks, or they wait forever
            failure = exc
    box = [None if failure is None else _as_export_error(failure)]
    dist.broadcast_object_list(box, src=src, group=group)
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise box[0]
    return result


def send(tensor: torch.Tensor, dst: int, group: Any) -> None:
    """Copy one tensor off the device and send it; the sender holds at most this one copy in flight."""
    dist.send(tensor.detach().to("cpu").contiguous(), dst=dst, group=group)


def receive(shape: tuple[int, ...], dtype: torch.dtype, src: int, group: Any) -> torch.Tensor:
    buffer = torch.empty(shape, dtype=dtype)
    dist.recv(buffer, src=src, group=group)
    return buffer
