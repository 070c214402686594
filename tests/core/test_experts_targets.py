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


def test_layout_views_are_each_expert_rows_of_its_fused_tensors():
    """Per layer and fused parameter (Qwen-MoE: gate_up_proj of gate and up, down_proj of down), each per-expert key's
    place as the peft layout puts it, written out here: lora_A expert e's rows, lora_B its columns at the module's
    rows in [gate; up]."""
    plan, _ = _convert(_expert_loras())
    layout = fused_layout(plan, QWEN_MOE, E)
    p = "base_model.model.model.layers"
    expected = {}
    for layer in range(2):
        for e in range(E):
            for fused, modules in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                module = f"{p}.{layer}.mlp.experts" + (".base_layer" if fused == "gate_up_proj" else "")
                for j, name in enumerate(modules):
                    rows = 8 if name != "down_proj" else 16
                    key = f"{p}.{layer}.mlp.experts.{e}.{name}"
                    expected[f"{key}.lora_A.weight"] = (f"{module}.lora_A.weight", e, 0, 2)
                    expected[f"{key}.lora_B.weight"] = (f"{module}.lora_B.weight", e, j * rows, rows)
    assert layout.views == expected
    assert layout.experts == {fused: E for fused, *_ in expected.values()}


def test_uncommon_plans_have_no_layout():
    """A rank that differs for one expert, or a dtype that differs for one key: `fuse_experts` decides."""
    loras = _expert_loras()
    module = "decoder.layers.1.mlp.experts.local_experts.2.linear_fc2"
    a, b = loras[module]
    loras[module] = (torch.cat([a, a[:1]]), torch.cat([b, b[:, :1]], dim=1))
    plan, _ = _convert(loras)
    assert fused_layout(plan, QWEN_MOE, E) is None
    plan, _ = _convert(_expert_loras())
    assert fused_layout(plan, QWEN_MOE, E) is not None
    plan.dtypes["base_model.model.model.layers.1.mlp.experts.3.up_proj.lora_B.weight"] = "bfloat16"
    assert fused_layout(plan, QWEN_MOE, E) is None
