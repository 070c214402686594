"""Every option of the export, declared once: name, type, default, what values it takes, one docstring, and the
surfaces it appears on.

From this table come the config dataclasses (`HookConfig`, `VerifyConfig`, `PushConfig` in `config.py`,
`ExportOptions` in `export.py`, `ServeConfig` in `services/delivery.py`: `config_class`), their checks when they are
made (`check_fields`), the YAML keys under `export_hf_adapter:` (`build`), the Megatron-LM flags
(`integrations/megatron_lm.py`), the CLI options of `export`, `verify`, `push` and `serve` (`add_arguments`,
`from_args`) and the docs table `docs/options.md` (`markdown`, also
`python -m megatron_peft_export.core.options --markdown`). `export_adapter`'s keyword arguments are written out
in its signature; tests/core/test_options.py holds them to the schema. Pure: no file I/O.

Sections: `hook` (the keys of `export_hf_adapter:`), `verify` (its `verify:` mapping), `push` (its `push:` mapping),
`serve` (live delivery into vLLM). Surfaces: `HookConfig`/`VerifyConfig`/`PushConfig`/`ServeConfig` (and YAML),
`ExportOptions`, `export_adapter` and `load_hf_adapter` (keyword arguments), `megatron_lm` (flags), `cli:export`,
`cli:verify`, `cli:push`, `cli:serve`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ExportError, OptionError
from .archs import arch_for_model_type
from .names import RULE, check_name, is_name

YAML_KEY = "export_hf_adapter"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Sentinel("required")
"""The default of an option that has none (push.repo_id); on a Flag: the option's own default."""
SECTION_CLASS = {"hook": "HookConfig", "verify": "VerifyConfig", "push": "PushConfig", "serve": "ServeConfig"}
_CLASSES: dict[str, type] = {}
"""Section -> its config dataclass, filled as `config_class` makes them (nested sections are built through it)."""


@dataclass(frozen=True)
class Flag:
    """An option on a command line: the flag, and what differs there from the option itself."""

    flag: str
    default: Any = REQUIRED
    """REQUIRED: the option's own default."""
    help: str | None = None
    """None: the option's docstring."""
    required: bool = False
    metavar: str | None = None
    own: bool = False
    """Megatron-LM defines this flag itself; it is read, not added."""


@dataclass(frozen=True)
class Option:
    """One option: its checks say what a value must be, in the words an error message uses."""

    section: str
    name: str
    type: str
    """As the docs show it: bool, int, float, str, name, names, dtype, or a section (verify, push)."""
    default: Any
    doc: str
    expected: str
    """What a good value is, for error messages ('an integer >= 1')."""
    check: Callable[[Any], bool]
    """True for a good value (None is good when the default is None)."""
    choices: tuple[str, ...] = ()
    surfaces: frozenset[str] = frozenset()
    flags: Mapping[str, Flag] = field(default_factory=dict)
    """Surface (megatron_lm, cli:export, cli:verify, cli:push) -> its flag."""
    parse: Callable[[str], Any] | None = None
    """From a command-line string to the value (default: by type)."""
    nullable: bool = False
    """None is a good value too (it is whenever the default is None)."""

    @property
    def key(self) -> str:
        return self.name if self.section == "hook" else f"{self.section}.{self.name}"


# ---- checks ----


def _int(minimum: int | None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _seconds(strict: bool) -> Callable[[Any], bool]:
    return lambda v: _number(v) and math.isfinite(v) and (v > 0 if strict else v >= 0)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}
DTYPES.update({"float32": "float32", "fp32": "float32"})


def _dtype(v: Any) -> bool:
    if type(v).__module__ == "torch" and type(v).__name__ == "dtype":  # a torch.dtype (torch need not be imported)
        return str(v).removeprefix("torch.") in DTYPES.values()
    return isinstance(v, str) and v in DTYPES


