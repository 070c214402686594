"""Verification: the logits of HF base + exported adapter against the training model's, on a fixed probe.

The training model's logits (and, per transformer block, a random projection of the attention and
MLP outputs) are captured at save time into `verification/reference.safetensors` inside the adapter
directory (`reference.py`). This module loads the base model with transformers and the adapter with
peft, fails on any adapter key peft would ignore or leave unfilled, and compares: max and mean
absolute difference, top-1 and top-k agreement, KL divergence, the adapter's effect (HF base +
adapter against HF base alone) and, when the logits disagree, the first block whose output
diverges. The result goes to `verification.json` beside the adapter files.

No torch.distributed, no megatron: transformers and peft are imported only when a model is loaded.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..config import VerifyConfig
from ..errors import ExportError, VerificationInputError
from ..io.safetensors_in import open_safetensors

log = logging.getLogger("megatron_peft_export")
REFERENCE_FILE = "verification/reference.safetensors"
RESULT_FILE = "verification.json"
_BLOCK = re.compile(r"^blocks\.(\d+)\.(self_attn|mlp)$")
_HF_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)$")


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits on the metrics."""

    max_abs_diff: float
    mean_abs_diff: float
    min_top1_agreement: float
    min_topk_agreement: float
    max_kl_divergence: float
    block_rel_diff: float
    """Relative difference at which a block's output counts as diverged (diagnosis only)."""

    @classmethod
    def resolve(cls, config: VerifyConfig, precision: str) -> Thresholds:
        """The defaults for `precision`, overridden by every limit the config sets."""
        default = DEFAULT_THRESHOLDS[precision]
        return cls(
            **{
                f.name: getattr(config, f.name, None)
                if getattr(config, f.name, None) is not None
                else getattr(default, f.name)
                for f in fields(cls)
            }
        )


DEFAULT_THRESHOLDS = {
    "float32": Thresholds(
        max_abs_diff=1e-3,
        mean_abs_diff=1e-4,
        min_top1_agreement=0.98,
        min_topk_agreement=0.95,
        max_kl_divergence=1e-5,
        block_rel_diff=1e-4,
    ),
    "bfloat16": Thresholds(
        max_abs_diff=1.0,
        mean_abs_diff=0.1,
        min_top1_agreement=0.9,
        min_topk_agreement=0.8,
        max_kl_divergence=0.05,
        block_rel_diff=5e-2,
    ),
}
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def precision_of(*dtypes: str | None) -> str:
    """float32 only when every dtype involved is float32 (the model's and the verification's)."""
    return "float32" if all(d in (None, "float32", "torch.float32") for d in dtypes) else "bfloat16"


# ------------------------------------------------------------------------------ reference


@dataclass
class Reference:
    """What the training model computed on the probe at save time."""

    input_ids: torch.Tensor
    logits: torch.Tensor
    blocks: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    """(global layer, "self_attn" | "mlp") -> the block output projected on `projection`'s directions."""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def iteration(self) -> int | None:
        value = self.metadata.get("iteration")
        return int(value) if value not in (None, "") else None


