"""Serving compatibility: what a server refuses, or loads and serves wrong, in an HF LoRA adapter.

Pure: `adapter_config.json`, the tensor names and shapes, and (when known) the base model's family in; findings
out (severity, what, why, what to change, and for vLLM the versions the rule holds for). When vLLM itself is at
hand, `serving_vllm` asks it instead (its own loader on the base model's architecture); these rules are the
fallback, keyed by vLLM version (`VLLM_VERSIONS`, read from each release's loader):

- `vllm/lora/peft_helper.py` (`PEFTHelper`): r, lora_alpha and target_modules are required; modules_to_save
  (except a classifier head), DoRA and `bias` other than "none" are refused. 0.32 also refuses `lora_bias`,
  PiSSA/OLoRA/CorDA/LoftQ inits, aLoRA, layer_replication, BD-LoRA and QALoRA (0.31 ignores those fields), and
  reads `rank_pattern` / `alpha_pattern` (`get_rank_and_scaling`, peft's rule) where 0.31 scales every module by
  lora_alpha / r and checks only r against `--max-lora-rank`.
- `vllm/config/lora.py`: `max_lora_rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16).
- `vllm/lora/lora_model.py`, `worker_manager.py`, `model_manager.py`: a module name outside the model's LoRA
  modules (packed ones by their parts: q/k/v_proj, gate/up_proj) is refused; an expert module is accepted by its
  `experts` suffix and applied only where the model class has that module: Mixtral's is
  `block_sparse_moe.experts`, so transformers v5's `mlp.experts` loads and is applied nowhere. peft's fused
  expert layout (`target_parameters`) on a model whose MoE LoRA is per expert (Qwen-MoE, OLMoE, Mixtral) needs
  `enable_mixed_moe_lora_format=True` on the engine and `is_3d_lora_weight=True` on the request.

The `peft` target checks what `PeftModel.from_pretrained` would get wrong without an error: keys it ignores,
fields it fills with defaults, and ranks that contradict the config.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import chain, compress, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .core.patterns import PatternSet
from .errors import AdapterFileError, ExportError
from .io.peft_dir import ADAPTER_CONFIG, PEFT_PREFIX, check_ranks, read_adapters

log = logging.getLogger("megatron_peft_export")
Severity = Literal["error", "warning", "info"]
TARGETS = ("vllm", "peft")
VLLM_VERSIONS = ("0.31", "0.32")
"""The vLLM releases whose loader the rules were read from (and, for 0.32, checked against the engine in
tests/serving)."""
VLLM_DEFAULT = VLLM_VERSIONS[-1]
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_EXPERT_PARENT = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp", "qwen2_moe": "mlp", "olmoe": "mlp"}
"""Where vLLM's model class keeps a layer's experts and router (`<parent>.experts`, `<parent>.gate`), 0.31-0.32; all
of these classes take MoE LoRA per expert (not `is_3d_moe_weight`)."""
VLLM_3D_MOE = ("gpt_oss",)
"""Families whose vLLM model class takes peft's fused expert layout itself (`is_3d_moe_weight`, 0.32)."""
_INITS_SERVED = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?\.(?P<param>weight|bias)$"
)
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_MEGATRON_NAMES = (
    "linear_qkv",
    "self_attention.linear_proj",
    "linear_fc1",
    "linear_fc2",
    ".lora_a_",
    ".lora_b_",
    ".adapter.linear_in",
    ".adapter.linear_out",
    ".to_wrap.",
)
_MEGATRON_NAME = re.compile("|".join(map(re.escape, _MEGATRON_NAMES)))
"""Any of them inside a key: one search per key (MoE adapters have 10^5 keys)."""
_FUSED_NAMES = {
    "qkv_proj": "q_proj, k_proj, v_proj",
    "gate_up_proj": "gate_proj, up_proj",
    "query_key_value": "q_proj, k_proj, v_proj",
    "W_pack": "q_proj, k_proj, v_proj",
    "c_attn": "q_proj, k_proj, v_proj",
    "Wqkv": "q_proj, k_proj, v_proj",
}


