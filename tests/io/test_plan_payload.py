"""`allocate_plan_payload` shares one (dtype, shape) entry among a plan's tensors of one shape and lays out tensors of
one size by a range of offsets: the payload (entries, spans, layout, header, shapes) is the one `allocate_payload` makes
of an entry per tensor, on plans of one size, several sizes, empty tensors, two dtypes and none."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from megatron_peft_export.io import safetensors_out


def _plan(shapes, dtypes=None):
    return SimpleNamespace(shapes=shapes, dtypes=dtypes or dict.fromkeys(shapes, "float32"))


def _moe(layers=3, experts=4, r=2):
    shapes = {}
    for i in range(layers):
        for e in range(experts):
            for w in ("w1", "w2", "w3"):
                stem = f"base_model.model.model.layers.{i}.block_sparse_moe.experts.{e}.{w}"
                shapes[f"{stem}.lora_A.weight"] = (r, 8)
                shapes[f"{stem}.lora_B.weight"] = (8, r)
    return shapes


def _shuffled(shapes, seed=5):
    items = list(shapes.items())
    random.Random(seed).shuffle(items)
    return dict(items)


MOE = _moe()
CASES = {
    "one size, payload order": (_plan(dict(sorted(MOE.items()))), None),
    "one size, plan order": (_plan(MOE), None),
    "one size, shuffled": (_plan(_shuffled(MOE)), None),
    "sizes differ": (_plan(_shuffled({**MOE, "x.lora_A.weight": (3, 8), "y.lora_B.weight": (5,)})), None),
    "empty tensors": (_plan({**MOE, "e.lora_A.weight": (0, 8)}), None),
    "only empty tensors": (_plan({"a": (0, 8), "b": (8, 0)}), None),
    "scalars": (_plan({"a": (), "b": ()}), None),
    "a dtype asked for": (_plan(MOE), torch.bfloat16),
    "two dtypes": (_plan(MOE, {k: ("bfloat16" if n % 3 else "float32") for n, k in enumerate(MOE)}), None),
    "two dtypes, one asked for": (
        _plan(MOE, {k: ("float16" if n % 2 else "float32") for n, k in enumerate(MOE)}),
        torch.float32,
    ),
    "nothing": (_plan({}), None),
}


def _reference(entries):
    """The spans and header of `entries` written out one tensor at a time: safetensors' order (dtype rank, then
    name), tensors back to back, the header as json.dumps writes it."""
    ranks = list(safetensors_out.DTYPE_NAMES)
    where, header, at = {}, {"__metadata__": {"format": "pt"}}, 0
    for key in sorted(entries, key=lambda k: (ranks.index(entries[k][0]), k)):
        dtype, shape = entries[key]
        where[key] = (at, at + math.prod(shape) * dtype.itemsize)
        header[key] = {
            "dtype": safetensors_out.DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": list(where[key]),
        }
        at = where[key][1]
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return where, at, len(text).to_bytes(8, "little") + text


@pytest.mark.parametrize("name", list(CASES))
def test_plan_payload_is_the_payload_of_an_entry_per_tensor(name):
    plan, dtype = CASES[name]
    payload, buffer, where = safetensors_out.allocate_plan_payload(plan, dtype)
    entries = {k: (dtype or getattr(torch, plan.dtypes[k]), shape) for k, shape in plan.shapes.items()}
    spans, size, head = _reference(entries)
    assert payload.entries == entries and list(payload.entries) == list(entries)
    assert where == spans and list(where) == list(spans) and len(buffer) == size
    assert b"".join(safetensors_out._layout_header(payload.layout, {"format": "pt"})) == head
    general = safetensors_out.allocate_payload(entries)[0]
    assert payload.layout[:3] == general.layout[:3]
    shapes = safetensors_out.shapes(payload)
    assert shapes == safetensors_out.shapes(general) and list(shapes) == list(plan.shapes)
    assert shapes is not plan.shapes  # a copy: the caller may change it


def test_the_quick_paths_are_taken(monkeypatch):
    """Of one dtype, a plan's tensors of one shape share an entry, and tensors of one size take no running sum."""
    monkeypatch.setattr(safetensors_out, "accumulate", None)
    payload, _, _ = safetensors_out.allocate_plan_payload(_plan(MOE))
    assert len(set(map(id, payload.entries.values()))) == len(set(MOE.values())) == 2
    assert payload.layout.shapes is not None