def projection(hidden_size: int, seed: int, dim: int) -> torch.Tensor:
    """The fixed random directions [hidden, dim] block outputs are projected on (identical on both sides)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(hidden_size, dim, generator=gen) / dim**0.5


def reference_bytes(reference: Reference) -> bytes:
    from safetensors.torch import save

    tensors = {"input_ids": reference.input_ids.contiguous(), "logits": reference.logits.float().contiguous()}
    tensors.update({f"blocks.{layer}.{kind}": t.float().contiguous() for (layer, kind), t in reference.blocks.items()})
    return save(tensors, metadata={"format": "pt", **{k: str(v) for k, v in reference.metadata.items()}})


MAX_PROJECTION_DIM = 1024
"""Block outputs are projected on PROJECTION_DIM (16) directions; a reference claiming more is refused."""


def load_reference(path: str | Path, *, within: str | Path | None = None) -> Reference:
    """The reference logits file, checked: a regular file (inside `within`, the adapter directory, for the default one),
    logits [batch, seq, vocab] over non-negative token ids [batch, seq], block projections [batch, seq, dim], and
    metadata whose numbers are numbers. Anything else is a VerificationInputError."""
    path = Path(path)
    tensors, metadata = _read_reference(path, within)
    if "logits" not in tensors or "input_ids" not in tensors:
        raise VerificationInputError(f"{path}: expected tensors 'logits' and 'input_ids', found {sorted(tensors)[:8]}")
    logits, ids = tensors.pop("logits"), tensors.pop("input_ids")
    _check_probe(path, logits, ids, metadata)
    blocks = {(int(m.group(1)), m.group(2)): t for k, t in tensors.items() if (m := _BLOCK.match(k))}
    _check_blocks(path, blocks, tuple(ids.shape))
    return Reference(ids.long(), logits.float(), blocks, metadata)


def _read_reference(path: Path, within: str | Path | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.lexists(path):
        raise VerificationInputError(
            f"no reference logits at {path}; expected {REFERENCE_FILE} inside the adapter (written at save time by "
            f"the hook's verify option) or --reference FILE"
        )
    with open_safetensors(
        path, within=within, error=VerificationInputError, what="reference logits (safetensors)"
    ) as f:
        return {k: f.tensor(k) for k in f.keys()}, dict(f.metadata)


def _check_probe(path: Path, logits: torch.Tensor, ids: torch.Tensor, metadata: dict[str, str]) -> None:
    if logits.dim() != 3 or ids.dim() != 2 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise VerificationInputError(
            f"{path}: expected logits [batch, seq, vocab] over input_ids [batch, seq], found {tuple(logits.shape)} "
            f"and {tuple(ids.shape)}"
        )
    if logits.numel() == 0:
        raise VerificationInputError(
            f"{path}: the probe is empty (logits {tuple(logits.shape)}); expected at least one token and a vocabulary, "
            "as the hook captures at save time. Capture the reference again"
        )
    for name, low, high in (("iteration", 0, 2**63 - 1), ("projection_seed", 0, 2**63 - 1)):
        value = metadata.get(name)
        if value not in (None, "") and not (re.fullmatch(r"\d{1,19}", value) and low <= int(value) <= high):
            raise VerificationInputError(
                f"{path}: metadata {name} is {value!r:.40}; expected a non-negative integer. Capture the reference "
                f"again"
            )
    if (
        not logits.is_floating_point()
        or not torch.isfinite(logits).all()
        or ids.is_floating_point()
        or ids.dtype == torch.bool
        or (ids.numel() and ids.min().item() < 0)
    ):
        raise VerificationInputError(
            f"{path}: expected finite reference logits and non-negative integer token ids; the reference is "
            f"corrupt or the model diverged at save time"
        )


def _check_blocks(path: Path, blocks: dict[tuple[int, str], torch.Tensor], probe: tuple[int, ...]) -> None:
    odd = sorted(
        f"blocks.{layer}.{kind} {tuple(t.shape)}"
        for (layer, kind), t in blocks.items()
        if t.dim() != 3
        or tuple(t.shape[:2]) != probe
        or not 1 <= t.shape[-1] <= MAX_PROJECTION_DIM
        or not t.is_floating_point()
    )
    if odd or len({t.shape[-1] for t in blocks.values()}) > 1:
        raise VerificationInputError(
            f"{path}: expected every block output projected to [batch, seq, dim] floats of one dim up to "
            f"{MAX_PROJECTION_DIM}, found {', '.join(odd[:3]) or 'several dims'}; "
            "capture the reference again"
        )


def check_base_model_files(base_dir: str | Path) -> None:
    """The base model directory's files must be regular files or directories: transformers would block on a FIFO."""
    try:
        entries = list(os.scandir(base_dir))
    except OSError as exc:
        raise VerificationInputError(
            f"{base_dir}: cannot be listed ({exc.strerror or exc}); expected an HF model directory"
        ) from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue  # a dangling link: transformers reports it if it needs the file
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise VerificationInputError(
                f"{entry.path}: expected a regular file of the base model, found a FIFO, socket or device"
            )


# -------------------------------------------------------------------------------- metrics


def compare_logits(hf: torch.Tensor, reference: torch.Tensor, base: torch.Tensor, top_k: int) -> dict[str, float]:
    """Agreement of HF logits with the reference, and the adapter's effect; all [batch, seq, vocab]."""
    hf, reference, base = hf.double(), reference.double(), base.double()
    diff = (hf - reference).abs()
    k = min(top_k, hf.shape[-1])
    hf_top, ref_top = hf.topk(k, dim=-1).indices, reference.topk(k, dim=-1).indices
    overlap = (hf_top.unsqueeze(-1) == ref_top.unsqueeze(-2)).any(-1).double().sum(-1) / k
    log_p, log_q = reference.log_softmax(-1), hf.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)
    effect, reference_effect = (hf - base).abs(), (reference - base).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "top1_agreement": (hf.argmax(-1) == reference.argmax(-1)).double().mean().item(),
        "topk_agreement": overlap.mean().item(),
        "kl_divergence": kl.mean().item(),
        "adapter_effect_max": effect.max().item(),
        "adapter_effect_mean": effect.mean().item(),
        "reference_effect_max": reference_effect.max().item(),
    }