@dataclass(frozen=True)
class Finding:
    """One thing a target server refuses or gets wrong: what it is, why it matters, what to change, where it holds."""

    code: str
    severity: Severity
    what: str
    why: str
    fix: str
    holds: str = ""
    """The server versions the finding is for (e.g. "vLLM <= 0.31"); empty for peft."""

    def line(self) -> str:
        return f"{self.severity} [{self.code}] {self.what}: {self.why}. Fix: {self.fix}" + (
            f" ({self.holds})" if self.holds else ""
        )


def parse_vllm_version(text: str) -> tuple[int, int]:
    """(major, minor) of a vLLM version such as 0.32, 0.32.0 or v0.31.1rc2."""
    match = re.match(r"^v?(\d{1,4})\.(\d{1,4})(?:[.\w+-]*)$", str(text).strip())
    if match is None:
        raise ExportError(
            f"--vllm-version: expected a vLLM version such as {VLLM_DEFAULT} or {VLLM_DEFAULT}.0, found "
            f"{str(text)[:40]!r}"
        )
    return int(match[1]), int(match[2])


def _span(low: str | None, high: str | None) -> str:
    if low and high:
        return f"vLLM {low}-{high}" if low != high else f"vLLM {low}"
    return f"vLLM >= {low}" if low else f"vLLM <= {high}"


class _Module(NamedTuple):
    name: str
    rank: int | None
    """As peft reads it: lora_A rows, or rows / experts for a fused expert parameter (None without lora_A)."""
    scale: float | None
    """alpha / r (or / sqrt(r)) as peft computes it from the config's patterns."""
    fused: bool


