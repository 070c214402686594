"""Shaped like Megatron-LM's stock pretrain_gpt.py, with the README's two added lines marked."""

from megatron.training import get_args, pretrain
from megatron_peft_export.integrations import megatron_lm  # added line 1


def add_modelopt_args(parser):
    """Stands for ModelOpt's extra_args_provider, which the hook's arguments must chain with."""
    parser.add_argument("--export-te-mcore-model", action="store_true")
    return parser


def model_provider():
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random

    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()))
    fill_lora_random(model, seed=11)
    return model


def forward_step(iteration, model):
    import torch

    with torch.no_grad():
        for name, p in model[0].named_parameters():
            if "lora" in name:
                p.add_(0.01 * iteration)


def main():
    megatron_lm.install()  # added line 2
    pretrain(None, model_provider, None, forward_step, extra_args_provider=add_modelopt_args)
    return get_args()
