"""Reference logits from the training model at save time: the probe, the forward pass, the gathers.

Collective over the default process group: every rank of the job calls `capture_reference` at the
same save. The model runs in eval mode under no_grad through megatron's own pipeline schedule
(forward only, any PP / VPP layout) with an explicit causal mask and position ids; the last stage
gathers the vocab-parallel logits over TP; global rank 0 (on any stage) receives them, drops
Megatron's padded vocabulary columns and also collects each transformer block's attention and MLP
outputs, projected on a few fixed random directions, for `verify.first_divergence`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ExportError
from .verify import Reference, VerifyConfig, projection

PROJECTION_DIM = 16
PROJECTION_SEED = 1234
_MEGATRON_BLOCK = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.(self_attention|mlp)$")
_KIND = {"self_attention": "self_attn", "mlp": "mlp"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _inner(chunk: torch.nn.Module) -> torch.nn.Module:
    """The megatron-core model inside its wrappers (DDP, Float16Module, FSDP), each of which holds it as `.module`
    (megatron's DDP has a `config` too, so having one does not end the search)."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def make_probe(config: VerifyConfig, vocab: int, max_length: int | None) -> tuple[torch.Tensor, str]:
    """Token ids [batch, seq] and a description: the prompt's tokens, or deterministic ids below `vocab`."""
    length = min(config.probe_length, max_length) if max_length else config.probe_length
    if config.prompt is not None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, local_files_only=True)
        except Exception as exc:
            raise ExportError(
                f"cannot load the probe tokenizer from {config.tokenizer!r}: {exc}; expected a local HF tokenizer "
                f"directory"
            ) from exc
        ids = tokenizer(config.prompt)["input_ids"][:length]
        if not ids or max(ids) >= vocab:
            raise ExportError(
                f"the probe prompt gives {len(ids)} token(s) (largest id {max(ids, default=None)}); expected 1 or "
                f"more, below {vocab}"
            )
        return torch.tensor([ids], dtype=torch.long), f"prompt, {len(ids)} tokens"
    gen = torch.Generator().manual_seed(config.probe_seed)
    ids = torch.randint(0, vocab, (config.probe_batch, length), generator=gen)
    return ids, f"token ids, seed {config.probe_seed}, below {vocab}"


def _agree_on_probe(
    config: VerifyConfig, hf_vocab: int | None, megatron_vocab: int, max_length: int | None, tp: int
) -> tuple[torch.Tensor, int | None, str]:
    """Rank 0 builds the probe (it may need a tokenizer) and tells everyone, errors included."""
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            # Without the HF config, stay below Megatron's padding (at most 128 ids per TP rank).
            vocab = hf_vocab or max(1, megatron_vocab - 128 * tp)
            ids, source = make_probe(config, min(vocab, megatron_vocab), max_length)
            box[0] = (ids, hf_vocab, source)
        except Exception as exc:  # every rank must hear of it, or the others wait in the broadcast
            box[0] = (
                exc
                if isinstance(exc, ExportError)
                else ExportError(f"building the probe failed: {type(exc).__name__}: {exc}")
            )
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], ExportError):
        raise box[0]
    return box[0]


