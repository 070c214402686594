"""A small LoRA training loop on real megatron-core pieces (test support, CPU with the shims).

Model: ``tiny_gpt.build_gpt`` + ModelOpt LoRA (ModelOpt freezes the base; only
adapters train), wrapped in megatron-core's DistributedDataParallel. Optimizer:
``get_megatron_optimizer`` (Adam, not distributed). Step: the pipeline schedule
from ``get_forward_backward_func`` with megatron's vocab-parallel cross entropy
(the model computes it from ``labels``), then ``optimizer.step()``. Checkpoints:
Megatron-LM's layout - ``<save>/iter_XXXXXXX/`` in torch_dist with ModelOpt's
state under ``modelopt_state/``, and the tracker file written by rank 0 last.

Runs single-process or on any gloo world (TP, PP, DP; not VPP) once
``install_cpu_shims()`` ran and ``torch.distributed`` is initialized.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import queue
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

from .tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel

TRACKER = "latest_checkpointed_iteration.txt"
OnSave = Callable[[int, Path, DistributedDataParallel], None]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how; the model geometry is a ``TinyGPTConfig``."""

    model: TinyGPTConfig = TinyGPTConfig()
    tp: int = 1
    pp: int = 1
    lora_rank: int = 8
    lora_scale: float = 2.0
    lr: float = 1e-2
    micro_batch_size: int = 8
    num_microbatches: int = 2
    """Per data-parallel replica; the global batch is micro_batch_size * num_microbatches * DP."""
    data_seed: int = 0
    lora_seed: int = 0


# ------------------------------------------------------------------------------ data


def synthetic_batch(cfg: TinyGPTConfig, iteration: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """[batch_size, seq_length + 1] token ids: arithmetic progressions mod vocab_size.

    Each row starts anywhere with a stride from {1, 2, 3}, so every token after
    the second is predictable. A pure function of its arguments: the same on
    every rank and for every layout.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    start = torch.randint(0, cfg.vocab_size, (batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (batch_size, 1), generator=gen)
    return (start + stride * torch.arange(cfg.seq_length + 1)) % cfg.vocab_size


def _microbatches(tc: TrainConfig, iteration: int) -> list[torch.Tensor]:
    """This DP replica's microbatches for ``iteration`` (TP and PP ranks of a replica get the same)."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_replica = tc.micro_batch_size * tc.num_microbatches
    batch = synthetic_batch(tc.model, iteration, per_replica * dp, tc.data_seed)
    return list(batch[dp_rank * per_replica : (dp_rank + 1) * per_replica].split(tc.micro_batch_size))


# ------------------------------------------------------------------------------ model


def build_model(tc: TrainConfig) -> DistributedDataParallel:
    """Parallel groups, the tiny GPT with ModelOpt LoRA (base frozen), wrapped in megatron's DDP."""
    init_parallel(tc.tp, tc.pp)
    gpt = apply_modelopt_lora(build_gpt(tc.model), rank=tc.lora_rank, scale=tc.lora_scale)
    # ModelOpt draws A from the RNG in local layer order, so its init depends on PP; redraw
    # it per global name (any layout then trains identically), B = 0 as usual for LoRA.
    fill_lora_random(gpt, seed=tc.lora_seed)
    for name, param in gpt.named_parameters():
        param.requires_grad_("lora_" in name)  # ModelOpt freezes the base already; make sure
        if ".lora_b_" in name:
            param.detach().zero_()
    gpt.config.finalize_model_grads_func = finalize_model_grads  # DP all-reduce, as Megatron-LM sets it
    return DistributedDataParallel(gpt.config, DistributedDataParallelConfig(), gpt)


def build_optimizer(tc: TrainConfig, model: DistributedDataParallel):
    """megatron-core Adam over the trainable (LoRA) parameters.

    clip_grad=0: megatron's clipping asserts ``grad.type() == 'torch.cuda.FloatTensor'``.
    No gloo groups: ``init_parallel`` creates none and the non-distributed optimizer needs none.
    """
    config = OptimizerConfig(optimizer="adam", lr=tc.lr, weight_decay=0.0, clip_grad=0.0, params_dtype=torch.float32)
    return get_megatron_optimizer(config, [model], use_gloo_process_groups=False)


# ------------------------------------------------------------------------------ step


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    seq = inputs.shape[1]
    position_ids = torch.arange(seq).unsqueeze(0).expand_as(inputs)
    causal_mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    per_token = model(inputs, position_ids, causal_mask, labels=labels)  # vocab-parallel cross entropy

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach().clone()}  # clone: the schedule divides ``loss`` in place

    return per_token, loss_func


