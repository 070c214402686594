"""Serving compatibility: what a server would refuse, or load and silently mis-scale, in an HF LoRA adapter.

Pure: an `adapter_config.json` mapping and the tensor names and shapes in, findings out (severity, what,
why, what to change), for one target server. The rules for vLLM follow its loader:

- `vllm/lora/peft_helper.py` (`PEFTHelper`): r, lora_alpha and target_modules are required; modules_to_save
  and DoRA are refused ("vLLM only supports modules_to_save being None", "vLLM does not yet support DoRA");
  recent versions type `bias` as `Literal["none"]` (older ones needed `--enable-lora-bias`); `validate_legal`
  compares the config's `r` (only that) with `--max-lora-rank`.
- `vllm/lora/lora_weights.py` (`LoRALayerWeights.from_config`): every module gets the one scaling
  `lora_alpha / r` (`/ sqrt(r)` with rsLoRA); `rank_pattern` and `alpha_pattern` are not read.
- `vllm/config/lora.py`: `max_lora_rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16).
- `vllm/lora/lora_model.py` + `worker_manager.py`: a module name outside the model's expected LoRA modules
  (packed modules count by their parts: q_proj/k_proj/v_proj, gate_proj/up_proj) is refused.

The `peft` target checks what `PeftModel.from_pretrained` would get wrong without an error: keys it ignores,
fields it fills with defaults, and ranks that contradict the config.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from .errors import ExportError

log = logging.getLogger("megatron_peft_export")
Severity = Literal["error", "warning", "info"]
TARGETS = ("vllm", "peft")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?\.(?P<param>weight|bias)$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_MEGATRON_NAMES = ("linear_qkv", "self_attention.linear_proj", "linear_fc1", "linear_fc2", ".lora_a_", ".lora_b_", ".adapter.linear_in", ".adapter.linear_out", ".to_wrap.")
_FUSED_NAMES = {"qkv_proj": "q_proj, k_proj, v_proj", "gate_up_proj": "gate_proj, up_proj", "query_key_value": "q_proj, k_proj, v_proj",
                "W_pack": "q_proj, k_proj, v_proj", "c_attn": "q_proj, k_proj, v_proj", "Wqkv": "q_proj, k_proj, v_proj"}


@dataclass(frozen=True)
class Finding:
    """One thing a target server refuses or gets wrong: what it is, why it matters, what to change."""

    code: str
    severity: Severity
    what: str
    why: str
    fix: str

    def line(self) -> str:
        return f"{self.severity} [{self.code}] {self.what}: {self.why}. Fix: {self.fix}"


@dataclass(frozen=True)
class _Module:
    name: str
    rank: int | None
    """From the tensors: lora_A rows (None when the module has no lora_A)."""
    scale: float | None
    """alpha / r (or / sqrt(r)) as peft computes it from the config's patterns, at the tensors' rank."""


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's pattern lookup (`get_pattern_key`): a key matches a module name it ends with, on a dot boundary, or as a regex."""
    for key, value in patterns.items():
        try:
            if module == key or module.endswith("." + key) or re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return default


def _modules(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, _Module], dict[str, list[str]]]:
    """Per-module ranks and scales, and the keys by kind (lora, magnitude, bias, other)."""
    kinds: dict[str, list[str]] = {"lora": [], "magnitude": [], "bias": [], "other": []}
    ranks: dict[str, int] = {}
    names: set[str] = set()
    for key, shape in shapes.items():
        if match := _LORA_KEY.match(key):
            module = match["module"].removeprefix(_PREFIX)
            names.add(module)
            if match["param"] == "bias":
                kinds["bias"].append(key)
                continue
            kinds["lora"].append(key)
            if match["kind"] == "lora_A" and len(shape) >= 1:
                ranks[module] = shape[0]
            elif match["kind"] == "lora_embedding_A" and len(shape) >= 1:
                ranks[module] = shape[0]
        elif match := _MAGNITUDE_KEY.match(key):
            names.add(match["module"].removeprefix(_PREFIX))
            kinds["magnitude"].append(key)
        else:
            kinds["other"].append(key)
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = {}
    for name in sorted(names):
        m_r = _pattern_value(rank_pattern, name, r)
        m_alpha = _pattern_value(alpha_pattern, name, alpha)
        scale = None
        if isinstance(m_r, (int, float)) and isinstance(m_alpha, (int, float)) and m_r > 0:
            scale = m_alpha / (math.sqrt(m_r) if config.get("use_rslora") else m_r)
        modules[name] = _Module(name, ranks.get(name), scale)
    return modules, kinds