def _fused_parents(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The modules holding peft's target_parameters (`mlp.experts` for `mlp.experts.gate_up_proj`)."""
    params = config.get("target_parameters") or []
    return tuple(sorted({p.rsplit(".", 1)[0] for p in params if isinstance(p, str) and "." in p}))


def _is_fused(module: str, parents: tuple[str, ...]) -> bool:
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    return any(module == p or module.endswith("." + p) for p in parents)


_PLAIN_SUFFIXES = frozenset((".lora_A.weight", ".lora_B.weight"))
"""The last 14 characters of nearly every key: `<module>.lora_A.weight` (or B) is what _LORA_KEY matches with that
module (its `.+` is greedy: the longest module, and no shorter suffix ends in `.weight`) when the module is not empty
and no key holds a newline (`.` stops at one, `$` matches before one), so those keys skip the regular expression."""
_SUFFIX = len(".lora_A.weight")  # both suffixes' length


class _Keys:
    """The keys as one text, each between newlines, asked as a whole (counted and searched in C: MoE adapters have
    10^5 keys), with what that tells: whether every key is one line (`single`), starts with peft's prefix
    (`prefixed`), and all of them are plain (`plain`: also each ends in one of `_PLAIN_SUFFIXES`)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.text = "\n".join(chain(("",), shapes, ("",)))
        count, n = self.text.count, len(shapes)
        self.single = count("\n") == n + 1
        # one line each: every "\n<prefix>" starts a key and every "<suffix>\n" ends one, at most once per key
        self.prefixed = (
            count("\n" + PEFT_PREFIX) == n if self.single else all(map(str.startswith, shapes, repeat(PEFT_PREFIX)))
        )
        self.plain = self.single and self.prefixed and sum(count(s + "\n") for s in _PLAIN_SUFFIXES) == n
        """Every key `<PEFT_PREFIX><module>.lora_A.weight` (or B), one line: each is what `_plain_keys` reads (longer
        than its suffix, with the prefix), and the modules of distinct keys of one role are distinct."""
        self._present: dict[str, bool] = {}

    def holds_any(self, names: Iterable[str]) -> bool:
        """`_holds_any` of the text: whether a key holds one of `names` (none holding a newline)."""
        return _holds_any(self.text, names, self._present)

    @cached_property
    def role_shapes(self) -> tuple[set[tuple[int, ...]], set[tuple[int, ...]]]:
        """The distinct shapes of the lora_A keys and of the lora_B keys, of plain keys (the role is the 8th character
        from the end)."""
        pairs = set(zip(map(itemgetter(-8), self.shapes), self.shapes.values()))
        return {s for role, s in pairs if role == "A"}, {s for role, s in pairs if role == "B"}

    def ends_in_module(self, name: str) -> bool:
        """Whether a module's last name is `name` (holding no "."), of plain keys: `.<name><suffix>` ends a key then
        (the prefix ends in a "." when the module is the name alone). The start of both is searched for first: one
        search, not two, when it is not there (or a character of it is not)."""
        return self.holds_any(("." + name + ".lora_",)) and self.holds_any(
            "." + name + suffix + "\n" for suffix in sorted(_PLAIN_SUFFIXES)
        )


def _modules(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], keys: _Keys | None = None
) -> tuple[Mapping[str, _Module], dict[str, list[str]]]:
    """Per-module ranks and scales (`_Alike` when they differ in rank only), and the keys by kind (lora, magnitude,
    bias, other). `keys`: the `_Keys` of `shapes`, when made already."""
    keys = _Keys(shapes) if keys is None else keys
    found = None if keys.plain else _plain_keys(shapes)  # plain keys' names and rows: made when asked for
    if keys.plain or found is not None:
        kinds = {"lora": list(shapes), "magnitude": [], "bias": [], "other": []}
    else:
        names, rows, kinds = _keys_each(shapes)
        found = names, rows
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    ranks, alphas = (
        PatternSet(config.get("rank_pattern"), "rank_pattern"),
        PatternSet(config.get("alpha_pattern"), "alpha_pattern"),
    )
    patterns = bool(ranks.keys or alphas.keys)  # without any, every module has r and lora_alpha: one scale
    parents = _fused_parents(config)
    m_r, m_alpha, scale = r, alpha, _scale(config, r, alpha)
    if not patterns and not parents:
        return _Alike(keys, found, scale), kinds
    names, rows = found or _plain_keys(shapes)
    modules = {}
    for name in sorted(names):
        if patterns:
            m_r, m_alpha = ranks.get(name, r), alphas.get(name, alpha)
            scale = _scale(config, m_r, m_alpha)
        fused = _is_fused(name, parents) if parents else False
        rank = rows.get(name)
        if fused and rank is not None and isinstance(m_r, int) and m_r > 0 and rank % m_r == 0:
            rank = m_r  # [experts * r, in]: the rank is r
        modules[name] = _Module(name, rank, scale, fused)
    return modules, kinds


class _Alike(Mapping):
    """`_modules`' modules when they differ only in rank (no rank or alpha pattern, no fused parameter: one scale,
    none fused), held as their keys: the rules ask for the set of ranks, the scales and the fused modules (`_ranks`,
    `_scales`, `_fused`), answered without a _Module per module (10^5 MoE modules), and of plain keys without their
    names (`names`, `rows`: made when asked for). Read as a mapping, it is the dict `_modules` makes module by
    module."""

    def __init__(self, keys: _Keys, found: tuple[set[str], dict[str, int]] | None, scale: float | None) -> None:
        """`found`: the module names and lora_A rows, when made already (None: plain keys)."""
        self.keys, self.scale = keys, scale
        if found is not None:
            self._found = found

    @cached_property
    def _found(self) -> tuple[set[str], dict[str, int]]:
        return _plain_keys(self.keys.shapes)

    @property
    def names(self) -> set[str]:
        return self._found[0]

    @property
    def rows(self) -> dict[str, int]:
        """Each module's lora_A rows."""
        return self._found[1]

    def __getitem__(self, name: str) -> _Module:
        if name not in self.names:
            raise KeyError(name)
        return _Module(name, self.rows.get(name), self.scale, False)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)


def _ranks(modules: Mapping[str, _Module]) -> set[int]:
    """The modules' ranks (those with a lora_A)."""
    if isinstance(modules, _Alike):
        if modules.keys.plain:  # one module per lora_A key: its rows
            return {shape[0] for shape in modules.keys.role_shapes[0] if len(shape) >= 1}
        return set(modules.rows.values())
    return {m.rank for m in modules.values() if m.rank is not None}


