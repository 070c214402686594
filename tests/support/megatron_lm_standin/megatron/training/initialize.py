from megatron.training.arguments import parse_args  # bound by name, as Megatron-LM does

from .global_vars import set_args, set_wandb_writer


def initialize_megatron(extra_args_provider=None, args_defaults={}, ignore_unknown_args=False):
    args = parse_args(extra_args_provider, ignore_unknown_args)
    set_args(args)
    set_wandb_writer(args)
    return args