def threshold_failures(metrics: dict[str, float], limits: Thresholds, k: int) -> list[str]:
    """One message per metric outside its limit."""
    checks = [
        ("max |HF - Megatron| logit difference", metrics["max_abs_diff"], limits.max_abs_diff, "max_abs_diff", True),
        (
            "mean |HF - Megatron| logit difference",
            metrics["mean_abs_diff"],
            limits.mean_abs_diff,
            "mean_abs_diff",
            True,
        ),
        ("top-1 agreement", metrics["top1_agreement"], limits.min_top1_agreement, "min_top1_agreement", False),
        (f"top-{k} agreement", metrics["topk_agreement"], limits.min_topk_agreement, "min_topk_agreement", False),
        ("KL(Megatron || HF)", metrics["kl_divergence"], limits.max_kl_divergence, "max_kl_divergence", True),
    ]
    return [  # written so that NaN fails every check
        f"{what} {value:.3g} {'>' if upper else '<'} {limit:.3g} (verify.{name})"
        for what, value, limit, name, upper in checks
        if not (value <= limit if upper else value >= limit)
    ]


def key_failures(file_keys: set[str], loaded_keys: set[str]) -> list[str]:
    """Keys peft ignores (no module of that name) and adapter weights the file leaves at their initial values."""
    ignored, unfilled = sorted(file_keys - loaded_keys), sorted(loaded_keys - file_keys)
    out = []
    if ignored:
        out.append(
            f"{len(ignored)} adapter key(s) match no module of the base model, so peft silently ignores them: "
            f"{', '.join(ignored[:8])}{' ...' if len(ignored) > 8 else ''}"
        )
    if unfilled:
        out.append(
            f"{len(unfilled)} adapter weight(s) of targeted modules are missing from the file, so peft leaves them "
            f"at their initial values: {', '.join(unfilled[:8])}{' ...' if len(unfilled) > 8 else ''}"
        )
    return out


def first_divergence(
    hf_blocks: dict[tuple[int, str], torch.Tensor], reference: dict[tuple[int, str], torch.Tensor], rel_limit: float
) -> dict[str, Any] | None:
    """The first block (in forward order) whose projected output differs beyond rel_limit of its scale."""
    for key in sorted(set(hf_blocks) & set(reference), key=lambda k: (k[0], k[1] != "self_attn")):
        ref, ours = reference[key].double(), hf_blocks[key].double()
        if ref.shape != ours.shape:
            continue
        diff, scale = (ours - ref).abs().max().item(), max(ref.abs().max().item(), 1e-12)
        if diff > rel_limit * scale:
            return {"layer": key[0], "block": key[1], "max_abs_diff": diff, "relative_diff": diff / scale}
    return None


def _diagnosis(where: dict[str, Any]) -> str:
    layer, block = where["layer"], where["block"]
    modules = (
        "q_proj, k_proj, v_proj, o_proj (fused QKV split, KV head order)"
        if block == "self_attn"
        else "gate_proj, up_proj, down_proj (gate/up order)"
    )
    return (
        f"the outputs first diverge at model.layers.{layer}.{block} (relative difference "
        f"{where['relative_diff']:.2g}; every earlier block agrees): "
        f"check the adapter's {modules} of layer {layer}"
    )


def top_k_rows(
    input_ids: torch.Tensor, hf: torch.Tensor, reference: torch.Tensor, k: int, decode=None
) -> list[dict[str, Any]]:
    """One row per probe position: the HF model's and the Megatron model's top-k tokens with their logits."""
    k = min(k, hf.shape[-1])
    hf_top, ref_top = hf.float().topk(k, dim=-1), reference.float().topk(k, dim=-1)
    rows = []
    for b in range(input_ids.shape[0]):
        for s in range(input_ids.shape[1]):
            h_ids, m_ids = hf_top.indices[b, s].tolist(), ref_top.indices[b, s].tolist()
            row = {
                "sample": b,
                "position": s,
                "input_id": int(input_ids[b, s]),
                "hf_top_k": h_ids,
                "hf_logits": [round(v, 5) for v in hf_top.values[b, s].tolist()],
                "megatron_top_k": m_ids,
                "megatron_logits": [round(v, 5) for v in ref_top.values[b, s].tolist()],
                "top1_match": h_ids[0] == m_ids[0],
            }
            if decode is not None:
                row.update(
                    input_token=decode([row["input_id"]]),
                    hf_tokens=[decode([i]) for i in h_ids],
                    megatron_tokens=[decode([i]) for i in m_ids],
                )
            rows.append(row)
    return rows


