"""All the collectives of an export, in one place. Process groups are passed in; nothing reads global state.

Export traffic runs on a gloo group (CPU tensors), apart from the NCCL groups of training, so an
export never allocates on the GPU beyond the shard being copied off it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from itertools import accumulate, groupby, islice
from operator import attrgetter, itemgetter
from typing import Any

import torch
import torch.distributed as dist

from .errors import CollectiveError, ExportError

log = logging.getLogger("megatron_peft_export")
_GLOO_GROUPS: dict[tuple[tuple[int, ...], float | None], Any] = {}
_TIMEOUTS: dict[int, float] = {}
"""id(group) -> the timeout (seconds) it was made with, for error messages."""


@dataclass(frozen=True)
class RankLayout:
    """This rank's place in the parallel layout, as the export needs it."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    is_data_parallel_source: bool
    """True on the one data-parallel (and context-parallel) replica whose shards are exported."""
    is_expert_data_parallel_source: bool = True
    """The same for expert weights, replicated over the expert data-parallel group instead."""

    @classmethod
    def from_megatron(cls) -> RankLayout:
        from megatron.core import parallel_state as ps

        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            is_data_parallel_source=ps.get_data_parallel_rank(with_context_parallel=True) == 0,
            is_expert_data_parallel_source=ps.get_expert_data_parallel_rank() == 0,
        )


def new_gloo_group(timeout: float | None) -> Any:
    """A gloo group over all ranks (collective) whose every operation fails after `timeout` seconds without an
    answer."""
    group = dist.new_group(backend="gloo", timeout=None if timeout is None else timedelta(seconds=timeout))
    if timeout is not None:
        _TIMEOUTS[id(group)] = timeout
    return group


