from megatron.training.arguments import parse_args  # bound by name, as Megatron-LM does

from .global_vars import set_args


def initialize_megatron(extra_args_provider=None, args_defaults={}, ignore_unknown_args=False):
    args = parse_args(extra_args_provider, ignore_unknown_args)
    set_args(args)
    return args