def histogram(values: torch.Tensor, bins: int = 64) -> dict[str, list[float]]:
    """Counts and bin edges of the signed logit differences (for W&B and verification.json)."""
    values = values.double().flatten()
    low, high = values.min().item(), values.max().item()
    if high <= low:
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(values, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    return {"counts": [int(c) for c in counts.tolist()], "edges": edges.tolist()}


# ------------------------------------------------------------------------------- result


@dataclass
class VerificationResult:
    """What verification.json holds; `passed` and the scalar fields at the top level."""

    status: str
    """passed, failed or skipped."""
    summary: str
    adapter: str
    base_model: str | None = None
    reference: str | None = None
    iteration: int | None = None
    precision: str | None = None
    dtype: str | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    top1_agreement: float | None = None
    topk_agreement: float | None = None
    top_k: int | None = None
    kl_divergence: float | None = None
    adapter_effect_max: float | None = None
    adapter_effect_mean: float | None = None
    reference_effect_max: float | None = None
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    keys: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    first_divergence: dict[str, Any] | None = None
    logit_diff_histogram: dict[str, list[float]] | None = None
    top_k_table: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def metrics(self) -> dict[str, float]:
        names = (
            "max_abs_diff",
            "mean_abs_diff",
            "top1_agreement",
            "topk_agreement",
            "kl_divergence",
            "adapter_effect_max",
            "adapter_effect_mean",
            "reference_effect_max",
        )
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, **asdict(self)}

    def write(self, adapter_dir: str | Path, path: str | Path | None = None) -> Path:
        """verification.json in the adapter directory (or `path`), replaced atomically; only a previous result is
        replaced.

        A failure (full or read-only disk) raises OutputError and leaves nothing behind (no temporary file)."""
        from ..io.atomic_dir import write_file

        path = check_result_path(Path(path) if path is not None else Path(adapter_dir) / RESULT_FILE)
        return write_file(path, (json.dumps(self.to_json(), indent=2) + "\n").encode(), "the verification result")


MAX_RESULT_BYTES = 64 << 20


def check_result_path(path: str | Path) -> Path:
    """Where a verification result may go: a new file, or a previous result (a JSON object with `passed` and `status`).

    Anything else there (an adapter's weights or config, a reference, a directory, a link, a FIFO) is never replaced:
    OutputError, before any verification runs."""
    from ..errors import OutputError

    path = Path(path)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return path
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOTDIR:
            return path  # a file where a parent directory should be: the write says so
        raise OutputError(f"cannot use {str(path)!r:.200} for the verification result: {exc}") from None
    previous = None
    if stat.S_ISREG(mode) and path.stat().st_size <= MAX_RESULT_BYTES:
        try:
            previous = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            previous = None
    if not (isinstance(previous, dict) and {"passed", "status"} <= previous.keys()):
        kind = (
            "a symbolic link"
            if stat.S_ISLNK(mode)
            else "a directory"
            if stat.S_ISDIR(mode)
            else "a file"
            if stat.S_ISREG(mode)
            else "a special file"
        )
        raise OutputError(
            f"{path} exists and is {kind}, not a verification result; only a previous result is replaced. "
            "Write the result elsewhere (--output FILE). Nothing was written"
        )
    return path


def skipped(adapter_dir: str | Path, reason: str, *, failed: bool, iteration: int | None = None) -> VerificationResult:
    """A verification that could not run: skipped, or `failed` (verify.required, or an input that does not fit)."""
    return VerificationResult(
        status="failed" if failed else "skipped",
        summary=f"verification {'FAILED' if failed else 'skipped'} for {adapter_dir}: {reason}",
        adapter=str(adapter_dir),
        iteration=iteration,
        failures=[reason] if failed else [],
        warnings=[] if failed else [reason],
    )