def _some(items: Iterable[str], n: int = 3) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_adapter(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], target: str = "vllm") -> list[Finding]:
    """Findings for one adapter (its config and tensor shapes) on `target` (vllm or peft), errors first."""
    if target not in TARGETS:
        raise ExportError(f"unknown serving target {target!r}; expected one of {', '.join(TARGETS)}")
    vllm = target == "vllm"
    found: list[Finding] = []

    def add(code: str, severity: Severity | None, what: str, why: str, fix: str) -> None:
        if severity is not None:
            found.append(Finding(code, severity, what, why, fix))

    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        add("not-lora", "error", f"peft_type is {config.get('peft_type')!r}", "these checks (and vLLM) cover LoRA adapters only", "check a LoRA adapter (peft_type LORA)")
        return found
    missing = [f for f in ("r", "lora_alpha", "target_modules") if f not in config]
    if missing:
        add("missing-fields", "error" if vllm else "warning", f"adapter_config.json lacks {', '.join(missing)}",
            "vLLM refuses a config without r, lora_alpha and target_modules" if vllm else "peft silently fills missing fields with defaults (r=8, lora_alpha=8), so the scaling may be wrong",
            "write every LoRA field (this exporter does)")
    modules, kinds = _modules(config, shapes)
    if not kinds["lora"]:
        add("no-lora-tensors", "error", "the weights file holds no lora_A/lora_B tensors", "the adapter would change nothing", "export the adapter again; check that it was applied")
    megatron = sorted(k for k in shapes if any(n in k for n in _MEGATRON_NAMES) or not k.startswith(_PREFIX))
    if megatron:
        add("megatron-names", "error", f"{len(megatron)} key(s) with Megatron module names or without the {_PREFIX!r} prefix ({_some(megatron)})",
            "vLLM refuses modules its model does not have" if vllm else "peft loads with strict=False and ignores them silently: the adapter loads and does nothing there",
            "convert with megatron-peft-export, which writes HF module names (q_proj, ..., down_proj)")
    fused = sorted({m.rsplit(".", 1)[-1] for m in modules if m.rsplit(".", 1)[-1] in _FUSED_NAMES})
    if fused:
        parts = "; ".join(f"{f} -> {_FUSED_NAMES[f]}" for f in fused)
        add("fused-names", "warning", f"fused module names {', '.join(fused)}",
            ("vLLM packs q/k/v and gate/up itself and, for Llama-family models, expects the separate names; it refuses a packed name "
             "unless the base model has that module itself (e.g. Phi-3)") if vllm else
            "peft ignores keys of modules the base model lacks; this is right only if the base model has these fused modules (e.g. Phi-3)",
            f"write one LoRA per HF module ({parts}): the same lora_A under each, lora_B split by rows")
    dora = bool(config.get("use_dora")) or bool(kinds["magnitude"])
    if dora and vllm:
        add("dora", "error", f"DoRA adapter (use_dora: {json.dumps(bool(config.get('use_dora')))}, {len(kinds['magnitude'])} magnitude vectors)",
            "vLLM refuses DoRA adapters (\"vLLM does not yet support DoRA\")",
            "serve with peft/transformers, or merge the adapter into the base weights (peft merge_and_unload) and serve the merged model; for vLLM train plain LoRA")
    saved = list(config.get("modules_to_save") or [])
    full = sorted(set(kinds["other"]) - set(megatron))
    if vllm and (saved or full):
        what = f"modules_to_save {saved}" if saved else f"{len(full)} full weight tensor(s) besides LoRA ({_some(full)})"
        add("modules-to-save", "error", what, "vLLM refuses adapters with modules_to_save (\"vLLM only supports modules_to_save being None\")",
            "train without modules_to_save (freeze those modules), or merge the adapter and serve the merged model")
    bias = config.get("bias", "none")
    if vllm and (bias not in (None, "none") or kinds["bias"] or config.get("lora_bias")):
        add("bias", "error", f"bias {bias!r}" + (f", {len(kinds['bias'])} LoRA bias tensor(s)" if kinds["bias"] else ""),
            "recent vLLM accepts only bias: none (older versions needed --enable-lora-bias)", "train without bias (bias: none, lora_bias: false)")
    wrong_rank = sorted(m.name for m in modules.values() if m.rank is not None and _pattern_value(config.get("rank_pattern") or {}, m.name, config.get("r", 8)) != m.rank)
    if wrong_rank:
        sample = modules[wrong_rank[0]]
        add("rank-mismatch", "error", f"{len(wrong_rank)} module(s) whose tensors have another rank than the config says ({sample.name}: rank {sample.rank})",
            "peft builds each module at the config's rank and fails loading a tensor of another size; a server scales it wrong",
            "write r (and rank_pattern) from the tensors' shapes")
    ranks = sorted({m.rank for m in modules.values() if m.rank is not None})
    scales = {m.name: m.scale for m in modules.values() if m.scale is not None and m.rank is not None}
    top_r, top_alpha = config.get("r"), config.get("lora_alpha")
    if vllm and isinstance(top_r, (int, float)) and isinstance(top_alpha, (int, float)) and top_r > 0:
        top = top_alpha / (math.sqrt(top_r) if config.get("use_rslora") else top_r)
        off = sorted(name for name, s in scales.items() if not math.isclose(s, top, rel_tol=1e-6))
        if off:
            add("per-module-scale", "error",
                f"{len(off)} module(s) scaled differently from lora_alpha / r = {top:g} (e.g. {off[0]}: {scales[off[0]]:g}, from alpha_pattern / rank_pattern)",
                "vLLM applies the one scaling lora_alpha / r to every module and reads neither alpha_pattern nor rank_pattern, so these modules are served at the wrong scale without any error",
                "train with one scale for every module (ModelOpt: the same `scale` in every pattern), or fold each module's scale into its lora_B")
    if vllm and len(ranks) > 1:
        largest = ranks[-1]
        over = isinstance(top_r, int) and largest > top_r
        add("per-module-rank", "warning",
            f"ranks differ per module ({', '.join(map(str, ranks))}; rank_pattern)",
            "vLLM checks only r" + (f" ({top_r}) against --max-lora-rank, so a server started for r fails on the rank-{largest} modules" if over else " against --max-lora-rank")
            + "; hot-swapping (peft.utils.hotswap) into a compiled model needs one rank",
            f"export with pad_rank_to={_next_vllm_rank(largest) or largest} (same outputs, one rank, no rank_pattern)")
    if vllm and ranks:
        largest = ranks[-1]
        allowed = _next_vllm_rank(largest)
        if allowed is None:
            add("rank-size", "error", f"rank {largest}", f"vLLM's largest --max-lora-rank is {VLLM_MAX_LORA_RANKS[-1]}", f"train with a rank <= {VLLM_MAX_LORA_RANKS[-1]}")
        elif largest not in VLLM_MAX_LORA_RANKS:
            add("rank-size", "warning", f"rank {largest} is not one of vLLM's --max-lora-rank sizes ({', '.join(map(str, VLLM_MAX_LORA_RANKS))})",
                f"vLLM needs --max-lora-rank {allowed} for it and reserves rank-{allowed} memory for every adapter slot",
                f"export with pad_rank_to={allowed} (same outputs), or train with rank {allowed}")
        elif largest > VLLM_DEFAULT_MAX_LORA_RANK:
            add("max-lora-rank", "info", f"rank {largest}", f"vLLM's default --max-lora-rank is {VLLM_DEFAULT_MAX_LORA_RANK}", f"start vLLM with --max-lora-rank {largest}")
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(found, key=lambda f: order[f.severity])


