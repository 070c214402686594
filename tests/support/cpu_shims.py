"""Make megatron-core 0.16.1 run on a CPU-only torch build (test support only).

megatron-core assumes CUDA in a few places that the tiny test models reach:
``torch.cuda.current_device()`` is used as the allocation device (rotary
embeddings, TP mappings, p2p buffers), pipeline schedules allocate with
``device="cuda"`` and call ``torch.cuda.synchronize()``, and attention always
forks the CUDA RNG tracker. Each shim below answers one of those with the CPU.
Separately, megatron wraps some activations (squared_relu, quick_gelu) in
torch.compile; compiling them on CPU costs ~30 s per process, so dynamo is
disabled and they run eagerly. These shims never belong in the library.
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_installed = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` (and ``.cuda()`` / ``.to("cuda")``) to the CPU.

    Kept active for the whole process: the schedules build their token counters
    and p2p buffers on "cuda" inside library code we cannot pass a device to.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _install_rng_tracker() -> None:
    """Use megatron's inference RNG tracker: its fork() is a no-op context.

    The training tracker stores and restores torch.cuda RNG states, which a CPU
    build cannot do; dropout is 0 in these tests, so no RNG stream is lost.
    """
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def install_cpu_shims() -> None:
    """Install every CPU shim once per process; later calls do nothing."""
    global _installed
    if _installed:
        return
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    _CudaToCpuMode().__enter__()
    torch._dynamo.config.disable = True
    _install_rng_tracker()
    _installed = True


class _CpuStream:
    """Stand-in for torch.cuda.Stream / Event: CPU work is already ordered, so every wait is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _CpuStream()

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _CpuStream()
_moe_installed = False


def install_moe_cpu_shims() -> None:
    """The extra shims megatron-core 0.16.1 MoE layers need on CPU (once per process).

    The router always calls ``moe_utils.router_gating_linear``, which reads
    ``te_general_gemm``, a name only bound when Transformer Engine imports;
    the alltoall token dispatcher (and overlapped shared experts) create a
    torch.cuda.Stream at construction and switch streams around host copies,
    and it converts its split sizes to numpy only when they are CUDA tensors
    (gloo's all_to_all_single refuses tensors as split sizes). With expert
    TP > 1 it gathers / reduce-scatters uneven token counts over the expert-TP
    group, which gloo cannot do (see ``_install_uneven_gloo_collectives``).
    """
    global _moe_installed
    if _moe_installed:
        return
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    host_copy = token_dispatcher.maybe_move_tensor_to_cpu

    def host_copy_cpu_too(tensor, as_numpy=False, record_stream=False):
        # Only CUDA tensors become numpy upstream; gloo's all_to_all_single wants int sequences.
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return host_copy(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = host_copy_cpu_too
    _install_uneven_gloo_collectives()
    _install_cpu_streams()
    _moe_installed = True


def _install_cpu_streams() -> None:
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuStream
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def install_megatron_lm_cpu_shims() -> None:
    """What Megatron-LM's training code (``megatron.training`` at core_v0.16.1) needs on a CPU-only torch, beyond
    ``install_cpu_shims`` (which this calls). The process group is gloo by its own flag (--distributed-backend gloo).

    - ``initialize_megatron`` asserts ``torch.cuda.is_available()`` unless called with its own ``allow_no_cuda=True``
      (``pretrain`` calls it so; torch.cuda.is_available() itself stays False: transformers and peft ask it too),
      and initializes model parallelism only when ``torch.cuda.device_count() > 0``: one device, ``set_device``
      does nothing;
    - it compiles its dependencies at start-up: the dataset index helpers with ``make`` (the megatron-core wheel
      ships them compiled, and no Makefile) and the CUDA fused kernels (none on CPU): skipped;
    - argument validation asks the GPU's architecture (``get_device_arch_version``, bound in ``arguments``): one
      before Blackwell, as a Hopper reports (TP runs then need CUDA_DEVICE_MAX_CONNECTIONS=1 in the environment,
      as there);
    - ``get_model`` gives DDP a ``torch.cuda.Stream``: the CPU stand-in streams of the MoE shims;
    - every checkpoint stores ``torch.cuda.get_rng_state()``: the CPU generator's state (restoring it does nothing);
    - ``--use-persistent-ckpt-worker``: the worker process (spawned, so without these shims) selects its CUDA
      device, then copies the tensors to host ("preload", while training waits) and synchronizes CUDA; it starts
      through ``_persistent_checkpoint_worker``, which installs ``install_cpu_shims`` and the one device there
      first, and makes the preload copy: on CPU ``tensor.to("cpu")`` is the trainer's own (shared-memory) tensor,
      so without a copy the checkpoint would hold whatever training wrote into it before the worker did.
    """
    import functools

    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller
    from megatron.training import arguments, initialize, training

    install_cpu_shims()
    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    _one_cuda_device()
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": None
    initialize._compile_dependencies = lambda: None
    arguments.get_device_arch_version = lambda: 9
    _install_cpu_streams()
    _PERSISTENT_WORKER_LOOP.append(PersistentAsyncCaller.async_loop)
    PersistentAsyncCaller.async_loop = staticmethod(_persistent_checkpoint_worker)


def _one_cuda_device() -> None:
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None


_PERSISTENT_WORKER_LOOP: list = []
"""The original worker loop, in the training process (where the class attribute is replaced)."""


def _persistent_checkpoint_worker(*args, **kwargs):
    """Megatron's persistent checkpoint worker loop, in the spawned worker: pickled by this name, so the worker
    imports this module, gets its one device, then runs megatron's loop (its class attribute is megatron's there)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    install_cpu_shims()
    _one_cuda_device()
    preload = FileSystemWriterAsync.preload_tensors

    def preload_host_copies(write_buckets, non_blocking=True):  # what the D2H copy is on a GPU
        return [
            (name, key, (data, [(item, t.clone()) for item, t in tensors]))
            for name, key, (data, tensors) in preload(write_buckets, non_blocking)
        ]

    FileSystemWriterAsync.preload_tensors = staticmethod(preload_host_copies)
    loop = _PERSISTENT_WORKER_LOOP[0] if _PERSISTENT_WORKER_LOOP else PersistentAsyncCaller.async_loop
    return loop(*args, **kwargs)


def _install_uneven_gloo_collectives() -> None:
    """Uneven-split gather / reduce-scatter along dim 0 in megatron's TP mappings, done with even collectives.

    gloo's all_gather needs equal sizes and its list reduce_scatter is missing;
    the alltoall dispatcher at expert TP > 1 calls both with per-rank token
    counts. Gather: pad every piece to the largest, gather, drop the padding.
    Reduce-scatter: all-reduce the whole input, keep this rank's rows.
    Calls without split sizes go to megatron's own code.
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)], dim=0)

    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone().contiguous()
        dist.all_reduce(total, group=group)
        return torch.split(total, [int(n) for n in input_split_sizes], dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven
