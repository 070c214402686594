"""The fused layouts, each declared once with its inverse: split for export, merge for import (pure tensor math).

- Fused output rows of one Megatron linear over the HF modules it feeds (`row_blocks`): query groups (GQA:
  `[q heads of group g; k_g; v_g]` per group, groups split over TP), gate/up (`[gate_t; up_t]` per TP rank) and a
  Mamba mixer's in_proj (`[z_t; x_t; B_t; C_t; dt_t]` per TP rank, HF `[z; x; B; C; dt]`), gated attention
  (`[q heads; their gates; k; v]` per query group, HF q_proj `[q_h; gate_h]` per head) and a gated delta-net's in_proj
  (`[q_t; k_t; v_t; z_t; b_t; a_t]` per TP rank, HF in_proj_qkvz and in_proj_ba interleaved per key head).
  The planner turns the blocks into placements, which the export (live and offline) copies forward and the
  import reads backwards; `split_rows` and `merge_rows` are the same blocks applied to whole tensors.
- The rows of a tensor as torch_dist stored it at TP > 1 (`stored_row_pieces`, `store_rows`; core/registry.py
  says which tensors are stored which way).
- Experts stacked into transformers v5's fused parameters as peft targets them (`stack_experts`,
  `unstack_experts`): lora_A expert-major rows, lora_B rank-major columns; the rows of the HF modules one fused
  parameter stands for either follow each other (`[gate; up]`) or alternate (GPT-OSS: gate row j at 2j, up row j at
  2j+1), `join_rows` / `part_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .archs import Layout, RowOrder
    from .geometry import ModelGeometry
    from .registry import StoredRows

Block = tuple[int, int, int, int]
"""(HF module index, HF start row, local start row, rows)."""


def row_blocks(
    layout: Layout,
    out_features: tuple[int, ...],
    megatron_out: int,
    geometry: ModelGeometry,
    tp_rank: int,
    tp_size: int,
) -> list[Block]:
    """The output rows a TP rank holds of a fused linear, as blocks of the HF modules it feeds.

    `plain`: one module; rows past `out_features[0]` (a padded vocabulary) belong to none and are dropped."""
    if layout == "qkv":
        groups = geometry.num_query_groups // tp_size
        hpg, d = geometry.heads_per_group, geometry.head_dim
        per_group = (hpg + 2) * d
        blocks = []
        for j in range(groups):
            g, base = tp_rank * groups + j, j * per_group
            blocks += [
                (0, g * hpg * d, base, hpg * d),
                (1, g * d, base + hpg * d, d),
                (2, g * d, base + (hpg + 1) * d, d),
            ]
        return blocks
    if layout == "gate_up":
        rows = out_features[0] // tp_size
        return [(0, tp_rank * rows, 0, rows), (1, tp_rank * rows, rows, rows)]
    if layout == "mamba_in":
        return _mamba_in_blocks(geometry, tp_rank, tp_size)
    if layout == "qkv_gated":
        return _gated_qkv_blocks(geometry, tp_rank, tp_size)
    if layout == "gdn_in":
        return _gdn_in_blocks(geometry, tp_rank, tp_size)
    rows = megatron_out // tp_size
    start = tp_rank * rows
    kept = max(0, min(rows, out_features[0] - start))
    return [(0, start, 0, kept)] if kept else []


def mamba_in_parts(geometry: ModelGeometry) -> tuple[int, ...]:
    """The rows of z, x, B, C and dt in a Mamba mixer's in_proj (whole model; each splits evenly over TP)."""
    d_inner = geometry.mamba_d_inner
    bc = (geometry.mamba_num_groups or 0) * (geometry.mamba_state_dim or 0)
    return (d_inner, d_inner, bc, bc, geometry.mamba_num_heads or 0)


