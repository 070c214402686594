from pathlib import Path

import torch.distributed as dist


def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far, checkpointing_context=None, non_persistent_ckpt=False, **kwargs):
    from .global_vars import get_args

    args = get_args()
    if non_persistent_ckpt:
        return
    directory = Path(args.save) / f"iter_{iteration:07d}"
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "common.pt").write_bytes(b"")
    dist.barrier()
    if dist.get_rank() == 0 and not args.async_save:
        (Path(args.save) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    dist.barrier()
