_ARGS = None
_WANDB_WRITER = None


def get_args():
    return _ARGS


def set_args(args):
    global _ARGS
    _ARGS = args


def get_wandb_writer():
    return _WANDB_WRITER


def set_wandb_writer(args):
    """As Megatron-LM's _set_wandb_writer: a run on the LAST rank when --wandb-project is set."""
    global _WANDB_WRITER
    import os

    import torch.distributed as dist

    if args.wandb_project and dist.get_rank() == dist.get_world_size() - 1:
        import wandb

        save_dir = args.wandb_save_dir or os.path.join(args.save, "wandb")
        os.makedirs(save_dir, exist_ok=True)
        wandb.init(dir=save_dir, name=args.wandb_exp_name, project=args.wandb_project, config=vars(args))
        _WANDB_WRITER = wandb