def _mamba_in_blocks(geometry: ModelGeometry, tp_rank: int, tp_size: int) -> list[Block]:
    """megatron's MambaMixer: rank t holds `[z_t; x_t; B_t; C_t; dt_t]`, each its 1/tp of the part (heads for z, x
    and dt, groups for B and C); HF's in_proj is `[z; x; B; C; dt]`."""
    blocks, hf_start, local = [], 0, 0
    for rows in mamba_in_parts(geometry):
        per_rank = rows // tp_size
        blocks.append((0, hf_start + tp_rank * per_rank, local, per_rank))
        hf_start, local = hf_start + rows, local + per_rank
    return blocks


def _gated_qkv_blocks(geometry: ModelGeometry, tp_rank: int, tp_size: int) -> list[Block]:
    """megatron's linear_qkv with attention_output_gate: per query group `[q heads; their gates; k; v]`
    (attention.py get_query_key_value_tensors); HF q_proj holds `[q_h; gate_h]` per head h (Qwen3-Next)."""
    groups = geometry.num_query_groups // tp_size
    hpg, d = geometry.heads_per_group, geometry.head_dim
    blocks = []
    for j in range(groups):
        g, base = tp_rank * groups + j, j * (2 * hpg + 2) * d
        for k in range(hpg):
            h = g * hpg + k
            blocks += [(0, 2 * h * d, base + k * d, d), (0, (2 * h + 1) * d, base + (hpg + k) * d, d)]
        blocks += [(1, g * d, base + 2 * hpg * d, d), (2, g * d, base + (2 * hpg + 1) * d, d)]
    return blocks


def _gdn_in_blocks(geometry: ModelGeometry, tp_rank: int, tp_size: int) -> list[Block]:
    """megatron's GatedDeltaNet.in_proj: rank t holds `[q_t; k_t; v_t; z_t; b_t; a_t]`, its key heads' q and k, their
    value heads' v, z, b and a (gated_delta_net.py splits them so). HF's in_proj_qkvz is per key head g
    `[q_g; k_g; v_g; z_g]` and in_proj_ba `[b_g; a_g]`, v, z, b and a being the value heads g serves
    (modeling_qwen3_next.fix_query_key_value_ordering)."""
    nk, nv = geometry.linear_num_key_heads or 0, geometry.linear_num_value_heads or 0
    hk, hv = geometry.linear_key_head_dim or 0, geometry.linear_value_head_dim or 0
    r, keys = nv // nk, nk // tp_size
    qk, v = keys * hk, keys * r * hv  # this rank's rows of each of q, k and of each of v, z
    width = 2 * hk + 2 * r * hv
    blocks = []
    for j in range(keys):
        g = tp_rank * keys + j
        blocks += [
            (0, g * width, j * hk, hk),
            (0, g * width + hk, qk + j * hk, hk),
            (0, g * width + 2 * hk, 2 * qk + j * r * hv, r * hv),
            (0, g * width + 2 * hk + r * hv, 2 * qk + v + j * r * hv, r * hv),
            (1, g * 2 * r, 2 * qk + 2 * v + j * r, r),
            (1, g * 2 * r + r, 2 * qk + 2 * v + keys * r + j * r, r),
        ]
    return blocks


def split_rows(
    shards: Sequence[torch.Tensor], layout: Layout, out_features: tuple[int, ...], geometry: ModelGeometry
) -> list[torch.Tensor]:
    """The TP shards of a fused linear's rows -> one tensor per HF module (export's direction)."""
    tp_size = len(shards)
    megatron_out = shards[0].shape[0] * tp_size
    out = [shards[0].new_empty((n, *shards[0].shape[1:])) for n in out_features]
    for t, shard in enumerate(shards):
        for i, dst, src, rows in row_blocks(layout, out_features, megatron_out, geometry, t, tp_size):
            out[i][dst : dst + rows] = shard[src : src + rows]
    return out