def _summary(result: VerificationResult) -> str:
    head = f"verification {'PASSED' if result.passed else 'FAILED'} for {result.adapter}"
    if result.max_abs_diff is None:
        return f"{head}: {'; '.join(result.failures)}"
    numbers = (
        f"max|diff| {result.max_abs_diff:.2e}, mean|diff| {result.mean_abs_diff:.2e}, top-1 "
        f"{result.top1_agreement:.1%}, "
        f"top-{result.top_k} {result.topk_agreement:.1%}, KL {result.kl_divergence:.2e}, adapter effect "
        f"{result.adapter_effect_max:.3g} ({result.precision} limits)"
    )
    return f"{head}: {numbers}" + (f"; {'; '.join(result.failures)}" if result.failures else "")


# ------------------------------------------------------------------------- run (HF side)


def resolve_base_model(name: str | None) -> str | None:
    """A local directory, or the cached snapshot of a Hub id; None when neither is on this machine (nothing is
    downloaded)."""
    if not name:
        return None
    if Path(name).is_dir():
        return str(name)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, not a valid id, no huggingface_hub: the same answer
        return None


def _block_hooks(model: torch.nn.Module, proj: torch.Tensor, out: dict[tuple[int, str], torch.Tensor]) -> list:
    handles = []
    for name, module in model.named_modules():
        if match := _HF_BLOCK.search(name):
            key = (int(match.group(1)), match.group(2))

            def hook(_module, _inputs, output, key=key):
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                out[key] = hidden.detach().float().cpu() @ proj

            handles.append(module.register_forward_hook(hook))
    return handles


def verify_adapter(
    adapter_dir: str | Path,
    base_model: str,
    config: VerifyConfig | None = None,
    *,
    reference_path: str | Path | None = None,
) -> VerificationResult:
    """Verify one adapter directory against its reference; never raises for a wrong adapter (that is a failed result).

    Raises VerificationInputError when the adapter, base model or reference cannot be read.
    """

    config = config or VerifyConfig()
    adapter_dir = Path(adapter_dir)
    reference_path = Path(reference_path) if reference_path else adapter_dir / REFERENCE_FILE
    reference, base_dir = _read_inputs(adapter_dir, base_model, reference_path)
    import peft

    precision = precision_of(config.dtype, reference.metadata.get("model_dtype"))
    limits = Thresholds.resolve(config, precision)
    base = _load_base(base_dir, config)
    vocab = base.get_output_embeddings().weight.shape[0]
    ids, ref_logits = _probe_within(reference, reference_path, vocab)
    result = VerificationResult(
        status="failed",
        summary="",
        adapter=str(adapter_dir),
        base_model=str(base_model),
        reference=str(reference_path),
        iteration=reference.iteration,
        precision=precision,
        dtype=config.dtype,
        top_k=min(config.top_k, vocab),
        thresholds=asdict(limits),
        probe={"batch": ids.shape[0], "length": ids.shape[1], "source": reference.metadata.get("probe", "unknown")},
    )
    try:
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()
    except Exception as exc:  # a config peft refuses is a wrong adapter, not a bad input
        result.failures.append(f"peft cannot load the adapter: {type(exc).__name__}: {exc}")
        result.summary = _summary(result)
        return result
    _check_loaded_tensors(model, adapter_dir, result)
    base_logits, hf_logits, hf_blocks = _run_probe(model, base.config.hidden_size, reference, ids, config.device)
    _judge(result, hf_logits, ref_logits, base_logits, hf_blocks, reference, limits)
    decode = _decoder(config.tokenizer or base_dir)
    result.top_k_table = top_k_rows(ids, hf_logits, ref_logits, result.top_k, decode)
    result.logit_diff_histogram = histogram(hf_logits - ref_logits)
    result.status = "failed" if result.failures else "passed"
    result.summary = _summary(result)
    return result


def _read_inputs(adapter_dir: Path, base_model: str, reference_path: Path) -> tuple[Reference, str]:
    """The adapter checked as bad input or not, the reference, and the base model's local directory."""
    from ..io.peft_dir import read_adapter

    # malformed or hostile config, lying header, shapes against the config, NaN/Inf: bad input, before peft sees it
    try:
        read_adapter(adapter_dir, values=True, remedy="an adapter with them cannot be verified")
    except ExportError as exc:
        raise VerificationInputError(str(exc)) from None
    reference = load_reference(
        reference_path, within=None if reference_path != adapter_dir / REFERENCE_FILE else adapter_dir
    )
    base_dir = resolve_base_model(base_model)
    if base_dir is None:
        raise VerificationInputError(
            f"base model {base_model!r} is not available locally; expected an HF model directory (or a Hub id in "
            f"the local cache)"
        )
    check_base_model_files(base_dir)
    return reference, base_dir