def _scales(modules: Mapping[str, _Module]) -> dict[str, float]:
    """Each module's scale, for those with a rank and a scale."""
    if isinstance(modules, _Alike):
        return {} if modules.scale is None else dict.fromkeys(modules.rows, modules.scale)
    return {m.name: m.scale for m in modules.values() if m.scale is not None and m.rank is not None}


def _fused(modules: Mapping[str, _Module]) -> list[str]:
    """The modules holding peft's fused parameters, sorted."""
    if isinstance(modules, _Alike):
        return []
    return sorted(m for m, info in modules.items() if info.fused)


def _keys_each(shapes: Mapping[str, tuple[int, ...]]) -> tuple[set[str], dict[str, int], dict[str, list[str]]]:
    """Key by key: the module names, each module's lora_A rows, and the keys by kind (lora, magnitude, bias,
    other)."""
    kinds: dict[str, list[str]] = {"lora": [], "magnitude": [], "bias": [], "other": []}
    rows: dict[str, int] = {}
    names: set[str] = set()
    lora, plain = kinds["lora"], "\n" not in "".join(shapes)
    for key, shape in shapes.items():
        if plain and key[-_SUFFIX:] in _PLAIN_SUFFIXES and len(key) > _SUFFIX:
            module = key[:-_SUFFIX].removeprefix(PEFT_PREFIX)
            names.add(module)
            lora.append(key)
            if key[-8] == "A" and len(shape) >= 1:
                rows[module] = shape[0]
        elif match := _LORA_KEY.match(key):
            module = match["module"].removeprefix(PEFT_PREFIX)
            names.add(module)
            if match["param"] == "bias":
                kinds["bias"].append(key)
                continue
            lora.append(key)
            if match["kind"] in ("lora_A", "lora_embedding_A") and len(shape) >= 1:
                rows[module] = shape[0]
        elif match := _MAGNITUDE_KEY.match(key):
            names.add(match["module"].removeprefix(PEFT_PREFIX))
            kinds["magnitude"].append(key)
        else:
            kinds["other"].append(key)
    return names, rows, kinds


_A_SUFFIX = ".lora_A.weight"


def _plain_keys(shapes: Mapping[str, tuple[int, ...]]) -> tuple[set[str], dict[str, int]] | None:
    """`_keys_each`'s module names and lora_A rows when every key takes its first branch (no newline in any key,
    each longer than and ending in one of `_PLAIN_SUFFIXES`: all of them lora keys), computed on the list of keys in
    one pass each; else None."""
    keys = list(shapes)
    ends = list(map(itemgetter(slice(-_SUFFIX, None)), keys))
    if (
        not _PLAIN_SUFFIXES.issuperset(ends)
        or min(map(len, keys), default=_SUFFIX + 1) <= _SUFFIX
        or "\n" in "".join(keys)
    ):
        return None
    modules = list(map(str.removeprefix, map(itemgetter(slice(None, -_SUFFIX)), keys), repeat(PEFT_PREFIX)))
    is_a = list(map(_A_SUFFIX.__eq__, ends))
    a_shapes = list(compress(shapes.values(), is_a))
    # rows of each lora_A with at least one dimension (`_keys_each`'s `len(shape) >= 1`), in key order
    rows = dict(zip(compress(compress(modules, is_a), a_shapes), map(itemgetter(0), filter(None, a_shapes))))
    return set(modules), rows