def export_group(timeout: float | None = None) -> Any:
    """The default group when it is gloo; otherwise one gloo group over all ranks (with `timeout`), made once
    (collectively)."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    key = (tuple(range(dist.get_world_size())), timeout)
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = new_gloo_group(timeout)
    return _GLOO_GROUPS[key]


@contextlib.contextmanager
def _collective(group: Any, what: str) -> Iterator[None]:
    """A failed collective (a peer died: connection reset; or a timeout) becomes a CollectiveError saying so."""
    try:
        yield
    except RuntimeError as exc:  # gloo's errors (DistBackendError is one)
        timeout = _TIMEOUTS.get(id(group))
        within = (
            f"within the group's timeout of {timeout:g} s"
            if timeout is not None
            else "within the process group's timeout"
        )
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CollectiveError(
            f"rank {dist.get_rank()} lost contact with another rank while {what} (a rank died, or did not answer "
            f"{within}): {detail}"
        ) from exc


def close_group(group: Any) -> None:
    """After a CollectiveError on a group of our own: close this rank's connections of it, so the ranks still
    waiting on it fail now (connection closed) rather than after their timeout. The group is unusable after."""
    try:
        dist.destroy_process_group(group)
    except Exception as exc:  # already gone, or a torch without per-group destroy: the timeout still bounds the others
        log.debug("closing the failed export group: %s", exc)
    _TIMEOUTS.pop(id(group), None)
    _HELD.pop(id(group), None)


def all_gather(obj: Any, group: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    with _collective(group, "exchanging export metadata"):
        dist.all_gather_object(out, obj, group=group)
    return out


def gather(obj: Any, dst: int, group: Any) -> list[Any] | None:
    """Every rank's `obj` on rank `dst` (in rank order); None on the other ranks, which unpickle nothing. `dst`'s own
    `obj` is not pickled: its place holds `obj` itself (not a copy)."""
    mine = dist.get_rank() == dst
    out: list[Any] | None = [None] * dist.get_world_size(group) if mine else None
    with _collective(group, "exchanging export metadata"):
        dist.gather_object(None if mine else obj, out, dst=dst, group=group)
    if out is not None:
        out[dist.get_rank(group)] = obj
    return out


_HELD: dict[int, tuple[Any, OrderedDict]] = {}
"""id(group) -> (the group, {(sending rank, key): object}): what `gather_held` received, on the receiving rank."""
HELD_KEPT = 16
"""Objects `gather_held` keeps per group (the oldest goes first)."""


def gather_held(obj: Any, key: Hashable | None, dst: int, group: Any) -> list[Any] | None:
    """`gather`, but a rank whose `key` (not None) names an object `dst` received from it before sends the key alone:
    `dst` answers which ranks' objects it lacks, and only those are sent (three collectives, two of them tiny). For
    large objects that are often the same (a rank's report of the walk it has cached): a key must name one object
    for as long as its rank lives (its group's ranks are fixed processes)."""
    keys = gather(key, dst, group)
    held = None
    if keys is not None:
        entry = _HELD.get(id(group))
        if entry is None or entry[0] is not group:  # a group made after another with its id
            entry = _HELD[id(group)] = (group, OrderedDict())
        held = entry[1]
        me = dist.get_rank(group)
        lacking = [rank for rank, k in enumerate(keys) if rank != me and (k is None or (rank, k) not in held)]
    box = [lacking if held is not None else None]
    with _collective(group, "exchanging export metadata"):
        dist.broadcast_object_list(box, src=dst, group=group)
    lacking = box[0]
    sent = gather(obj if dist.get_rank(group) in lacking else None, dst, group) if lacking else None
    if held is None:
        return None
    out = []
    for rank, k in enumerate(keys):
        if rank == dist.get_rank(group):
            out.append(obj)
        elif rank in lacking:
            out.append(sent[rank])
            if k is not None:
                held[(rank, k)] = sent[rank]
                while len(held) > HELD_KEPT:
                    held.popitem(last=False)
        else:
            held.move_to_end((rank, k))
            out.append(held[(rank, k)])
    return out


def _as_export_error(exc: BaseException) -> ExportError:
    return exc if isinstance(exc, ExportError) else ExportError(f"{type(exc).__name__}: {exc}")


def agree(error: Exception | None, group: Any) -> None:
    """Raise the same error on every rank if any rank reports one (no rank is left in a collective)."""
    error = None if error is None else _as_export_error(error)
    errors = [(rank, e) for rank, e in enumerate(all_gather(error, group)) if e is not None]
    if errors:
        rank, first = errors[0]
        more = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
        error = type(first)(f"rank {rank}: {first}{more}")
        error.__dict__.update(vars(first))  # the data fields (expected, found, ...) travel with the type
        raise error


def broadcast_outcome(run: Callable[[], Any], src: int, group: Any) -> Any:
    """Run `run` on `src` only and make every rank raise if it failed; returns its result on `src`."""
    result, failure = None, None
    if dist.get_rank() == src:
        try:
            result = run()
        except Exception as exc:  # any failure must reach the other ranks, or they wait forever
            failure = exc
    box = [None if failure is None else _as_export_error(failure)]
    try:
        with _collective(group, f"waiting for rank {src}'s outcome"):
            dist.broadcast_object_list(box, src=src, group=group)
    except CollectiveError as exc:
        if dist.get_rank() != src or failure is not None:
            raise failure if failure is not None else exc  # noqa: B904 (the original error, or the caught one itself)
        log.warning("%s; rank %d's own step succeeded, the other ranks may not know it", exc, src)
        return result
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise box[0]
    return result


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def send(tensor: torch.Tensor, dst: int, group: Any) -> ExportError | None:
    """Copy one tensor off the device and send it; the sender holds at most this one copy in flight.

    A failure to copy is returned, not raised: zeros of the same shape go instead, so the receiver is
    not left waiting and the ranks can agree on the failure afterwards. A failed send raises CollectiveError.
    """
    failure = None
    try:
        data = host_copy(tensor)
    except Exception as exc:  # e.g. a device error: report it after the data phase, on every rank
        failure, data = _as_export_error(exc), torch.zeros(tuple(tensor.shape), dtype=tensor.dtype)
    with _collective(group, f"sending adapter shards to rank {dst}"):
        dist.send(data, dst=dst, group=group)
    return failure


def receive(shape: tuple[int, ...], dtype: torch.dtype, src: int, group: Any) -> torch.Tensor:
    buffer = torch.empty(shape, dtype=dtype)
    with _collective(group, f"receiving adapter shards from rank {src}"):
        dist.recv(buffer, src=src, group=group)
    return buffer


BUCKET_BYTES = 64 << 20
"""Most bytes one transfer carries (a larger tensor goes alone): shards move in few messages, not one per tensor."""


def buckets(items: list[tuple[tuple[int, ...], str]], max_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Consecutive indices of (shape, dtype) items grouped into transfers: one dtype each, at most `max_bytes` unless
    one item alone is larger. Sender and receiver compute it from the same specs, so they agree without a message.

    Each run of one dtype is cut where its running byte count passes `max_bytes` past the last cut (bisected on the
    running sums: no Python step per item, a sender lists 10^5 shards at every export)."""
    out: list[list[int]] = []
    start = 0
    for name, run in groupby(map(itemgetter(1), items)):
        count = sum(1 for _ in run)
        element = torch.empty((), dtype=getattr(torch, name)).element_size()
        ends = list(accumulate(map(math.prod, map(itemgetter(0), islice(items, start, start + count)))))
        first, base = 0, 0
        while first < count:
            last = max(bisect_right(ends, base + max_bytes // element, first), first + 1)  # one item at least
            out.append(list(range(start + first, start + last)))
            first, base = last, ends[last - 1]
        start += count
    return out


_IS_CPU = attrgetter("is_cpu")


def _flat_on_host(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors already in host memory, concatenated into one flat buffer by one C++ call (no Python step per
    tensor)."""
    with torch.no_grad():
        return torch._C._nn.flatten_dense_tensors(tensors)


def send_bucket(tensors: list[torch.Tensor], dst: int, group: Any) -> ExportError | None:
    """Copy tensors of one dtype off the device into one flat buffer and send it in one message (see `send`: a tensor
    that fails to copy goes as zeros, and the failure is returned)."""
    if len(tensors) == 1:
        return send(tensors[0], dst, group)
    failure, flat = None, None
    if all(map(_IS_CPU, tensors)):
        try:
            flat = _flat_on_host(tensors)
        except Exception as exc:  # reported after the data phase, on every rank; the copy below zeroes what fails
            failure = _as_export_error(exc)
    if flat is None:  # one tensor off the device at a time, into its place in the flat buffer
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype)
        start = 0
        for t in tensors:
            part = flat[start : start + t.numel()].view(t.shape)
            try:
                part.copy_(host_copy(t))
            except Exception as exc:  # e.g. a device error: report it after the data phase, on every rank
                failure = failure or _as_export_error(exc)
                part.zero_()
            start += t.numel()
    with _collective(group, f"sending adapter shards to rank {dst}"):
        dist.send(flat, dst=dst, group=group)
    return failure


def receive_flat(shapes: list[tuple[int, ...]], dtype: torch.dtype, src: int, group: Any) -> torch.Tensor:
    """What `send_bucket` sent, as the one flat buffer it was sent as (the tensors back to back)."""
    return receive((sum(map(math.prod, shapes)),), dtype, src, group)


def split_flat(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """`receive_flat`'s buffer as views of the given shapes."""
    if len(shapes) == 1:
        return [flat.view(shapes[0])]
    return [part.view(shape) for part, shape in zip(flat.split(list(map(math.prod, shapes))), shapes)]