def _load_base(base_dir: str, config: VerifyConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = PRECISIONS[config.dtype]
    try:
        return (
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, local_files_only=True).to(config.device).eval()
        )
    except Exception as exc:
        raise VerificationInputError(f"cannot load the base model from {base_dir} with transformers: {exc}") from exc


def _probe_within(reference: Reference, reference_path: Path, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's token ids and reference logits cut to the base model's vocabulary (Megatron pads it)."""
    ids, ref_logits = reference.input_ids, reference.logits
    if ref_logits.shape[-1] < vocab:
        raise VerificationInputError(
            f"{reference_path}: reference logits cover {ref_logits.shape[-1]} tokens, the base model's vocabulary "
            f"{vocab}; is this the right base model?"
        )
    if ids.max().item() >= vocab:
        raise VerificationInputError(
            f"{reference_path}: probe token id {ids.max().item()} is outside the base model's vocabulary ({vocab})"
        )
    return ids, ref_logits[..., :vocab]


def _check_loaded_tensors(model: Any, adapter_dir: Path, result: VerificationResult) -> None:
    """What peft loaded against the file: keys it ignored or missed, tensors changed by loading."""
    import peft

    from ..io.peft_dir import ADAPTER_WEIGHTS, file_tensors

    on_disk = dict(file_tensors(adapter_dir / ADAPTER_WEIGHTS))
    loaded = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    result.failures += key_failures(set(on_disk), set(loaded))
    result.keys = {
        "file": len(on_disk),
        "loaded": len(loaded),
        "ignored_by_peft": sorted(set(on_disk) - set(loaded)),
        "missing_from_file": sorted(set(loaded) - set(on_disk)),
    }
    changed = sorted(
        k
        for k in set(on_disk) & set(loaded)
        if not torch.equal(loaded[k].detach().cpu().to(on_disk[k].dtype), on_disk[k])
    )
    if changed:
        result.failures.append(
            f"{len(changed)} adapter tensor(s) differ after loading (shape or dtype conversion): "
            f"{', '.join(changed[:8])}"
        )


def _run_probe(
    model: Any, hidden_size: int, reference: Reference, ids: torch.Tensor, device: str
) -> tuple[torch.Tensor, torch.Tensor, dict[tuple[int, str], torch.Tensor]]:
    """(base logits, adapter logits, projected block outputs) of the probe."""
    hf_blocks: dict[tuple[int, str], torch.Tensor] = {}
    proj = None
    if reference.blocks:
        dim = next(iter(reference.blocks.values())).shape[-1]
        proj = projection(hidden_size, int(reference.metadata.get("projection_seed") or 0), dim)
    with torch.no_grad():
        tokens = ids.to(device)
        with model.disable_adapter():
            base_logits = model(input_ids=tokens).logits.float().cpu()
        handles = _block_hooks(model, proj, hf_blocks) if proj is not None else []
        try:
            hf_logits = model(input_ids=tokens).logits.float().cpu()
        finally:
            for handle in handles:
                handle.remove()
    return base_logits, hf_logits, hf_blocks


def _judge(
    result: VerificationResult,
    hf_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    base_logits: torch.Tensor,
    hf_blocks: dict[tuple[int, str], torch.Tensor],
    reference: Reference,
    limits: Thresholds,
) -> None:
    """The metrics into `result`, with the failures past the thresholds and the warning of a weak check."""
    metrics = compare_logits(hf_logits, ref_logits, base_logits, result.top_k)
    for name, value in metrics.items():
        setattr(result, name, value)
    numeric = threshold_failures(metrics, limits, result.top_k)
    result.first_divergence = (
        first_divergence(hf_blocks, reference.blocks, limits.block_rel_diff) if reference.blocks else None
    )
    if numeric and result.first_divergence is not None:
        numeric.append(_diagnosis(result.first_divergence))
    result.failures += numeric
    if metrics["reference_effect_max"] <= limits.max_abs_diff:
        result.warnings.append(
            f"the training model's logits differ from the base model's by at most "
            f"{metrics['reference_effect_max']:.2g} (<= max_abs_diff): "
            "the adapter has (almost) no effect yet, so this check cannot tell a correct export from an ignored one"
        )


def _decoder(tokenizer_path: str | None):
    """The tokenizer's decode for readable W&B tables, or None (no tokenizer is not an error)."""
    if not tokenizer_path:
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    except Exception:
        return None
    return tokenizer.decode
