import argparse
import sys


def parse_args(extra_args_provider=None, ignore_unknown_args=False):
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments (stand-in)", allow_abbrev=False)
    parser.add_argument("--save", type=str, default=None)
    parser.add_argument("--save-interval", type=int, default=None)
    parser.add_argument("--train-iters", type=int, default=None)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--wandb-project", type=str, default="")
    parser.add_argument("--wandb-entity", type=str, default="")
    parser.add_argument("--wandb-exp-name", type=str, default="")
    parser.add_argument("--wandb-save-dir", type=str, default="")
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(sys.argv[1:])
    else:
        args = parser.parse_args(sys.argv[1:])
    return args