def _scale(config: Mapping[str, Any], r: Any, alpha: Any) -> float | None:
    """alpha / r (/ sqrt(r) with rsLoRA) as peft computes a module's scale; None where r or alpha is not a number."""
    if _real(r) and _real(alpha) and r > 0:
        return alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return None


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _some(items: Iterable[str], n: int = 3) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _next_vllm_rank(rank: int) -> int | None:
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def check_adapter(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    target: str = "vllm",
    *,
    vllm_version: str | None = None,
    model_type: str | None = None,
) -> list[Finding]:
    """Findings for one adapter (its config and tensor shapes) on `target` (vllm or peft), errors first.

    For vllm: the rules of `vllm_version` (default: the newest known); `model_type` (the base model's, or the
    name map's family) enables the rules about where vLLM's model class keeps its experts.
    """
    if target not in TARGETS:
        raise ExportError(f"unknown serving target {target!r}; expected one of {', '.join(TARGETS)}")
    vllm = target == "vllm"
    new = parse_vllm_version(vllm_version or VLLM_DEFAULT) >= (0, 32)
    every = _span(VLLM_VERSIONS[0], VLLM_VERSIONS[-1]) if vllm else ""
    found: list[Finding] = []

    def add(code: str, severity: Severity | None, what: str, why: str, fix: str, holds: str | None = None) -> None:
        if severity is not None:
            found.append(Finding(code, severity, what, why, fix, every if holds is None else holds))

    if str(config.get("peft_type", "")).upper() != "LORA":
        add(
            "not-lora",
            "error",
            f"peft_type is {config.get('peft_type')!r}",
            "these checks (and vLLM) cover LoRA adapters only",
            "check a LoRA adapter (peft_type LORA)",
        )
        return found
    keys = _Keys(shapes)
    modules, kinds = _modules(config, shapes, keys)
    megatron = _common_rules(config, keys, kinds, vllm, add)
    if vllm:
        _feature_rules(config, modules, kinds, megatron, new, add)
        _rank_rules(config, modules, new, add)
        _expert_rules(modules, model_type, add)
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(found, key=lambda f: order[f.severity])


def _common_rules(
    config: Mapping[str, Any],
    keys: _Keys,
    kinds: Mapping[str, list[str]],
    vllm: bool,
    add: Callable[..., None],
) -> list[str]:
    """What both targets get wrong: missing fields, no LoRA tensors, Megatron names, ranks against the config.
    Returns the keys with Megatron names (or without peft's prefix)."""
    missing = [f for f in ("r", "lora_alpha", "target_modules") if f not in config]
    if missing:
        add(
            "missing-fields",
            "error" if vllm else "warning",
            f"{ADAPTER_CONFIG} lacks {', '.join(missing)}",
            "vLLM refuses a config without r, lora_alpha and target_modules"
            if vllm
            else "peft silently fills missing fields with defaults (r=8, lora_alpha=8), so the scaling may be wrong",
            "write every LoRA field (this exporter does)",
        )
    if not kinds["lora"]:
        add(
            "no-lora-tensors",
            "error",
            "the weights file holds no lora_A/lora_B tensors",
            "the adapter would change nothing",
            "export the adapter again; check that it was applied",
        )
    megatron = []
    shapes = keys.shapes
    if keys.holds_any(_MEGATRON_NAMES) or not keys.prefixed:
        megatron = sorted(k for k in shapes if _MEGATRON_NAME.search(k) or not k.startswith(PEFT_PREFIX))
    if megatron:
        add(
            "megatron-names",
            "error",
            f"{len(megatron)} key(s) with Megatron module names or without the {PEFT_PREFIX!r} prefix "
            f"({_some(megatron)})",
            "vLLM refuses modules its model does not have"
            if vllm
            else "peft loads with strict=False and ignores them silently: the adapter loads and does nothing there",
            "convert with megatron-peft-export, which writes HF module names (q_proj, ..., down_proj)",
        )
    if not missing and isinstance(config.get("r"), int):
        try:
            check_ranks(dict(config), shapes, "the adapter", keys.role_shapes if keys.plain else None)
        except AdapterFileError as exc:
            add(
                "rank-mismatch",
                "error",
                str(exc).removeprefix("the adapter: "),
                "peft builds each module at the config's rank and fails loading a tensor of another size; a server "
                "scales it wrong",
                "write r (and rank_pattern) from the tensors' shapes",
            )
    return megatron