def _next_vllm_rank(rank: int) -> int | None:
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def log_findings(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: str, target: str = "vllm") -> list[Finding]:
    """At export time: each finding for `target` as one log line (errors and warnings at WARNING); returns them."""
    findings = check_adapter(config, shapes, target)
    for finding in findings:
        log.log(logging.INFO if finding.severity == "info" else logging.WARNING, "serving check (%s) of %s: %s", target, where, finding.line())
    return findings


# ------------------------------------------------------------------------ adapter directories


def _shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    safetensors, bin_file = (directory / name for name in WEIGHT_FILES)
    try:
        if safetensors.is_file():
            from safetensors import safe_open

            with safe_open(str(safetensors), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if bin_file.is_file():
            import torch

            return {k: tuple(v.shape) for k, v in torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True).items()}
    except Exception as exc:  # a truncated or foreign file: bad input, one message
        raise ExportError(f"cannot read the adapter weights in {directory}: {exc}") from exc
    raise ExportError(f"{directory}: no {' or '.join(WEIGHT_FILES)}; expected an HF PEFT adapter directory")


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(adapter_config.json, tensor shapes) of an adapter directory; only the weights file's header is read."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except FileNotFoundError as exc:
        raise ExportError(f"{directory}: no {CONFIG_FILE}; expected an HF PEFT adapter directory") from exc
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {directory / CONFIG_FILE}: {exc}") from exc
    if not isinstance(config, dict):
        raise ExportError(f"{directory / CONFIG_FILE}: expected a JSON object")
    return config, _shapes(directory)


def adapter_dirs(directory: str | Path) -> dict[str, Path]:
    """peft's multi-adapter layout: the adapter at the root ("default") and one per subdirectory with a config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a directory; expected an HF PEFT adapter directory")
    found = {"default": directory} if (directory / CONFIG_FILE).is_file() else {}
    for sub in sorted(directory.iterdir()):
        if sub.is_dir() and not sub.name.startswith(".") and (sub / CONFIG_FILE).is_file():
            found[sub.name] = sub
    if not found:
        raise ExportError(f"{directory}: no {CONFIG_FILE} at the top or in a subdirectory; expected an HF PEFT adapter directory")
    return found


def check_dir(directory: str | Path, target: str = "vllm") -> dict[str, list[Finding]]:
    """Findings per adapter of a directory (the root adapter as "default", others by subdirectory)."""
    return {name: check_adapter(*read_adapter(path), target=target) for name, path in adapter_dirs(directory).items()}
