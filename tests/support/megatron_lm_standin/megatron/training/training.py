from .checkpointing import save_checkpoint
from .global_vars import get_args, get_wandb_writer
from .initialize import initialize_megatron


def save_checkpoint_and_time(iteration, model, ema, optimizer, opt_param_scheduler, num_floating_point_operations_so_far,
                             checkpointing_context, non_persistent_ckpt=False, train_data_iterator=None):
    save_checkpoint(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far,
                    checkpointing_context, non_persistent_ckpt=non_persistent_ckpt)


def train(forward_step_func, model, optimizer, opt_param_scheduler, train_data_iterator, valid_data_iterator, process_non_loss_data_func, config):
    args = get_args()
    for iteration in range(1, args.train_iters + 1):
        forward_step_func(iteration, model)
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save_checkpoint_and_time(iteration, model, None, optimizer, opt_param_scheduler, 0, {}, non_persistent_ckpt=False)
    return iteration


def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func, process_non_loss_data_func=None,
             extra_args_provider=None, args_defaults={}, store=None):
    initialize_megatron(extra_args_provider=extra_args_provider, args_defaults=args_defaults)
    model = [model_provider()]
    iteration = train(forward_step_func, model, None, None, None, None, process_non_loss_data_func, None)
    if get_wandb_writer():  # Megatron-LM ends its run here, before interpreter exit (and the hook's finalize)
        get_wandb_writer().finish()
    return iteration
