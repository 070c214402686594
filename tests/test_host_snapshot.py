"""The hook's bulk copy (host_snapshot.py) on CPU: buffers are views of one flat tensor per dtype, and both the
synchronous copy and the gather-then-transfer copy the GPU path runs (here without streams) give every tensor bit for
bit."""

import collections.abc
import functools
import os
import random
from types import SimpleNamespace

import pytest
import torch

from megatron_peft_export import host_snapshot
from megatron_peft_export.host_snapshot import (
    _accelerated,
    _bulk_copy,
    _entries_hold,
    _flat_buffers,
    _gather_copy,
    _listed_parameters,
    _Stacked,
)


def _sources() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 8, generator=generator)
    return [
        torch.randn(4, 3, generator=generator),
        torch.randn(5, generator=generator).to(torch.bfloat16),
        wide[:, ::2],  # not contiguous
        torch.randn(2, 2, 2, generator=generator),
        torch.randn(3, 7, generator=generator).to(torch.bfloat16),
    ]


def _assert_copies(views: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    assert [(v.shape, v.dtype) for v in views] == [(s.shape, s.dtype) for s in sources]
    for view, source in zip(views, sources):
        assert torch.equal(view, source) and view.data_ptr() != source.data_ptr()


def test_buffers_are_views_of_one_flat_tensor_per_dtype():
    sources = _sources()
    buffers = _flat_buffers(sources)
    assert [(f.dtype, f.numel()) for f in buffers.flats] == [(torch.float32, 12 + 24 + 8), (torch.bfloat16, 5 + 21)]
    for view, source in zip(buffers.views, sources):
        flat = next(f for f in buffers.flats if f.dtype == source.dtype)
        assert view._base is flat and view.shape == source.shape


def test_the_synchronous_copy_and_the_gather_then_transfer_copy_every_tensor():
    sources = _sources()
    host = _flat_buffers(sources)
    assert _bulk_copy(host, sources, SimpleNamespace(staging=None)) is None
    _assert_copies(host.views, sources)
    host, staging = _flat_buffers(sources), _flat_buffers(sources)
    _gather_copy(host, staging, sources)
    _assert_copies(host.views, sources)


def test_the_stacked_copy_of_a_save_before_the_walk_keeps_the_values_and_shapes_of_the_save():
    """A save before the model's walk copies as one stack per shape and dtype and views the copies later: the views
    hold the values and shapes the tensors had at the copy, in the tensors' order, whatever happens to the tensors
    after it."""
    sources = _sources()
    sources.insert(2, torch.randn(4, 3))  # a second tensor of the first one's shape and dtype, not next to it
    sources.append(torch.tensor(2.5))  # a scalar
    expected = [s.clone() for s in sources]
    stacked = _Stacked.of(sources)
    assert [(tuple(s.shape), s.dtype) for s in stacked.stacks] == [
        ((2, 4, 3), torch.float32),
        ((1, 5), torch.bfloat16),
        ((1, 6, 4), torch.float32),
        ((1, 2, 2, 2), torch.float32),
        ((1, 3, 7), torch.bfloat16),
        ((1,), torch.float32),
    ]
    for s in sources:
        s.add_(1)
    sources[0].data = torch.zeros(9)  # replaced after the save
    _assert_copies(stacked.views, expected)
    assert _Stacked.of([]).views == []


def test_the_stacked_copy_of_a_lone_tensor_is_a_copy():
    """A group of one is copied too: the save's copy must not follow the training step."""
    lone, pair = torch.ones(3, dtype=torch.float64), [torch.ones(2, 2), torch.ones(4)]
    for sources in ([lone], [pair[0], lone, pair[1]]):
        stacked = _Stacked.of(sources)
        expected = [s.clone() for s in sources]
        for s in sources:
            s.add_(1)
        _assert_copies(stacked.views, expected)


def _odd_tree() -> list[torch.nn.Module]:
    """Virtual-pipeline chunks with what the listing must get right: a module registered twice, a cycle, unset
    children and parameters, frozen parameters, a parameter shared by two modules, a `_parameters` that is a mapping
    but not a dict."""
    shared = torch.nn.Linear(2, 3)
    root = torch.nn.Module()
    root.a = torch.nn.Sequential(torch.nn.Linear(3, 4), shared, torch.nn.Sequential())
    root.b = shared  # a module registered twice: listed once
    root.a[2].up = root  # a cycle: its modules listed once, and the listing ends
    root.register_module("gone", None)  # a child set to None
    root.register_parameter("unset", None)
    root.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    root.a[0].weight.requires_grad_(False)
    tied = torch.nn.Linear(4, 4)
    tied.weight = root.a[0].bias  # one parameter held by two modules: listed twice (the copies are looked up by id)
    root.tied = tied
    odd = torch.nn.Linear(2, 2)
    odd._parameters = _Mapping(odd._parameters)
    root.odd = odd
    return [root, torch.nn.Linear(1, 1)]


class _Mapping(collections.abc.Mapping):
    def __init__(self, table: dict) -> None:
        self._table = table

    def __getitem__(self, key):
        return self._table[key]

    def __iter__(self):
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


def _random_tree(seed: int) -> list[torch.nn.Module]:
    """~2000 modules wired at random: children shared, cycles, None children and parameters, frozen parameters."""
    rng = random.Random(seed)
    modules = [torch.nn.Module() for _ in range(2000)]
    for i, module in enumerate(modules):
        for k in range(rng.randrange(3)):
            size = rng.randrange(1, 4)
            param = (
                None if rng.random() < 0.1 else torch.nn.Parameter(torch.zeros(size), requires_grad=rng.random() < 0.6)
            )
            module.register_parameter(f"p{k}", param)
        for k in range(rng.randrange(4)):
            j = rng.randrange(len(modules)) if rng.random() < 0.05 else min(len(modules) - 1, i + 1 + rng.randrange(50))
            module.register_module(f"m{k}", None if rng.random() < 0.05 else modules[j])
    return [modules[0], modules[rng.randrange(len(modules))]]


def _listed(chunks: list[torch.nn.Module], walk) -> tuple[list[int], list[int]]:
    trainable, other = walk(chunks)
    return list(map(id, trainable)), list(map(id, other))


def test_the_c_reads_are_built_where_ci_runs():
    """CI installs with `pip install -e .`, which builds the hook's C reads: missing there is a failure."""
    if _accelerated() is None:
        message = "the hook's C reads (megatron_peft_export._hook_reads) are not built: pip install -e ."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.parametrize("tree", [_odd_tree, *(functools.partial(_random_tree, seed) for seed in range(5))])
def test_the_c_listing_gives_the_python_listing_s_lists(tree):
    """The C listing and the Python reference list the same parameters in the same order, whatever the tree."""
    if _accelerated() is None:
        pytest.skip("the C reads are not built")
    chunks = tree()
    assert _listed(chunks, _accelerated().parameters) == _listed(chunks, _listed_parameters)


@pytest.mark.parametrize("accelerated", [True, False])
def test_the_parameters_listed_at_a_save_before_the_walk_are_torch_s_split_by_requires_grad(accelerated, monkeypatch):
    if not accelerated:
        monkeypatch.setattr(host_snapshot, "_accelerated", lambda: None)
    elif _accelerated() is None:
        pytest.skip("the C reads are not built")
    chunks = _odd_tree()
    trainable, other = host_snapshot._parameters(chunks)
    every = [p for chunk in chunks for p in chunk.parameters()]  # each module once, each parameter once
    assert set(map(id, trainable)) == {id(p) for p in every if p.requires_grad}
    assert set(map(id, other)) == {id(p) for p in every if not p.requires_grad}
    # the tied parameter (a bias of a frozen weight's module, trainable) twice, the odd mapping's two once each
    assert len(every) == 10 and len(trainable) + len(other) == 10 + 1


def test_a_listing_that_fails_raises_in_both_listings():
    """A `_parameters` whose values cannot be listed raises its error from either listing (the save reports it)."""
    broken = torch.nn.Linear(2, 2)
    broken._parameters = object()  # neither a dict nor a mapping
    walks = [_listed_parameters] + ([_accelerated().parameters] if _accelerated() else [])
    for walk in walks:
        with pytest.raises(AttributeError, match="values"):
            walk([broken])


def _probes(seed: int) -> tuple[list, ...]:
    """Lookups as a walk records them (`_Probes` columns): identity probes of objects, equality probes of plain
    values, over a few shared tables."""
    rng = random.Random(seed)
    tables = [{} for _ in range(20)]
    objects = [object() for _ in range(30)]
    plain = [0, 1, True, False, 1.0, 0.5, float("nan"), "", "x", None, 2**70]
    same: tuple[list, list, list] = ([], [], [])
    equal: tuple[list, list, list] = ([], [], [])
    for i in range(300):
        table, key = rng.choice(tables), f"k{i}"
        by_identity = rng.random() < 0.6
        value = (rng.choice(objects) if by_identity else rng.choice(plain)) if rng.random() < 0.9 else None
        if value is not None or rng.random() < 0.5:
            table[key] = value  # else absent: found as None
        for column, item in zip(same if by_identity else equal, (table, key, value), strict=True):
            column.append(item)
    return (*same, *equal)


def _changed(columns: tuple[list, ...], seed: int) -> None:
    """One change a save's check must see, or one it must not (an equal value of the same type, a new key)."""
    rng = random.Random(seed)
    tables, keys, objects, equal_tables, equal_keys, values = columns
    kind = rng.randrange(7)
    i, j = rng.randrange(len(keys)), rng.randrange(len(equal_keys))
    if kind == 0:
        tables[i][keys[i]] = object()  # another object
    elif kind == 1:
        tables[i].pop(keys[i], None)  # removed (None unless it was None)
    elif kind == 2:
        value = values[j]
        equal_tables[j][equal_keys[j]] = {int: float, bool: int}.get(type(value), str)(value or 0)
    elif kind == 3:
        equal_tables[j][equal_keys[j]] = "changed"
    elif kind == 4 and type(values[j]) is int:
        equal_tables[j][equal_keys[j]] = values[j] + 10**30 - 10**30  # equal, of the same type: holds
    elif kind == 5:
        tables[i]["unrelated"] = object()  # a new key: holds
    else:
        equal_tables[j].pop(equal_keys[j], None)


@pytest.mark.parametrize("seed", range(60))
def test_the_c_check_of_the_probes_answers_as_the_python_one(seed):
    """The cached walk's lookups (`_Probes.hold`): the C check and the Python reference agree on lookups that still
    hold and on every kind of change (another object, a removed key, a value of another type or another value)."""
    if _accelerated() is None:
        pytest.skip("the C reads are not built")
    columns = _probes(seed)
    assert _accelerated().entries_hold(*columns) is True and _entries_hold(*columns) is True
    _changed(columns, seed)
    assert _accelerated().entries_hold(*columns) is _entries_hold(*columns)


def test_the_probes_check_sees_a_changed_object_and_a_changed_type():
    if _accelerated() is None:
        pytest.skip("the C reads are not built")
    table = {"a": object(), "n": 1}
    columns = ([table], ["a"], [table["a"]], [table], ["n"], [1])
    for hold in (_accelerated().entries_hold, _entries_hold):
        assert hold(*columns)
        table["n"] = True  # == 1, but a bool: another type
        assert not hold(*columns)
        table["n"] = 1
        table["a"] = object()
        assert not hold(*columns)
        table["a"] = columns[2][0]
    with pytest.raises(TypeError, match="not a dict"):
        _accelerated().entries_hold([[]], ["a"], [None], [], [], [])
    with pytest.raises(ValueError, match="changed"):
        _accelerated().entries_hold([table], [], [None], [], [], [])
