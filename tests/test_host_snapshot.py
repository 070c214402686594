"""The hook's bulk copy (host_snapshot.py) on CPU: buffers are views of one flat tensor per dtype, and both the
synchronous copy and the gather-then-transfer copy the GPU path runs (here without streams) give every tensor bit for
bit."""

from types import SimpleNamespace

import torch

from megatron_peft_export.host_snapshot import _bulk_copy, _flat_buffers, _gather_copy, _Stacked


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


def test_the_parameters_listed_at_a_save_before_the_walk_are_torch_s_split_by_requires_grad():
    from megatron_peft_export.host_snapshot import _parameters

    shared = torch.nn.Linear(2, 3)
    root = torch.nn.Module()
    root.a = torch.nn.Sequential(torch.nn.Linear(3, 4), shared, torch.nn.Sequential())
    root.b = shared  # a module registered twice: its parameters listed (and copied) twice, harmless
    root.register_module("gone", None)  # a child set to None
    root.register_parameter("unset", None)
    root.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    root.a[0].weight.requires_grad_(False)
    chunks = [root, torch.nn.Linear(1, 1)]  # virtual-pipeline chunks
    trainable, other = _parameters(chunks)
    every = [p for chunk in chunks for p in chunk.parameters()]
    assert set(map(id, trainable)) == {id(p) for p in every if p.requires_grad}
    assert set(map(id, other)) == {id(p) for p in every if not p.requires_grad}
    assert len(every) == 7 and len(trainable) + len(other) == 7 + 2  # shared's weight and bias, twice