def _holds_any(text: str, names: Iterable[str], present: dict[str, bool] | None = None) -> bool:
    """Whether `text` holds any of `names`: a name is searched for only when each of its characters is in the text.
    A character's absence is one fast scan of the text, where a name's search is several times slower on keys as
    alike as an MoE adapter's (10^5 of them, ~7 MB joined), which often lack a letter of each Megatron name.
    `present`: which characters the text holds, as far as known (filled in)."""
    present = {} if present is None else present
    for name in names:
        if all(present[c] if c in present else present.setdefault(c, c in text) for c in name) and name in text:
            return True
    return False


def _feature_rules(
    config: Mapping[str, Any],
    modules: Mapping[str, _Module],
    kinds: Mapping[str, list[str]],
    megatron: list[str],
    new: bool,
    add: Callable[..., None],
) -> None:
    """The adapter features vLLM refuses or ignores; `new`: the version refuses what 0.31 ignored (>= 0.32)."""
    if isinstance(modules, _Alike) and modules.keys.plain:  # without the names of 10^5 modules
        fused = [name for name in sorted(_FUSED_NAMES) if modules.keys.ends_in_module(name)]
    else:
        names = modules.names if isinstance(modules, _Alike) else modules  # in any order: the short names are sorted
        fused = sorted(set(map(itemgetter(2), map(str.rpartition, names, repeat(".")))).intersection(_FUSED_NAMES))
    if fused:
        parts = "; ".join(f"{f} -> {_FUSED_NAMES[f]}" for f in fused)
        add(
            "fused-names",
            "warning",
            f"fused module names {', '.join(fused)}",
            "vLLM packs q/k/v and gate/up itself and, for Llama-family models, expects the separate names; it "
            "refuses a packed name "
            "unless the base model has that module itself (e.g. Phi-3)",
            f"write one LoRA per HF module ({parts}): the same lora_A under each, lora_B split by rows",
        )
    if config.get("use_dora") or kinds["magnitude"]:
        add(
            "dora",
            "error",
            f"DoRA adapter (use_dora: {json.dumps(bool(config.get('use_dora')))}, {len(kinds['magnitude'])} "
            f"magnitude vectors)",
            'vLLM refuses DoRA adapters ("vLLM does not yet support DoRA")',
            "serve with peft/transformers, or merge the adapter into the base weights (peft merge_and_unload) and "
            "serve the merged model; for vLLM train plain LoRA",
        )
    saved = [m for m in (config.get("modules_to_save") or []) if m not in ("classifier", "score")]
    full = sorted(set(kinds["other"]) - set(megatron))
    if saved or full:
        what = (
            f"modules_to_save {saved}" if saved else f"{len(full)} full weight tensor(s) besides LoRA ({_some(full)})"
        )
        add(
            "modules-to-save",
            "error",
            what,
            "vLLM refuses adapters with modules_to_save other than a classifier head",
            "train without modules_to_save (freeze those modules), or merge the adapter and serve the merged model",
        )
    bias = config.get("bias", "none")
    if bias not in (None, "none") or kinds["bias"] or config.get("lora_bias"):
        add(
            "bias",
            "error",
            f"bias {bias!r}"
            + (f", {len(kinds['bias'])} LoRA bias tensor(s)" if kinds["bias"] else "")
            + (", lora_bias" if config.get("lora_bias") else ""),
            "vLLM accepts only bias: none and no LoRA bias tensors",
            "train without bias (bias: none, lora_bias: false)",
        )
    _unserved_rules(config, new, add)


def _unserved_rules(config: Mapping[str, Any], new: bool, add: Callable[..., None]) -> None:
    """LoRA variants vLLM 0.32 refuses and 0.31 serves as plain LoRA."""
    init = config.get("init_lora_weights", True)
    unserved = [
        f for f in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora") if config.get(f)
    ]
    if isinstance(init, str) and init.lower() not in _INITS_SERVED:
        unserved.append(f"init_lora_weights {init!r}")
    if unserved:
        add(
            "unsupported-feature",
            "error",
            ", ".join(unserved),
            "vLLM 0.32 refuses these"
            if new
            else "vLLM 0.31 ignores these fields and serves the adapter as plain LoRA on the unmodified base, "
            "which is not what peft computes",
            "convert to a plain LoRA adapter (peft: path_initial_model_for_weight_conversion for "
            "PiSSA/OLoRA/LoftQ) or serve with peft",
            _span("0.32", None) if new else _span(None, VLLM_VERSIONS[0]),
        )