def train_step(tc: TrainConfig, model, optimizer, iteration: int) -> float:
    """One optimizer step on the iteration's batch; returns the global-batch loss on every rank."""
    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    micro = _microbatches(tc, iteration)
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=len(micro),
        seq_length=tc.model.seq_length,
        micro_batch_size=tc.micro_batch_size,
        forward_only=False,
    )
    updated, _, _ = optimizer.step()
    assert updated, "optimizer skipped the step"
    # The loss exists on last-stage ranks only (all TP ranks hold it): average over them.
    local = sum(d["lm loss"] for d in losses) / len(losses) if losses else torch.zeros(())
    total = local.reshape(1).float()
    dist.all_reduce(total)
    return total.item() / (dist.get_world_size() // ps.get_pipeline_model_parallel_world_size())


# ------------------------------------------------------------------------------ checkpoints


def _in_process_write_results() -> None:
    """Give torch_dist's writer an in-process results queue (synchronous saves only).

    Megatron creates it from a *spawn*-context Manager: ~3.5 s per process, a
    re-import of ``__main__`` (hence the guard scripts need), and a server process
    that outlives ranks ending in ``os._exit``. A synchronous save puts and gets
    the results in this process, so a ``queue.Queue`` does. (A fork-context
    ``multiprocessing.Queue`` is racy here: ``put`` hands off to a feeder thread and
    megatron's ``get_nowait`` right after can find it empty.)
    """
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _megatron_args(tc: TrainConfig) -> argparse.Namespace:
    """The few Megatron-LM ``args`` a reader of ``common.pt`` looks for (geometry, layout)."""
    m = tc.model
    return argparse.Namespace(
        tensor_model_parallel_size=tc.tp,
        pipeline_model_parallel_size=tc.pp,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        group_query_attention=m.num_query_groups != m.num_attention_heads,
        kv_channels=m.kv_channels,
        padded_vocab_size=m.vocab_size,
        seq_length=m.seq_length,
        swiglu=m.gated_linear_unit,
        normalization="RMSNorm",
        position_embedding_type="rope",
        rotary_base=m.rotary_base,
    )


def checkpoint_state(model, tc: TrainConfig | None = None, iteration: int = 0) -> dict:
    """The sharded state dict as Megatron-LM nests it (model under "model"); a load template too."""
    state = {"model": model.module.sharded_state_dict(), "iteration": iteration, "checkpoint_version": 3.0}
    if tc is not None:
        state["args"] = _megatron_args(tc)
    return state


@contextlib.contextmanager
def _may_fork():
    """The torch_dist writer forks a process per file; a daemonic rank (``run_ranks``) may not.

    The writers are joined before the save returns, so lifting the flag for the save is safe.
    """
    proc = multiprocessing.current_process()
    daemonic = proc.daemon
    proc.daemon = False
    try:
        yield
    finally:
        proc.daemon = daemonic


def save_checkpoint(model, save_dir: str | Path, iteration: int, tc: TrainConfig | None = None) -> Path:
    """Save ``<save_dir>/iter_XXXXXXX`` (torch_dist + modelopt_state/) on every rank; rank 0 then updates the
    tracker."""
    path = Path(save_dir) / f"iter_{iteration:07d}"
    path.mkdir(parents=True, exist_ok=True)  # dist_checkpointing.save wants it to exist
    _in_process_write_results()
    with _may_fork():
        dist_checkpointing.save(checkpoint_state(model, tc, iteration), str(path))
        save_sharded_modelopt_state([model.module], str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = Path(save_dir) / (TRACKER + ".tmp")
        tmp.write_text(str(iteration))
        tmp.replace(Path(save_dir) / TRACKER)
    dist.barrier()
    return path


def load_checkpoint(model, checkpoint_dir: str | Path) -> int:
    """Load a checkpoint written by ``save_checkpoint`` into ``model``; returns its iteration.

    Same TP size as at save time: ModelOpt stores fc1's LoRA B TP-interleaved (DESIGN.md).
    """
    state = dist_checkpointing.load(checkpoint_state(model), str(checkpoint_dir))
    model.module.load_state_dict(state["model"])
    return int(state["iteration"])


# ------------------------------------------------------------------------------ loop


def run_training(
    tc: TrainConfig,
    *,
    steps: int,
    save_interval: int,
    save_dir: str | Path,
    on_save: OnSave | None = None,
    log: Callable[[str], None] | None = print,
) -> list[float]:
    """Train ``steps`` iterations, saving every ``save_interval`` and after the last.

    After each save ``on_save(iteration, iteration_dir, model)`` runs on every rank
    (model: the DDP-wrapped GPT). ``log`` gets one line per step on rank 0 (None: silent).
    Returns the loss of each step (identical on every rank).
    """
    model = build_model(tc)
    optimizer = build_optimizer(tc, model)
    history = []
    for iteration in range(1, steps + 1):
        history.append(train_step(tc, model, optimizer, iteration))
        if log and dist.get_rank() == 0:
            log(f"iteration {iteration:4d}/{steps}  loss {history[-1]:.4f}")
        if iteration % save_interval == 0 or iteration == steps:
            path = save_checkpoint(model, save_dir, iteration, tc)
            if on_save is not None:
                on_save(iteration, path, model)
    return history