def merge_rows(
    hf: Sequence[torch.Tensor], layout: Layout, megatron_out: int, geometry: ModelGeometry, tp_size: int
) -> list[torch.Tensor]:
    """One tensor per HF module -> the TP shards of the fused linear's rows (import's direction; padded rows zero)."""
    out_features = tuple(t.shape[0] for t in hf)
    shards = []
    for t in range(tp_size):
        shard = hf[0].new_zeros((megatron_out // tp_size, *hf[0].shape[1:]))
        for i, dst, src, rows in row_blocks(layout, out_features, megatron_out, geometry, t, tp_size):
            shard[src : src + rows] = hf[i][dst : dst + rows]
        shards.append(shard)
    return shards


def stored_row_pieces(layout: StoredRows, rows_total: int, tp_size: int) -> list[tuple[tuple[int, int], ...]]:
    """Per TP rank of the save: the (start, length) row ranges of a stored tensor that, concatenated, are its shard."""
    if layout == "rank_blocks":
        step = rows_total // tp_size
        return [((t * step, step),) for t in range(tp_size)]
    if layout == "rank_halves":
        half = rows_total // (2 * tp_size)
        return [((t * half, half), (rows_total // 2 + t * half, half)) for t in range(tp_size)]
    return [((0, rows_total),)]


def store_rows(layout: StoredRows, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The TP shards of one tensor -> the tensor torch_dist stores (the inverse of `stored_row_pieces`)."""
    if layout == "rank_halves":
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if layout == "whole" and len(shards) != 1:
        raise ValueError(f"a whole stored tensor is one shard, found {len(shards)}")
    return torch.cat(list(shards))


def join_rows(parts: Sequence[torch.Tensor], order: RowOrder) -> torch.Tensor:
    """The rows of the HF modules one fused parameter stands for, in its order (the inverse of `part_rows`).

    `blocks`: each module's rows after the previous one's; `interleaved`: row j of module k at j * len(parts) + k
    (all modules have the same rows)."""
    if order == "interleaved":
        return torch.stack(list(parts), dim=1).flatten(0, 1)
    return torch.cat(list(parts))


def part_rows(joined: torch.Tensor, modules: int, order: RowOrder) -> list[torch.Tensor]:
    """A fused parameter's rows -> one tensor per HF module it stands for (the inverse of `join_rows`)."""
    if order == "interleaved":
        return [joined[k::modules].contiguous() for k in range(modules)]
    return [rows.contiguous() for rows in joined.chunk(modules)]


def stack_experts(
    a: Sequence[torch.Tensor], b: Sequence[Sequence[torch.Tensor]], order: RowOrder = "blocks"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert: one lora_A [r, in] and the lora_B [rows, r] of each HF module it feeds (in order) -> peft's fused
    lora_A [experts * r, in] (expert e's rows at e*r...) and lora_B [sum(rows), r * experts] (column j*experts + e is
    expert e's column j; its rows the modules' rows joined in `order`, `join_rows`), filled in place."""
    rows = [t.shape[0] for t in b[0]]
    r = a[0].shape[0]
    first = b[0][0]
    fused = torch.empty((sum(rows), r, len(b)), dtype=first.dtype, device=first.device)
    dst, src = [], []
    for e, per_expert in enumerate(b):
        if order == "interleaved":
            dst += [fused[k :: len(per_expert), :, e] for k in range(len(per_expert))]
            src += list(per_expert)
            continue
        start = 0
        for j, t in enumerate(per_expert):
            dst.append(fused[start : start + rows[j], :, e])
            src.append(t)
            start += rows[j]
    torch._foreach_copy_(dst, src)
    return torch.cat(list(a)), fused.flatten(1)


def unstack_experts(
    a: torch.Tensor, b: torch.Tensor, r: int, modules: int, order: RowOrder = "blocks"
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The inverse of `stack_experts`: per expert, its lora_A and the lora_B of each of its `modules` HF modules."""
    count = a.shape[0] // r
    b_by_expert = b.unflatten(1, (r, count))  # rank-major columns: [out, r, experts]
    return [(a_e, part_rows(b_by_expert[..., e], modules, order)) for e, a_e in enumerate(a.split(r))]