def _rank_rules(config: Mapping[str, Any], modules: Mapping[str, _Module], new: bool, add: Callable[..., None]) -> None:
    """Ranks and scales: per-module ones before 0.32, and the --max-lora-rank sizes."""
    ranks = sorted(_ranks(modules))
    if not new:
        _per_module_rules(config, modules, ranks, add)
    if not ranks:
        return
    largest, allowed = ranks[-1], _next_vllm_rank(ranks[-1])
    if allowed is None:
        add(
            "rank-size",
            "error",
            f"rank {largest}",
            f"vLLM's largest --max-lora-rank is {VLLM_MAX_LORA_RANKS[-1]}",
            f"train with a rank <= {VLLM_MAX_LORA_RANKS[-1]}",
        )
    elif largest not in VLLM_MAX_LORA_RANKS:
        add(
            "rank-size",
            "warning",
            f"rank {largest} is not one of vLLM's --max-lora-rank sizes ({', '.join(map(str, VLLM_MAX_LORA_RANKS))})",
            f"vLLM needs --max-lora-rank {allowed} for it and reserves rank-{allowed} memory for every adapter slot",
            f"export with pad_rank_to={allowed} (same outputs), or train with rank {allowed}",
        )
    elif largest > VLLM_DEFAULT_MAX_LORA_RANK:
        add(
            "max-lora-rank",
            "info",
            f"rank {largest}",
            f"vLLM's default --max-lora-rank is {VLLM_DEFAULT_MAX_LORA_RANK}",
            f"start vLLM with --max-lora-rank {largest}",
        )


def _per_module_rules(
    config: Mapping[str, Any], modules: Mapping[str, _Module], ranks: list[int], add: Callable[..., None]
) -> None:
    """vLLM before 0.32 scales every module by lora_alpha / r and checks only r against --max-lora-rank."""
    top_r, top_alpha = config.get("r"), config.get("lora_alpha")
    if not (_real(top_r) and _real(top_alpha) and top_r > 0):
        return
    old_span = _span(None, VLLM_VERSIONS[0])
    top = top_alpha / (math.sqrt(top_r) if config.get("use_rslora") else top_r)
    scales = _scales(modules)
    off = sorted(name for name, s in scales.items() if not math.isclose(s, top, rel_tol=1e-6))
    if off:
        add(
            "per-module-scale",
            "error",
            f"{len(off)} module(s) scaled differently from lora_alpha / r = {top:g} (e.g. {off[0]}: "
            f"{scales[off[0]]:g}, from alpha_pattern / rank_pattern)",
            "vLLM before 0.32 applies the one scaling lora_alpha / r to every module and reads neither "
            "alpha_pattern nor rank_pattern: these modules are served at the wrong scale without any error",
            "serve on vLLM >= 0.32, or export with pad_rank_to (one rank and one scale: each module's scale "
            "folded into its lora_B)",
            old_span,
        )
    if len(ranks) > 1 and isinstance(top_r, int) and ranks[-1] > top_r:
        add(
            "per-module-rank",
            "warning",
            f"ranks differ per module ({', '.join(map(str, ranks))}; rank_pattern)",
            f"vLLM before 0.32 checks only r ({top_r}) against --max-lora-rank, so a server started for r "
            f"fails on the rank-{ranks[-1]} modules",
            f"start vLLM with --max-lora-rank {_next_vllm_rank(ranks[-1]) or ranks[-1]}, or export with "
            f"pad_rank_to={_next_vllm_rank(ranks[-1]) or ranks[-1]}",
            old_span,
        )


