"""The live walk's listing and attribute reads (dialects.named_modules, dialects.base.Reader) against torch's own
answers: `named_modules()` and `getattr(module, name, None)`."""

import torch

from megatron_peft_export.dialects import named_modules
from megatron_peft_export.dialects.base import Reader, attribute


class _Custom(torch.nn.Module):
    """A module with a `__getattr__` of its own: read through it."""

    def __getattr__(self, name):
        if name == "made_up":
            return "from __getattr__"
        return super().__getattr__(name)


class _WithProperty(torch.nn.Linear):
    level = 3

    @property
    def doubled(self):
        return 2 * self.level


def _model() -> torch.nn.Module:
    shared = torch.nn.Linear(2, 2)
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([torch.nn.Sequential(shared, torch.nn.ReLU()), torch.nn.Sequential(shared)])
    root.register_module("absent", None)
    root.custom = _Custom()
    root.custom.inner = _WithProperty(2, 3)
    root.custom.inner.register_buffer("scale", torch.ones(1))
    root.custom.inner.note = "plain attribute"
    root.tail = shared  # registered again under another name: listed once, where first reached
    return root


def test_the_listing_is_torch_s_named_modules():
    model = _model()
    assert [(n, id(m)) for n, m in named_modules(model)] == [(n, id(m)) for n, m in model.named_modules()]
    assert len(named_modules(model)) == 8


def test_a_model_whose_class_lists_its_own_modules_is_listed_by_it():
    class Listed(torch.nn.Module):
        def named_modules(self, *args, **kwargs):
            yield "only", self

    model = torch.nn.Sequential(Listed(), torch.nn.ReLU())
    assert [(n, id(m)) for n, m in named_modules(model)] == [(n, id(m)) for n, m in model.named_modules()]
    assert [n for n, _ in named_modules(model)] == ["", "only", "1"]  # its own names, as torch lists them


def test_the_reader_answers_what_getattr_answers():
    model = _model()
    names = ["weight", "bias", "scale", "note", "level", "doubled", "inner", "made_up", "missing", "training", "0"]
    read = Reader()
    for _, module in named_modules(model):
        for name in names:
            expected = getattr(module, name, None)
            assert read(module, name) is expected or read(module, name) == expected, (module, name)
            assert attribute(module, name) is expected or attribute(module, name) == expected, (module, name)
    assert read(model.custom, "made_up") == "from __getattr__" and read(model.custom.inner, "doubled") == 6
