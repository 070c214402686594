"""Pure-torch stand-ins for the CUDA/triton kernels of megatron-core 0.16.1's Mamba mixer and gated delta-net (test
support only), so that megatron's own layer code runs its forward on CPU.

Why a shim is needed. megatron-core's `MambaMixer` (ssm/mamba_mixer.py) imports its scan and gated norm from
`mamba_ssm` (triton; its training forward, `_ssm_training`, calls `mamba_split_conv1d_scan_combined`, then the
gated `RMSNorm` class), and `GatedDeltaNet` (ssm/gated_delta_net.py) imports `chunk_gated_delta_rule` and `l2norm`
from `fla` (triton). Neither package installs on a CPU machine (`tiny_hybrid.install_mamba_shim` and
`tiny_qwen3_next.install_fla_shim` provide stand-ins whose kernels raise, enough to build the models). Everything
else these layers do is plain torch and runs as megatron wrote it: the in_proj and its TP split, the split of its
output into z/x/B/C/dt (q/k/v/z/b/a), the depthwise causal conv (`GatedDeltaNet` uses `nn.Conv1d` itself when
`causal_conv1d` is absent), A/D/dt_bias, the output norm and gate, out_proj.

What replaces the kernels is the same math in a few lines of torch, written here from the definitions:
- Mamba2 (`mamba_split_conv1d_scan_combined` without its optional norm / out_proj, as megatron calls it): split
  `[z; xBC; dt]`, depthwise causal conv of xBC with bias and SiLU, split `[x; B; C]`, `dt = softplus(dt + dt_bias)`,
  then per head h (group `h // (heads / groups)` for B and C) the recurrence
  `state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T`, `y_t = state_t C_t + D_h * x_t`, returned as
  `y * silu(z)`; megatron then applies the gated RMSNorm class with z=None: an RMS norm over each group of
  `d_inner / ngroups` channels, times the weight (`norm_before_gate=False`: a z given to it multiplies by silu(z)
  first). A sequential scan, not the chunked SSD algorithm: equal in exact arithmetic.
- gated delta rule: megatron-core's own torch implementation `gated_delta_net.torch_chunk_gated_delta_rule` (its
  deterministic mode's path), which takes the same arguments as fla's kernel; fla's `l2norm` is already plain torch
  in the stand-in.

The logits tests that use these check the weight layout (which rows of which TP rank's in_proj go to which HF module),
not the kernels: a kernel stand-in that were wrong would fail them, never hide a layout error.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu}


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None):
    """Depthwise causal convolution of x [batch, length, channels] with weight [channels, width]: output t sees inputs
    t - width + 1 .. t (zero before the start)."""
    width = weight.shape[-1]
    out = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=width - 1, groups=weight.shape[0])
    out = out[..., : x.shape[1]].transpose(1, 2)
    return _ACTIVATIONS[activation](out) if activation else out


def selective_scan(x, dt, A, B, C, D):
    """Mamba2's scan. x [b, l, heads, headdim], dt [b, l, heads] (after softplus), A [heads], B and C [b, l, groups,
    state], D [heads]: y [b, l, heads, headdim]."""
    heads, groups = x.shape[2], B.shape[2]
    B = B.repeat_interleave(heads // groups, dim=2)  # head h reads group h // (heads / groups)
    C = C.repeat_interleave(heads // groups, dim=2)
    state = x.new_zeros(x.shape[0], heads, x.shape[3], B.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1)


def mamba_split_conv1d_scan_combined(
    zxbcdt,
    conv1d_weight,
    conv1d_bias,
    dt_bias,
    A,
    D,
    chunk_size=None,
    activation="silu",
    headdim=None,
    ngroups=1,
    norm_before_gate=False,
    seq_idx=None,
    dt_limit=(0.0, float("inf")),
    rmsnorm_weight=None,
    outproj_weight=None,
    **_,
):
    """The fused Mamba2 training forward as megatron's `_ssm_training` calls it (see the module docstring)."""
    if seq_idx is not None or rmsnorm_weight is not None or outproj_weight is not None or D.dim() != 1:
        raise NotImplementedError("CPU Mamba scan: packed sequences, fused norm/out_proj and D per channel absent")
    heads = A.shape[0]
    d_inner = heads * headdim
    state = (conv1d_weight.shape[0] - d_inner) // (2 * ngroups)
    z, xbc, dt = zxbcdt.split([d_inner, d_inner + 2 * ngroups * state, heads], dim=-1)
    xbc = causal_conv1d(xbc, conv1d_weight, conv1d_bias, activation)
    x, B, C = xbc.split([d_inner, ngroups * state, ngroups * state], dim=-1)
    dt = F.softplus(dt.float() + dt_bias.float()).clamp(*dt_limit)
    b, length = x.shape[:2]
    y = selective_scan(
        x.float().view(b, length, heads, headdim),
        dt,
        A.float(),
        B.float().view(b, length, ngroups, state),
        C.float().view(b, length, ngroups, state),
        D.float(),
    )
    return (y.reshape(b, length, d_inner) * F.silu(z.float())).to(zxbcdt.dtype)


def gated_rms_norm_forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """`mamba_ssm`'s gated RMSNorm module (norm after the gate): x * silu(z) if z is given, RMS-normalized over each
    group of `group_size` channels, times the weight."""
    dtype = x.dtype
    x = x.float()
    if z is not None:
        x = x * F.silu(z.float())
    groups = x.unflatten(-1, (-1, self.group_size or x.shape[-1]))
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
    return (groups.flatten(-2) * self.weight.float()).to(dtype)


def _is_stand_in(package: str) -> bool:
    """The package in sys.modules is a test stand-in (built in memory, no file), not the real one."""
    module = sys.modules.get(package)
    return module is not None and getattr(module, "__file__", None) is None


def install_mamba_kernels() -> None:
    """Give megatron's Mamba mixer the CPU scan and gated norm; only over the stand-in `mamba_ssm` (a real one keeps
    its kernels). Call after `tiny_hybrid.install_mamba_shim`, before the model runs."""
    from megatron.core.ssm import mamba_mixer

    if not _is_stand_in("mamba_ssm"):
        return
    mamba_mixer.mamba_split_conv1d_scan_combined = mamba_split_conv1d_scan_combined
    norm_class = mamba_mixer.RMSNormGated
    if norm_class.forward is torch.nn.Module.forward:
        norm_class.forward = gated_rms_norm_forward


def install_gated_delta_kernels() -> None:
    """Give megatron's gated delta-net its own torch delta rule in place of fla's kernel; only over the stand-in
    `fla`. Call after `tiny_qwen3_next.install_fla_shim`."""
    from megatron.core.ssm import gated_delta_net

    if not _is_stand_in("fla"):
        return
    gated_delta_net.chunk_gated_delta_rule = gated_delta_net.torch_chunk_gated_delta_rule
