"""`FusedLayout.targets` makes every per-expert view of the fused tensors with one `unbind` per fused tensor and rows:
each view must be the one indexing the fused tensor for that expert gives (the same memory, shape and strides:
expert e's rows of a fused lora_A, its rows of its columns of a fused lora_B), on a second call too (the grouping is
kept with the layout)."""

import torch

from megatron_peft_export.core.archs import QWEN_MOE
from megatron_peft_export.core.experts import fused_layout

from .test_experts import E, _convert, _expert_loras


def _indexed(layout, written):
    """Each per-expert key's view the simple way: index the fused tensor."""
    out = {key: t for key, t in written.items() if key not in layout.experts}
    for key, (fused, e, start, rows) in layout.views.items():
        tensor, count = written[fused], layout.experts[fused]
        if key.endswith(".lora_A.weight"):
            out[key] = tensor.view(count, -1, tensor.shape[1])[e]
        else:
            out[key] = tensor.view(tensor.shape[0], -1, count)[start : start + rows, :, e]
    return out


def _same_view(a, b):
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


def test_unbound_views_are_the_indexed_ones():
    plan, _ = _convert(_expert_loras())
    layout = fused_layout(plan, QWEN_MOE, E)
    for _ in range(2):
        written = {key: torch.empty(shape) for key, shape in layout.shapes.items()}
        targets, expected = layout.targets(written), _indexed(layout, written)
        assert targets.keys() == expected.keys() == plan.shapes.keys()
        assert all(_same_view(targets[key], expected[key]) for key in expected)
    assert any(rows != layout.shapes[fused][0] for fused, _, _, rows in layout.views.values())  # gate/up narrowed
