"""The hook's bulk copy (host_snapshot.py) on CPU: buffers are views of one flat tensor per dtype, and both the
synchronous copy and the gather-then-transfer copy the GPU path runs (here without streams) give every tensor bit for
bit."""

from types import SimpleNamespace

import torch

from megatron_peft_export.host_snapshot import _bulk_copy, _flat_buffers, _gather_copy, _Packed


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


def test_the_packed_copy_of_a_save_before_the_walk_keeps_the_values_and_shapes_of_the_save():
    """A save before the model's walk copies as one concatenation per dtype and views the copies later: the views
    hold the values and shapes the tensors had at the copy, whatever happens to the tensors after it."""
    sources = _sources()
    expected = [s.clone() for s in sources]
    packed = _Packed.of(sources)
    assert [(f.dtype, f.numel()) for f in packed.flats] == [(torch.float32, 12 + 24 + 8), (torch.bfloat16, 5 + 21)]
    for s in sources:
        s.add_(1)
    sources[0].data = torch.zeros(9)  # replaced after the save
    _assert_copies(packed.views, expected)
    assert _Packed.of([]).views == []


def test_the_packed_copy_of_a_dtype_s_lone_tensor_is_a_copy():
    """torch's flatten of one contiguous tensor is a view of it: the save's copy must not follow the training step."""
    lone, pair = torch.ones(3, dtype=torch.float64), [torch.ones(2, 2), torch.ones(4)]
    for sources in ([lone], [pair[0], lone, pair[1]]):
        packed = _Packed.of(sources)
        expected = [s.clone() for s in sources]
        for s in sources:
            s.add_(1)
        _assert_copies(packed.views, expected)


def test_the_parameters_listed_at_a_save_before_the_walk_are_torch_s_each_once_split_by_requires_grad():
    from megatron_peft_export.host_snapshot import _parameters

    shared = torch.nn.Linear(2, 3)
    root = torch.nn.Module()
    root.a = torch.nn.Sequential(torch.nn.Linear(3, 4), shared, torch.nn.Sequential())
    root.b = shared  # a module registered twice: its parameters once
    root.register_module("gone", None)  # a child set to None
    root.register_parameter("unset", None)
    root.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    root.a[0].weight.requires_grad_(False)
    chunks = [root, torch.nn.Linear(1, 1)]  # virtual-pipeline chunks
    trainable, other = _parameters(chunks)
    every = [p for chunk in chunks for p in chunk.parameters()]
    assert sorted(map(id, trainable)) == sorted(id(p) for p in every if p.requires_grad)
    assert sorted(map(id, other)) == sorted(id(p) for p in every if not p.requires_grad)
    assert len(trainable) + len(other) == len(every) == 7