def _expert_rules(modules: Mapping[str, _Module], model_type: str | None, add: Callable[..., None]) -> None:
    """Where vLLM applies expert and router LoRA, and the engine flags peft's fused expert layout needs."""
    fused = _fused(modules)
    if not fused:
        return
    if model_type in VLLM_3D_MOE:
        _native_3d_rules(fused, model_type, add)
        return
    parent = VLLM_EXPERT_PARENT.get(model_type or "")
    if parent is not None and parent != "mlp":
        nowhere = sorted(m for m in modules if re.search(r"\.mlp\.(experts|gate)(\.|$)", m))
        if nowhere:
            add(
                "applied-nowhere",
                "error",
                f"{len(nowhere)} module(s) named as in transformers v5 ({_some(nowhere, 2)})",
                f"vLLM's {model_type} model keeps its experts and router under {parent} (`{parent}.experts`, "
                f"`{parent}.gate`): it loads these "
                "modules without an error and applies them nowhere, serving the base model's experts",
                "export with expert_layout='per_expert' (per-expert w1/w2/w3 names under block_sparse_moe, which "
                "vLLM applies)",
            )
            return
    how = (
        f"vLLM's {model_type} model takes MoE LoRA per expert"
        if parent
        else "vLLM's MoE models other than a few 3-D ones (e.g. GPT-OSS) take MoE LoRA per expert"
    )
    add(
        "engine-flags",
        "warning",
        f"fused expert LoRA (peft target_parameters; {_some(fused, 2)})",
        f"{how}: it refuses this layout unless the engine runs with enable_mixed_moe_lora_format=True "
        f"(--enable-mixed-moe-lora-format) "
        "and each LoRARequest has is_3d_lora_weight=True"
        + ("" if parent else "; pass --base to check the model's expert names too"),
        "start vLLM with --enable-mixed-moe-lora-format and send is_3d_lora_weight=True, or export with "
        "expert_layout='per_expert'",
    )


def _native_3d_rules(fused: list[str], model_type: str, add: Callable[..., None]) -> None:
    """vLLM's 3-D MoE LoRA (0.32) reads gate_up_proj's LoRA from `experts.base_layer` and down_proj's from `experts`,
    and asserts both are there."""
    layers = {m for m in fused if re.search(r"\.mlp\.experts(\.base_layer)?$", m)}
    lone = sorted(m for m in layers if m.endswith(".experts") and f"{m}.base_layer" not in layers)
    lone += sorted(m for m in layers if m.endswith(".base_layer") and m.removesuffix(".base_layer") not in layers)
    if lone:
        add(
            "one-expert-parameter",
            "error",
            f"{len(lone)} layer(s) with LoRA on only one of the fused expert parameters ({_some(lone, 2)})",
            f"vLLM's {model_type} model loads expert LoRA only as the pair gate_up_proj and down_proj and fails "
            "an assertion when one of them has none",
            "adapt both expert linears (linear_fc1 and linear_fc2) of every MoE layer",
            _span("0.32", "0.32"),  # read from 0.32's loader
        )


def peft_scales(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, float | None]:
    """Each module's scale as peft computes it: alpha / r from the config and its patterns (/ sqrt(r) with rsLoRA)."""
    return {m.name: m.scale for m in _modules(config, shapes)[0].values()}


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def log_findings(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    where: str,
    target: str = "vllm",
    model_type: str | None = None,
) -> list[Finding]:
    """At export time: each finding for `target` (vLLM: the newest known version) as one log line; returns them."""
    findings = check_adapter(config, shapes, target, model_type=model_type)
    for finding in findings:
        log.log(
            logging.INFO if finding.severity == "info" else logging.WARNING,
            "serving check (%s) of %s: %s",
            target,
            where,
            finding.line(),
        )
    return findings


# ------------------------------------------------------------------------ adapter directories


def check_dir(
    directory: str | Path, target: str = "vllm", *, vllm_version: str | None = None, model_type: str | None = None
) -> dict[str, list[Finding]]:
    """Findings per adapter of a directory (the root adapter as "default", others by subdirectory), by the rules."""
    return {
        name: check_adapter(config, shapes, target, vllm_version=vllm_version, model_type=model_type)
        for name, (_, config, shapes) in read_adapters(directory).items()
    }
