"""Adapter dialects: how each LoRA implementation names and shards its tensors on a live model.

A dialect looks at one module and, if that module carries its adapter, yields the adapter's
tensors with their role. Sharding comes from megatron's own parameter attributes
(`tensor_model_parallel`, `partition_dim`), not from names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

import torch

from ..core.plan import OUTPUT_LAYER
from ..errors import DialectError
from ..core.shards import Role, ShardSpec
from . import bridge, modelopt


@dataclass(frozen=True)
class FoundTensor:
    """An adapter tensor a dialect found on a module."""

    role: Role
    tensor: torch.Tensor
    alpha: float
    part: str | None = None


class Dialect(Protocol):
    NAME: str

    def find(self, module: torch.nn.Module, adapter_name: str) -> Iterator[FoundTensor] | None:
        """None when the module carries no adapter of this dialect; else its tensors for `adapter_name`."""

    def adapter_names(self, module: torch.nn.Module) -> set[str]:
        """Adapter names on a module this dialect owns (for error messages)."""


DIALECTS: tuple[Dialect, ...] = (modelopt, bridge)


@dataclass
class LocalShard:
    spec: ShardSpec
    tensor: torch.Tensor


@dataclass
class Collected:
    """What one rank found: the dialects present, adapter names seen, and its shards of the requested adapter."""

    dialects: set[str]
    adapter_names: set[str]
    shards: list[LocalShard]


_LAYER_RE = re.compile(r"^(?:.*\.)?(decoder\.layers\.(\d+))$")
_PATH_RE = re.compile(r"^(?:.*\.)?(decoder\.layers\.\d+|output_layer)((?:\.[^.]+)*)$")


def _global_paths(chunk: torch.nn.Module) -> dict[str, str]:
    """Module name -> Megatron path with the global layer index (`layer_number` is 1-based and global)."""
    layer_of = {}
    for name, module in chunk.named_modules():
        match = _LAYER_RE.match(name)
        if match and hasattr(module, "layer_number"):
            layer_of[name] = f"decoder.layers.{module.layer_number - 1}"
    paths = {}
    for name, _ in chunk.named_modules():
        match = _PATH_RE.match(name)
        if not match:
            continue
        head = name[: len(name) - len(match.group(2))]
        if match.group(1) == OUTPUT_LAYER:
            paths[name] = OUTPUT_LAYER + match.group(2)
        elif head in layer_of:
            paths[name] = layer_of[head] + match.group(2)
    return paths


def collect(chunks: Iterable[torch.nn.Module], adapter_name: str, tp_rank: int, tp_size: int) -> Collected:
    """Walk model chunks (VPP or one) and collect this rank's tensors of `adapter_name`, with global paths."""
    found = Collected(set(), set(), [])
    for chunk in chunks:
        paths = _global_paths(chunk)
        for name, module in chunk.named_modules():
            for dialect in DIALECTS:
                tensors = dialect.find(module, adapter_name)
                if tensors is None:
                    continue
                found.dialects.add(dialect.NAME)
                found.adapter_names |= dialect.adapter_names(module)
                if name not in paths:
                    raise DialectError(
                        f"found {dialect.NAME} adapter on module {name!r}, which is not under decoder.layers.<i> or "
                        "output_layer; expected adapters on transformer-layer linears or the output layer"
                    )
                for t in tensors:
                    spec = ShardSpec(
                        module=paths[name], role=t.role, part=t.part, shape=tuple(t.tensor.shape),
                        split_dim=t.split_dim, tp_rank=tp_rank, tp_size=tp_size, alpha=float(t.alpha),
                        dtype=str(t.tensor.dtype).removeprefix("torch."),
                    )
                    found.shards.append(LocalShard(spec, t.tensor))
    return found

