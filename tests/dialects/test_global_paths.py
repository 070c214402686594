"""Module names to global Megatron paths (dialects._global_paths): the one-pass split of each name equals the regular
expression that defines it, and layers and the output layer get their global paths."""

import re

import torch

from megatron_peft_export.dialects import _global_paths, _path_parts

PATH = re.compile(r"^(?:.*\.)?(decoder\.layers\.\d+|output_layer)((?:\.[^.]+)*)$")
"""The definition: the last `decoder.layers.<i>` or `output_layer` at a component boundary, then whole components."""

NAMES = [
    "module.decoder.layers.0.self_attention.linear_qkv.lora_a_default",
    "module.decoder.layers.12.mlp.experts.local_experts.3.linear_fc1",
    "module.decoder.layers.1.mlp.decoder.layers.7.inner",
    "module.decoder.layers.2.output_layer.x",
    "module.output_layer.lora_b_default",
    "module.output_layer_norm.weight_like",
    "module.xdecoder.layers.4.linear",
    "module.decoder.layersx.5.linear",
    "module.decoder.layers.6x.linear",
    "decoder.layers.8.linear_proj",
    "embedding.word_embeddings",
    "output_layer",
]


def _tree(names: list[str]) -> torch.nn.Module:
    root = torch.nn.Module()
    for name in names:
        module = root
        for part in name.split("."):
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
    return root


def test_the_one_pass_split_is_the_regular_expressions():
    named = list(_tree(NAMES).named_modules())
    expected = {}
    for name, _ in named:
        match = PATH.match(name)
        if match:
            expected[name] = (name[: len(name) - len(match.group(2))], match.group(1), match.group(2))
    assert len(named) > 40 and len(expected) > 20
    assert _path_parts(named) == expected


def test_layers_get_their_global_index_and_the_output_layer_its_path():
    root = _tree(["module.decoder.layers.0.mlp.linear_fc1", "module.decoder.layers.1.mlp", "module.output_layer"])
    for local, layer in enumerate(root.module.decoder.layers.children()):
        layer.layer_number = 5 + local  # a later pipeline stage: layer_number is global and 1-based
    paths = {name: where.path for name, where in _global_paths(list(root.named_modules()), True).items()}
    assert paths == {
        "module.decoder.layers.0": "decoder.layers.4",
        "module.decoder.layers.0.mlp": "decoder.layers.4.mlp",
        "module.decoder.layers.0.mlp.linear_fc1": "decoder.layers.4.mlp.linear_fc1",
        "module.decoder.layers.1": "decoder.layers.5",
        "module.decoder.layers.1.mlp": "decoder.layers.5.mlp",
        "module.output_layer": "output_layer",
    }