def _forward(chunks: list[torch.nn.Module], tokens: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """The last stage's logits per sample ([1, seq, vocab / TP] each), via megatron's schedule; [] elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    pp = ps.get_pipeline_model_parallel_world_size()
    n_micro = -(-batch // pp) * pp if len(chunks) > 1 else batch  # the interleaved schedule wants a multiple of PP
    micro = [tokens[i % batch : i % batch + 1].to(device) for i in range(n_micro)]
    position_ids = torch.arange(seq, device=device).unsqueeze(0)
    causal_mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device), diagonal=1)

    def forward_step(data_iterator, model):
        return model(next(data_iterator), position_ids, causal_mask), lambda output, non_loss_data=False: output

    collected = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro) for _ in chunks],
        model=chunks,
        num_microbatches=n_micro,
        seq_length=seq,
        micro_batch_size=1,
        forward_only=True,
        collect_non_loss_data=True,
    )
    return list(collected or [])[:batch]


def _block_recorders(chunks: list[torch.nn.Module]) -> tuple[dict[tuple[int, str], list[torch.Tensor]], list]:
    """Forward hooks keeping each transformer block's attention / MLP output, keyed by global layer."""
    records: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
    handles = []
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if not (match := _MEGATRON_BLOCK.search(name)):
                continue
            layer = chunk.get_submodule(name.rsplit(".", 1)[0])
            key = (getattr(layer, "layer_number", int(match.group(1)) + 1) - 1, _KIND[match.group(2)])

            def hook(_module, _inputs, output, key=key):  # a copy: megatron adds the residual into it in place
                records[key].append((output[0] if isinstance(output, (tuple, list)) else output).detach().clone())

            handles.append(module.register_forward_hook(hook))
    return records, handles


def _project_blocks(
    records, batch: int, proj: torch.Tensor, sequence_parallel: bool
) -> dict[tuple[int, str], torch.Tensor]:
    """[batch, seq, PROJECTION_DIM] per block (collective over TP under sequence parallelism)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    out = {}
    for key in sorted(records):
        rows = []
        for hidden in records[key][:batch]:  # [seq (/ TP with SP), 1, hidden]
            if sequence_parallel:
                hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            rows.append(hidden.float().transpose(0, 1).cpu() @ proj)
        out[key] = torch.cat(rows, dim=0)
    return out


def _run_probe(chunks: list, ids: torch.Tensor, device: Any, out_vocab: int) -> tuple[Any, dict]:
    """One eval forward of the probe: the last pipeline stage's logits (gathered over TP, cut to `out_vocab`; None
    elsewhere) and this rank's projected block outputs. Restores every module's train/eval mode."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    mconfig = _inner(chunks[0]).config
    modes = [(m, m.training) for chunk in chunks for m in chunk.modules()]
    records, handles = _block_recorders(chunks)
    try:
        for chunk in chunks:
            chunk.eval()
        with torch.no_grad():
            outputs = _forward(chunks, ids, device)
            logits = None
            if ps.is_pipeline_last_stage(ignore_virtual=True):
                logits = torch.cat(outputs, dim=0)
                logits = gather_from_tensor_model_parallel_region(logits).float()[..., :out_vocab].contiguous()
            proj = projection(mconfig.hidden_size, PROJECTION_SEED, PROJECTION_DIM)
            blocks = _project_blocks(records, ids.shape[0], proj, bool(getattr(mconfig, "sequence_parallel", False)))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return logits, blocks


def _collect_on_rank0(logits: Any, blocks: dict, shape: tuple, out_vocab: int, device: Any) -> tuple[Any, dict]:
    """Rank 0 receives the logits from the first rank that has them and the block outputs of one rank per
    pipeline stage (TP rank 0, DP rank 0); other ranks get (None, {})."""
    from megatron.core import parallel_state as ps

    rank, world = dist.get_rank(), dist.get_world_size()
    source_rank = torch.tensor([rank if logits is not None else world], device=device)
    dist.all_reduce(source_rank, op=dist.ReduceOp.MIN)
    src = int(source_rank.item())
    if rank == src and src != 0:
        dist.send(logits, dst=0)
    elif rank == 0 and src != 0:
        logits = torch.empty(*shape, out_vocab, dtype=torch.float32, device=device)
        dist.recv(logits, src=src)
    is_block_source = (
        ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    )
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(blocks if is_block_source else {}, gathered, dst=0)
    if rank != 0:
        return None, {}
    return logits, {k: v for part in gathered for k, v in (part or {}).items()}


def capture_reference(
    model: Any, config: VerifyConfig, *, iteration: int, hf_vocab: int | None = None
) -> Reference | None:
    """The training model's logits on the probe. Collective: every rank calls it; rank 0 gets the Reference, others
    None.

    `model` is this rank's megatron-core model, a wrapped one, or its list of virtual-pipeline chunks;
    `hf_vocab` (read on rank 0) is the base model's real vocabulary size when known. The model's
    train/eval modes are restored afterwards.
    """
    from megatron.core import parallel_state as ps

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    inner = _inner(chunks[0])
    if ps.get_context_parallel_world_size() > 1:
        raise ExportError(
            "reference logits at context parallel size > 1 are not supported; expected --context-parallel-size 1 "
            "(verification is skipped)"
        )
    megatron_vocab = int(inner.vocab_size)
    tp = ps.get_tensor_model_parallel_world_size()
    ids, hf_vocab, source = _agree_on_probe(
        config, hf_vocab, megatron_vocab, getattr(inner, "max_sequence_length", None), tp
    )
    first = next(chunks[0].parameters())
    device, model_dtype = first.device, _DTYPE_NAMES.get(first.dtype, str(first.dtype))
    out_vocab = min(hf_vocab, megatron_vocab) if hf_vocab else megatron_vocab
    logits, blocks = _run_probe(chunks, ids, device, out_vocab)
    logits, all_blocks = _collect_on_rank0(logits, blocks, ids.shape, out_vocab, device)
    if dist.get_rank() != 0:
        return None
    metadata = {
        "iteration": iteration,
        "model_dtype": model_dtype,
        "megatron_vocab": megatron_vocab,
        "hf_vocab": hf_vocab or "",
        "probe": source,
        "projection_seed": PROJECTION_SEED,
        "tensor_parallel": tp,
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "created_by": "megatron-peft-export",
    }
    return Reference(ids, logits.cpu(), all_blocks, {k: str(v) for k, v in metadata.items()})