def _model_type(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    arch_for_model_type(v)  # an unknown family: UnsupportedModelError, naming the ones there are
    return True


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
"""Matched in full (`$` also matches before a final newline: `org/name\n` passed into requests and log lines)."""
_BRANCH = re.compile(r"(?!.*\.\.)(?!.*//)[A-Za-z0-9][\w./-]{0,199}(?<![./])", re.ASCII)
"""A git branch name without `..`, `//`, control characters or a trailing `/` or `.` (matched in full)."""


def check_selection(selection: Any) -> Any:
    """`adapter_names` as given (None, "all" or a list of names), or an OptionError saying what is wrong."""
    if selection is None or selection == "all":
        return selection
    if isinstance(selection, str) or not isinstance(selection, (list, tuple)):
        raise OptionError(option="adapter_names", expected="'all' or a list of adapter names", found=selection)
    if not all(isinstance(n, str) for n in selection):
        raise OptionError(option="adapter_names", expected="'all' or a list of adapter names", found=selection)
    names = [check_name(n, "adapter_names") for n in selection]
    if not names or len(set(names)) != len(names):
        raise OptionError(option="adapter_names", expected="at least one name and no repeats", found=names)
    return names


def _selection(v: Any) -> bool:
    check_selection(v)
    return True


def _comma_list(value: str) -> str | list[str]:
    """--hf-adapter-names: 'all' or a comma-separated list."""
    return value if value == "all" else [n.strip() for n in value.split(",") if n.strip()]


# ---- the options ----

SERVE = "ServeConfig"
HOOK, EXPORT, CALL, VERIFY, PUSH, MLM = (
    "HookConfig",
    "ExportOptions",
    "export_adapter",
    "VerifyConfig",
    "PushConfig",
    ("megatron_lm"),
)
IMPORT = "load_hf_adapter"
"""importer.load_hf_adapter's keyword arguments: the options that name and check the adapter read back."""
_SECONDS, _STRICT_SECONDS = "seconds >= 0", "seconds > 0"
_DTYPE_NAMES = ("bfloat16", "float16", "float32")
_LAYOUTS = ("auto", "per_expert", "fused")
STRATEGIES = ("end", "every_save", "all_checkpoints")
PRECISIONS = ("float32", "bfloat16")


def _o(section: str, name: str, type: str, default: Any, doc: str, expected: str, check: Callable, **kw: Any) -> Option:
    kw["surfaces"] = frozenset(kw.get("surfaces", ()))
    return Option(section, name, type, default, " ".join(doc.split()), expected, check, **kw)


def _section(name: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, _CLASSES[name])


_ALL3 = (HOOK, EXPORT, CALL)
_HOOK_OPTIONS = [
    _o(
        "hook",
        "enabled",
        "bool",
        True,
        "Export at all.",
        "true or false",
        _bool,
        surfaces=(HOOK,),
        flags={MLM: Flag("--export-hf-adapter", help="Write an HF PEFT adapter next to every checkpoint.")},
    ),
    _o(
        "hook",
        "subdir",
        "name",
        "hf_adapter",
        "Directory name, inside each iteration's checkpoint directory, that receives the adapter.",
        RULE,
        is_name,
        surfaces=(HOOK,),
        flags={
            MLM: Flag("--hf-adapter-dir-name"),
            "cli:export": Flag(
                "--dir-name", help="directory name inside each iteration for --all (default: hf_adapter)"
            ),
            "cli:push": Flag(
                "--dir-name",
                help="adapter directory name inside each iteration of a save directory (default: hf_adapter)",
            ),
            "cli:serve": Flag("--dir-name", help="adapter directory name in each iteration"),
        },
    ),
    _o(
        "hook",
        "every_n_saves",
        "int",
        1,
        "Export the n-th, 2n-th, ... persistent save (1: every save).",
        "an integer >= 1",
        _int(1),
        surfaces=(HOOK,),
        flags={MLM: Flag("--hf-adapter-every-n-saves")},
    ),
    _o(
        "hook",
        "base_model_name_or_path",
        "str",
        None,
        "HF base model (local directory or Hub id) written into the adapter config; a local directory also "
        "picks and checks the HF names.",
        "a directory or Hub id",
        _str,
        surfaces=(*_ALL3, IMPORT),
        flags={
            MLM: Flag("--hf-adapter-base-model"),
            "cli:export": Flag(
                "--base-model", help="HF base model directory or Hub id (names, config check, adapter_config)"
            ),
        },
    ),
    _o(
        "hook",
        "adapter_name",
        "name",
        "default",
        "Which named adapter to export (ModelOpt models can hold several).",
        RULE,
        is_name,
        surfaces=(*_ALL3, IMPORT),
        flags={MLM: Flag("--hf-adapter-name"), "cli:export": Flag("--adapter-name")},
    ),
    _o(
        "hook",
        "adapter_names",
        "names",
        None,
        "Several named adapters in peft's multi-adapter layout: `all` (every enabled one) or a list (flag: "
        "comma-separated); the one named `default` (else the first) at the root, each other under "
        "`<subdir>/<name>/`. None: only `adapter_name`.",
        "'all' or a list of adapter names",
        _selection,
        surfaces=(HOOK,),
        flags={MLM: Flag("--hf-adapter-names")},
        parse=_comma_list,
    ),
    _o(
        "hook",
        "pad_rank_to",
        "int",
        None,
        "Pad every adapted module to this rank (zero rows/columns, lora_alpha scaled so alpha / r is unchanged): "
        "one rank across modules and checkpoints, for hot-swapping and servers' rank sizes.",
        "a rank >= 1",
        _int(1),
        surfaces=_ALL3,
        flags={MLM: Flag("--hf-adapter-pad-rank-to"), "cli:export": Flag("--pad-rank-to", metavar="R")},
    ),
    _o(
        "hook",
        "dtype",
        "dtype",
        None,
        "Output dtype (bfloat16, float16, float32); default: the adapter's own.",
        "bfloat16, float16 or float32 (or bf16, fp16, fp32)",
        _dtype,
        choices=_DTYPE_NAMES,
        surfaces=_ALL3,
        flags={MLM: Flag("--hf-adapter-dtype"), "cli:export": Flag("--dtype")},
    ),
    _o(
        "hook",
        "model_type",
        "str",
        None,
        "HF model_type for the name map when the base model is not a local directory.",
        "an HF model_type (e.g. llama)",
        _model_type,
        surfaces=(*_ALL3, IMPORT),
        flags={MLM: Flag("--hf-adapter-model-type"), "cli:export": Flag("--model-type")},
    ),
    _o(
        "hook",
        "expert_layout",
        "str",
        "auto",
        "MoE experts: `per_expert` modules (transformers v4, vLLM), `fused` target_parameters (transformers "
        "v5), or `auto`: the installed transformers' layout.",
        "one of " + ", ".join(_LAYOUTS),
        _one_of(*_LAYOUTS),
        choices=_LAYOUTS,
        surfaces=_ALL3,
        flags={MLM: Flag("--hf-adapter-expert-layout"), "cli:export": Flag("--expert-layout")},
    ),
    _o(
        "hook",
        "overwrite",
        "bool",
        False,
        "Replace an existing output directory this tool published.",
        "true or false",
        _bool,
        surfaces=(EXPORT, CALL),
        flags={"cli:export": Flag("--overwrite")},
    ),
    _o(
        "hook",
        "on_error",
        "str",
        "warn",
        "warn: log the failure and keep training; raise: stop every rank with the error at the next save or at "
        "finalize.",
        "'warn' or 'raise'",
        _one_of("warn", "raise"),
        choices=("warn", "raise"),
        surfaces=(HOOK,),
        flags={MLM: Flag("--hf-adapter-on-error")},
    ),
    _o(
        "hook",
        "max_pending",
        "int",
        1,
        "Exports in flight at once; a further save waits for the oldest, so host memory stays bounded.",
        "an integer >= 1",
        _int(1),
        surfaces=(HOOK,),
        flags={MLM: Flag("--hf-adapter-max-pending")},
    ),
    _o(
        "hook",
        "publish_timeout",
        "float",
        600.0,
        "Seconds finalize() waits for asynchronously saved checkpoints to be finalized before abandoning their "
        "adapters.",
        _SECONDS,
        _seconds(False),
        surfaces=(HOOK,),
    ),
    _o(
        "hook",
        "collective_timeout",
        "float",
        300.0,
        "Seconds any wait of the export's collectives may last (a rank that died or hangs): then every "
        "surviving rank leaves the export with a CollectiveError. Must exceed the time the writer needs to "
        "convert and write one adapter. export_adapter: None (default) keeps the process group's own timeout.",
        _STRICT_SECONDS,
        _seconds(True),
        surfaces=(HOOK, CALL),
        flags={MLM: Flag("--hf-adapter-collective-timeout")},
    ),
    _o(
        "hook",
        "sigterm_grace",
        "float",
        20.0,
        "On SIGTERM (when no other handler is installed): seconds to let pending exports finish before "
        "abandoning them (staging removed, nothing published); the process then terminates as SIGTERM would. "
        "None: install no handler.",
        _SECONDS + " (or null)",
        _seconds(False),
        nullable=True,
        surfaces=(HOOK,),
    ),
    _o(
        "hook",
        "allow_nonfinite",
        "bool",
        False,
        "Export adapters whose tensors hold NaN or Inf (by default such an export fails: the adapter would give "
        "NaN logits).",
        "true or false",
        _bool,
        surfaces=(*_ALL3, IMPORT),
        flags={
            MLM: Flag("--hf-adapter-allow-nonfinite"),
            "cli:export": Flag("--allow-nonfinite"),
            "cli:push": Flag(
                "--allow-nonfinite", help="push adapters whose tensors hold NaN or Inf (by default refused)"
            ),
        },
    ),
    _o(
        "hook",
        "verify",
        "verify",
        None,
        "Capture reference logits at each save and verify each adapter against them (`verify: {base_model: "
        "DIR}`, or `verify: true`); none when unset.",
        "a mapping of VerifyConfig fields",
        _section("verify"),
        surfaces=(HOOK,),
        flags={
            MLM: Flag(
                "--hf-adapter-verify",
                help="Capture reference logits at each save "
                "and verify each HF adapter against them (transformers + peft, on "
                "rank 0, in the background).",
            )
        },
    ),
    _o(
        "hook",
        "push",
        "push",
        None,
        "Push adapters to the Hugging Face Hub (`push: {repo_id: OWNER/NAME, strategy: every_save}`); none when unset.",
        "a mapping of PushConfig fields",
        _section("push"),
        surfaces=(HOOK,),
    ),
    _o(
        "hook",
        "serve",
        "serve",
        None,
        "Load each published (and, with verify, verified) adapter into a running vLLM server (`serve: {url: "
        "http://host:8000, name: policy}`), in the background; none when unset.",
        "a mapping of ServeConfig fields",
        _section("serve"),
        surfaces=(HOOK,),
    ),
]


_THRESHOLD = "a number"


def _threshold(name: str, doc: str) -> Option:
    flags = {"cli:verify": Flag("--" + name.replace("_", "-"))}
    return _o("verify", name, "float", None, doc, _THRESHOLD, _number, surfaces=(VERIFY,), flags=flags)


def _wandb(name: str, doc: str, megatron: str | None) -> Option:
    flags = {"cli:verify": Flag("--" + name.replace("_", "-"))}
    if megatron:
        flags[MLM] = Flag(megatron, own=True)
    return _o("verify", name, "str", None, doc, "a string", _str, surfaces=(VERIFY,), flags=flags)


_VERIFY_OPTIONS = [
    _o(
        "verify",
        "base_model",
        "str",
        None,
        "HF base model to verify against: a local directory or a Hub id already in the local cache; default: "
        "the hook's base_model_name_or_path.",
        "a directory or Hub id",
        _str,
        surfaces=(VERIFY,),
        flags={
            MLM: Flag("--hf-adapter-verify-base-model"),
            "cli:verify": Flag(
                "--base-model",
                required=True,
                metavar="HF_DIR",
                help="local HF base model directory (or a Hub id already in the local cache)",
            ),
        },
    ),
    _o(
        "verify",
        "required",
        "bool",
        False,
        "Fail the verification (instead of skipping it with a warning) when no base model is available locally.",
        "true or false",
        _bool,
        surfaces=(VERIFY,),
        flags={MLM: Flag("--hf-adapter-verify-required")},
    ),
    _o(
        "verify",
        "dtype",
        "str",
        "float32",
        "dtype of the HF model during verification (float32, bfloat16); also picks the default thresholds.",
        "one of " + ", ".join(PRECISIONS),
        _one_of(*PRECISIONS),
        choices=PRECISIONS,
        surfaces=(VERIFY,),
        flags={MLM: Flag("--hf-adapter-verify-dtype"), "cli:verify": Flag("--dtype")},
    ),
    _o(
        "verify",
        "device",
        "str",
        "cpu",
        "Device of the HF model during verification (it runs beside training on the writer rank).",
        "a torch device (cpu, cuda:1)",
        _str,
        surfaces=(VERIFY,),
        flags={"cli:verify": Flag("--device")},
    ),
    _o(
        "verify",
        "probe_batch",
        "int",
        2,
        "Sequences in the default probe (deterministic token ids).",
        "an integer >= 1",
        _int(1),
        surfaces=(VERIFY,),
    ),
    _o(
        "verify",
        "probe_length",
        "int",
        32,
        "Tokens per probe sequence (at most the model's max_sequence_length).",
        "an integer >= 1",
        _int(1),
        surfaces=(VERIFY,),
    ),
    _o(
        "verify",
        "probe_seed",
        "int",
        0,
        "Seed of the default probe's token ids.",
        "an integer",
        _int(None),
        surfaces=(VERIFY,),
    ),
    _o(
        "verify",
        "prompt",
        "str",
        None,
        "Probe with this text instead of random token ids (needs `tokenizer`).",
        "a string",
        lambda x: isinstance(x, str),
        surfaces=(VERIFY,),
    ),
    _o(
        "verify",
        "tokenizer",
        "str",
        None,
        "Local HF tokenizer directory for `prompt` (and for token strings in the W&B table).",
        "a directory",
        _str,
        surfaces=(VERIFY,),
        flags={"cli:verify": Flag("--tokenizer")},
    ),
    _o(
        "verify",
        "top_k",
        "int",
        5,
        "k of the top-k agreement and of the W&B table.",
        "an integer >= 1",
        _int(1),
        surfaces=(VERIFY,),
        flags={"cli:verify": Flag("--top-k")},
    ),
    _threshold(
        "max_abs_diff",
        "Largest allowed |HF - Megatron| logit difference; default 1e-3 (float32) or 1.0 (bfloat16).",
    ),
    _threshold(
        "mean_abs_diff",
        "Largest allowed mean |HF - Megatron| logit difference; default 1e-4 (float32) or 0.1 (bfloat16).",
    ),
    _threshold(
        "min_top1_agreement",
        "Smallest allowed fraction of positions with the same top-1 token; default 0.98 (float32) or 0.9 (bfloat16).",
    ),
    _threshold(
        "min_topk_agreement",
        "Smallest allowed mean overlap of the top-k token sets; default 0.95 (float32) or 0.8 (bfloat16).",
    ),
    _threshold(
        "max_kl_divergence",
        "Largest allowed mean KL(Megatron || HF) per position, in nats; default 1e-5 (float32) or 0.05 (bfloat16).",
    ),
    _o(
        "verify",
        "wandb",
        "bool",
        True,
        "Log to Weights & Biases when a run is active in the writer process or wandb_project is set (CLI: "
        "when --wandb-project is given).",
        "true or false",
        _bool,
        surfaces=(VERIFY,),
    ),
    _wandb("wandb_project", "W&B project of the run the writer starts when none is active.", "--wandb-project"),
    _wandb("wandb_entity", "W&B entity (team or user) of that run.", "--wandb-entity"),
    _wandb(
        "wandb_exp_name",
        "W&B run name; the run is named <name>-hf-adapter and grouped under <name>.",
        "--wandb-exp-name",
    ),
    _wandb(
        "wandb_save_dir",
        "Local directory for W&B run files (Megatron-LM: default <save>/wandb, as Megatron-LM's own).",
        "--wandb-save-dir",
    ),
    _o(
        "verify",
        "wandb_artifact",
        "bool",
        False,
        "Also log each adapter directory as a W&B artifact (type model, aliases iter_XXXXXXX and latest).",
        "true or false",
        _bool,
        surfaces=(VERIFY,),
        flags={MLM: Flag("--hf-adapter-wandb-artifact"), "cli:verify": Flag("--wandb-artifact")},
    ),
]


def _url(v: Any) -> bool:
    parsed = urllib.parse.urlparse(v) if isinstance(v, str) else None
    return (
        parsed is not None and parsed.scheme in ("http", "https") and bool(parsed.hostname) and "@" not in parsed.netloc
    )


_PUSH_OPTIONS = [
    _o(
        "push",
        "repo_id",
        "str",
        REQUIRED,
        "Hub model repository, OWNER/NAME; created when missing.",
        "OWNER/NAME (e.g. my-org/llama-lora)",
        lambda v: isinstance(v, str) and bool(_REPO_ID.fullmatch(v)),
        surfaces=(PUSH,),
        flags={
            MLM: Flag(
                "--hf-adapter-push-repo-id",
                help="Push adapters to the Hugging Face Hub: Hub model repository, OWNER/NAME; created when missing.",
            ),
            "cli:push": Flag("--repo-id", required=True),
        },
    ),
    _o(
        "push",
        "strategy",
        "str",
        "every_save",
        "end: the last adapter when training finishes; every_save: each adapter as it is written, in the "
        "background; all_checkpoints: also each iteration in its own iter_XXXXXXX/ folder.",
        "one of " + ", ".join(STRATEGIES),
        _one_of(*STRATEGIES),
        choices=STRATEGIES,
        surfaces=(PUSH,),
        flags={
            MLM: Flag("--hf-adapter-push-strategy"),
            "cli:push": Flag(
                "--strategy",
                default="end",
                help="end and every_save push the latest adapter at the repo root; "
                "all_checkpoints also every iteration in its own folder (default: end)",
            ),
        },
    ),
    _o(
        "push",
        "private",
        "bool",
        False,
        "Create the repository private (a repository that exists keeps its visibility).",
        "true or false",
        _bool,
        surfaces=(PUSH,),
        flags={MLM: Flag("--hf-adapter-push-private"), "cli:push": Flag("--private")},
    ),
    _o(
        "push",
        "revision",
        "str",
        None,
        "Branch to push to (created from main when missing); default main.",
        "a branch name (letters, digits, _ . - /; no ..)",
        lambda v: isinstance(v, str) and bool(_BRANCH.fullmatch(v)),
        surfaces=(PUSH,),
        flags={MLM: Flag("--hf-adapter-push-revision"), "cli:push": Flag("--revision")},
    ),
    _o(
        "push",
        "commit_message",
        "str",
        None,
        "Commit message; the iteration is appended. Default: 'Upload HF adapter'.",
        "a string",
        _str,
        surfaces=(PUSH,),
        flags={"cli:push": Flag("--commit-message")},
    ),
    _o(
        "push",
        "base_model",
        "str",
        None,
        "Hub id of the base model, written into the pushed adapter_config.json and model card when the export "
        "names a local directory.",
        "a Hub id",
        _str,
        surfaces=(PUSH,),
        flags={"cli:push": Flag("--base-model")},
    ),
    _o(
        "push",
        "endpoint",
        "str",
        None,
        "Hub address (default: HF_ENDPOINT, else https://huggingface.co).",
        "http(s)://host[:port] (the Hub's address; no user:password@, the token goes in HF_TOKEN or the login)",
        _url,
        surfaces=(PUSH,),
        flags={"cli:push": Flag("--endpoint")},
    ),
    _o(
        "push",
        "retries",
        "int",
        3,
        "Retries of a push after a transient error (HTTP 408/429/5xx, timeouts, connection errors).",
        "an integer >= 0",
        _int(0),
        surfaces=(PUSH,),
        flags={"cli:push": Flag("--retries")},
    ),
    _o(
        "push",
        "retry_wait",
        "float",
        5.0,
        "Seconds before the first retry; doubled before each next one.",
        _SECONDS,
        _seconds(False),
        surfaces=(PUSH,),
    ),
]


def _served_name(v: Any) -> bool:
    return isinstance(v, str) and v != "" and "/" not in v and v.strip() == v


def _nonnegative(v: Any) -> bool:
    return _number(v) and v >= 0


_SERVE = (SERVE,)
_SERVE_OPTIONS = [
    _o(
        "serve",
        "url",
        "str",
        REQUIRED,
        "The vLLM server's base URL (`http://host:port`); its runtime LoRA API must be on "
        "(`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, `--enable-lora`).",
        "http(s)://host:port (the vLLM server's base URL; no user:password@, the key goes in api_key_env's variable)",
        _url,
        surfaces=_SERVE,
        flags={
            MLM: Flag(
                "--hf-adapter-serve-url",
                help="Load each published HF adapter into the running vLLM server at this base URL (runtime LoRA API).",
            ),
            "cli:serve": Flag("--url", required=True, help="the vLLM server's base URL (http://host:port)"),
        },
    ),
    _o(
        "serve",
        "name",
        "str",
        "adapter",
        "The stable served name (it moves to each newest adapter); each iteration is also served as "
        "`<name>-iter_XXXXXXX`.",
        "a plain non-empty name (no '/', no surrounding spaces)",
        _served_name,
        surfaces=_SERVE,
        flags={MLM: Flag("--hf-adapter-serve-name"), "cli:serve": Flag("--name")},
    ),
    _o(
        "serve",
        "keep",
        "int",
        2,
        "How many per-iteration names stay loaded; older ones are unloaded (the stable name is not counted).",
        "an integer >= 1",
        _int(1),
        surfaces=_SERVE,
        flags={MLM: Flag("--hf-adapter-serve-keep"), "cli:serve": Flag("--keep")},
    ),
    _o(
        "serve",
        "api_key_env",
        "str",
        "VLLM_API_KEY",
        "The environment variable holding the server's API key (its `--api-key`), sent as a bearer token; unset: "
        "no key.",
        "an environment variable's name",
        _str,
        surfaces=_SERVE,
        flags={MLM: Flag("--hf-adapter-serve-api-key-env"), "cli:serve": Flag("--api-key-env")},
    ),
    _o(
        "serve",
        "timeout",
        "float",
        30.0,
        "Seconds one request may take (a load reads the adapter from disk on the server).",
        _SECONDS,
        _nonnegative,
        surfaces=_SERVE,
        flags={MLM: Flag("--hf-adapter-serve-timeout"), "cli:serve": Flag("--timeout")},
    ),
    _o(
        "serve",
        "retries",
        "int",
        3,
        "Attempts of a request that got no answer (refused connection, timeout, 5xx), with exponential backoff.",
        "an integer >= 1",
        _int(1),
        surfaces=_SERVE,
        flags={MLM: Flag("--hf-adapter-serve-retries"), "cli:serve": Flag("--retries")},
    ),
    _o(
        "serve",
        "backoff",
        "float",
        1.0,
        "Seconds before the first retry; doubled for each further one.",
        _SECONDS,
        _nonnegative,
        surfaces=_SERVE,
    ),
    _o(
        "serve",
        "max_lora_rank",
        "int",
        None,
        "The server's `--max-lora-rank`, when the server does not report it (vLLM reports it only with its "
        "development endpoints on); None: trust the server to refuse a too large rank.",
        "a rank >= 1",
        _int(1),
        surfaces=_SERVE,
        flags={MLM: Flag("--hf-adapter-serve-max-lora-rank"), "cli:serve": Flag("--max-lora-rank")},
    ),
]


SCHEMA: tuple[Option, ...] = (*_HOOK_OPTIONS, *_VERIFY_OPTIONS, *_PUSH_OPTIONS, *_SERVE_OPTIONS)
"""Every option, in the order the docs list them."""


def find_option(key: str) -> Option:
    """The option named `key` (`dtype`, `verify.dtype`, `push.repo_id`)."""
    return next(o for o in SCHEMA if o.key == key)


def options(section: str | None = None, surface: str | None = None) -> list[Option]:
    """The options of a section and/or on a surface, in schema order."""
    return [
        o
        for o in SCHEMA
        if (section is None or o.section == section)
        and (surface is None or surface in o.surfaces or surface in o.flags)
    ]


# ---- the config dataclasses ----


def config_class(section: str, surface: str) -> Callable[[type], type]:
    """Make `cls` a frozen keyword-only dataclass with one field per option of `section` on `surface` (in schema
    order, before any field the class declares itself); its `__post_init__` should call `check_fields(self)`."""

    def make(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        cls.__annotations__ = {o.name: _annotation(o) for o in options(section, surface)} | own
        for o in options(section, surface):
            default = {} if o.default is REQUIRED else {"default": o.default}
            setattr(cls, o.name, field(**default, metadata={"doc": o.doc}))
        cls.__doc__ = (cls.__doc__ or "") + "\n\n" + "\n".join(f"{o.name}: {o.doc}" for o in options(section, surface))
        made = dataclass(kw_only=True, frozen=True)(cls)
        made.__options__ = tuple(options(section, surface))
        if surface == SECTION_CLASS.get(section):
            _CLASSES[section] = made
        return made

    return make


def _annotation(option: Option) -> str:
    kinds = {"bool": "bool", "int": "int", "float": "float", "name": "str", "names": "list[str] | str"}
    kind = kinds.get(option.type, SECTION_CLASS.get(option.type, "str"))
    return f"{kind} | None" if option.default is None or option.nullable else kind


def check_fields(config: Any) -> None:
    """Check every option field of a config dataclass made by `config_class` (and turn `verify: true` or a nested
    mapping into its section's dataclass); raises OptionError naming the first bad one."""
    for option in type(config).__options__:
        value = getattr(config, option.name)
        if option.type in _CLASSES:
            value = _nested(option, value)
            object.__setattr__(config, option.name, value)
        check_value(option, value)


def check_value(option: Option, value: Any) -> Any:
    """`value` if `option` takes it, else an OptionError with what it expected and what it found."""
    if value is None and (option.default is None or option.nullable):
        return value
    if not option.check(value):
        raise OptionError(option=option.key, expected=option.expected, found=value)
    return value


def _nested(option: Option, value: Any) -> Any:
    if isinstance(value, bool):  # `verify: true` in YAML
        return _CLASSES[option.type]() if value else None
    if isinstance(value, Mapping):
        return build(_CLASSES[option.type], value, f"{YAML_KEY}.{option.name}")
    return value


def build(cls: type, values: Any, where: str) -> Any:
    """A config dataclass from a mapping (the YAML section `where`); unknown keys are refused, naming the known."""
    if not isinstance(values, Mapping):
        raise OptionError(f"{where}: expected a mapping, found {type(values).__name__}", option=where)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in set(values) - set(known))
    if unknown:
        raise OptionError(
            f"{where}: unknown option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}",
            option=where,
            expected=f"some of {', '.join(sorted(known))}",
            found=unknown,
        )
    missing = [o.name for o in cls.__options__ if o.default is REQUIRED and o.name not in values]
    if missing:
        raise OptionError(f"{where}: missing {', '.join(missing)}", option=where, expected=", ".join(missing))
    return cls(**values)


# ---- command lines ----


def add_arguments(parser: Any, surface: str, *, check: bool = False) -> None:
    """The options on `surface` (megatron_lm, cli:export, ...) as argparse arguments, dest the flag's name.

    `check`: a bad value fails when the flags are parsed (Megatron-LM: at startup). The CLI leaves the checks to
    the config it builds, so a bad value is its one `error:` line."""
    for option in options(surface=surface):
        flag = option.flags.get(surface)
        if flag is None or flag.own:
            continue
        default = option.default if flag.default is REQUIRED else flag.default
        kw: dict[str, Any] = {"help": flag.help or option.doc, "required": flag.required}
        if flag.metavar:
            kw["metavar"] = flag.metavar
        if option.type in ("bool", "verify"):
            kw["action"] = "store_true"
        else:
            kw["default"] = None if default is REQUIRED else default
            if option.choices:
                kw["choices"] = option.choices
            kw["type"] = _parser(option, check)
        parser.add_argument(flag.flag, **kw)


def _parser(option: Option, check: bool) -> Callable[[str], Any]:
    convert = option.parse or {"int": int, "float": float}.get(option.type, str)
    if not check or option.choices:  # argparse checks choices itself
        return convert

    def parse(text: str) -> Any:
        try:
            return check_value(option, convert(text))
        except (ExportError, ValueError) as exc:  # argparse names the flag
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{option.key}: ")) from None

    parse.__name__ = option.type  # argparse names the type in its message for a ValueError
    return parse


def dest(flag: Flag) -> str:
    return flag.flag.lstrip("-").replace("-", "_")


def from_args(args: Any, section: str, surface: str) -> dict[str, Any]:
    """The values of `section`'s options on `surface` from parsed arguments (an absent attribute: the option's
    default, false for a switch; an empty string, as Megatron-LM's own --wandb-* default to: unset)."""
    values = {}
    for option in options(section, surface):
        flag = option.flags.get(surface)
        if flag is None or option.type in _CLASSES:
            continue
        if option.type == "bool":  # a store_true flag: absent is false
            value = bool(getattr(args, dest(flag), False))
        else:
            value = getattr(args, dest(flag), None if option.default is REQUIRED else option.default)
        values[option.name] = None if value == "" else value
    return values


# ---- the docs table ----

_SURFACE_TITLES = {"cli:export": "export", "cli:verify": "verify", "cli:push": "push", "cli:serve": "serve"}
_SECTION_TITLES = {
    "hook": f"`{YAML_KEY}:` (HookConfig; ExportOptions, export_adapter and load_hf_adapter where marked)",
    "verify": f"`{YAML_KEY}: verify:` (VerifyConfig)",
    "push": f"`{YAML_KEY}: push:` (PushConfig; the token comes from HF_TOKEN or `hf auth login`, never an option)",
    "serve": "ServeConfig: live delivery into a running vLLM server (`megatron-peft-export serve`; the API key comes "
    "from the environment variable `api_key_env` names, never an option)",
}


def markdown() -> str:
    """docs/options.md: one table per section, generated from the schema (tests/core/test_options.py keeps the
    committed file equal to it)."""
    lines = [
        "# Options",
        "",
        "Generated from `megatron_peft_export/core/options.py` by "
        "`python -m megatron_peft_export.core.options --markdown > docs/options.md`; do not edit by hand.",
        "Every option is checked where the configuration is made (HookConfig, the YAML section, export_adapter's "
        "arguments, the flags): a bad value fails there with what was expected, never first at a save.",
    ]
    for section, title in _SECTION_TITLES.items():
        lines += ["", f"## {title}", "", "| Option | Type | Default | Python | Megatron-LM flag | CLI | Description |"]
        lines.append("|---|---|---|---|---|---|---|")
        lines += [_row(o) for o in options(section)]
    return "\n".join(lines) + "\n"


def _row(option: Option) -> str:
    kind = "|".join(option.choices) if option.choices else option.type
    default = "required" if option.default is REQUIRED else f"`{option.default!r}`"
    python = ", ".join(s for s in (HOOK, EXPORT, CALL, IMPORT, VERIFY, PUSH, SERVE) if s in option.surfaces)
    megatron = option.flags.get(MLM)
    megatron_text = f"`{megatron.flag}`" + (" (Megatron-LM's own)" if megatron.own else "") if megatron else ""
    cli = ", ".join(f"{_SURFACE_TITLES[s]} `{f.flag}`" for s, f in option.flags.items() if s in _SURFACE_TITLES)
    cells = [f"`{option.name}`", kind, default, python, megatron_text, cli, option.doc]
    return "| " + " | ".join(c.replace("|", "\\|") if c is not kind else c.replace("|", " \\| ") for c in cells) + " |"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m megatron_peft_export.core.options --markdown")
    sys.stdout.write(markdown())
