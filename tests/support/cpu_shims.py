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
