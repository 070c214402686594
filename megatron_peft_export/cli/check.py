"""`megatron-peft-export check`: what a server refuses or serves wrong in an HF LoRA adapter.

For vLLM the answer comes from vLLM itself when it is at hand (`serving_vllm`: its own loader on the base model's
architecture), else from the rules of a vLLM version (`compat`). Adapters are read with the strict reader
(`io.peft_dir`): a malformed one is bad input (exit 2), never "compatible".
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..compat import (
    TARGETS,
    VLLM_DEFAULT,
    VLLM_VERSIONS,
    Finding,
    check_adapter,
    has_errors,
    parse_vllm_version,
)
from ..errors import ExportError
from ..io.hf_config import read_hf_config
from ..io.peft_dir import ADAPTER_CONFIG, read_adapters
from ..services.serving_vllm import ENV_VAR, ProbeFailed, applied_summary, engine_findings, engine_python, run_probe

EXAMPLES = f"""examples:
  megatron-peft-export check runs/llama/iter_0000500/hf_adapter
  megatron-peft-export check ADAPTER --base /models/Mixtral-8x7B       # where vLLM applies experts
  megatron-peft-export check ADAPTER --vllm-python .venv-vllm/bin/python   # ask vLLM itself (its loader)
  megatron-peft-export check ADAPTER --vllm-version 0.31               # the rules for another vLLM version
  megatron-peft-export check out/adapters --target peft                # a multi-adapter directory: every adapter in it

vLLM is asked when --vllm-python or ${ENV_VAR} names a python that has it, or when it is importable here;
otherwise the rules for --vllm-version (default {VLLM_DEFAULT}, the newest known) decide.

exit status: 0 compatible (warnings and notes allowed), 1 a finding is an error for the target, 2 bad input"""


def register(commands) -> None:
    parser = commands.add_parser(
        "check",
        help="check an HF LoRA adapter for what a server (vLLM by default) refuses or serves wrong",
        description=f"Read {ADAPTER_CONFIG} and the weights file's header (no tensor data) and report, per adapter, "
        "each feature the target refuses or serves wrong (DoRA, modules_to_save, bias, per-module ranks or scales, "
        "unusual ranks, module names the model does not apply, engine flags), with the reason and what to change.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "adapter_dir",
        metavar="ADAPTER_DIR",
        help="HF PEFT adapter directory (peft's multi-adapter layout: each subdirectory too)",
    )
    parser.add_argument(
        "--target",
        default="vllm",
        choices=TARGETS,
        help="the server to check for: vllm (default) or peft (transformers + peft)",
    )
    parser.add_argument(
        "--base",
        metavar="DIR",
        help="the base model's directory (its config.json gives the architecture vLLM loads the adapter on); "
        "default: the adapter's base_model_name_or_path when that is a local directory",
    )
    parser.add_argument(
        "--vllm-version",
        metavar="VERSION",
        help=f"judge by the rules for this vLLM version instead of asking vLLM (known: {', '.join(VLLM_VERSIONS)})",
    )
    parser.add_argument(
        "--vllm-python",
        metavar="PATH",
        help=f"python of an environment with vLLM, to ask it (default: ${ENV_VAR}, or this python if it has vLLM)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the verdict line per adapter")
    parser.set_defaults(run=run)


def _base(explicit: str | None, config: dict[str, Any]) -> Path | None:
    if explicit:
        if not (Path(explicit) / "config.json").is_file():
            raise ExportError(
                f"--base {explicit}: expected a base model directory with config.json, found "
                f"{'no config.json' if Path(explicit).is_dir() else 'no directory'}"
            )
        return Path(explicit)
    recorded = config.get("base_model_name_or_path")
    return (
        Path(recorded)
        if isinstance(recorded, str) and recorded and (Path(recorded) / "config.json").is_file()
        else None
    )


def _version_note(version: str) -> str | None:
    ours = parse_vllm_version(version)
    if ours > parse_vllm_version(VLLM_VERSIONS[-1]):
        return (
            f"rules read from vLLM {VLLM_VERSIONS[0]}-{VLLM_VERSIONS[-1]}; {version} may differ "
            "(ask vLLM itself: --vllm-python)"
        )
    if ours < parse_vllm_version(VLLM_VERSIONS[0]):
        return (
            f"rules for vLLM <= {VLLM_VERSIONS[0]} were read from {VLLM_VERSIONS[0]}; {version} may differ "
            "(ask vLLM itself: --vllm-python)"
        )
    return None


def _ask_vllm(python: str, adapters: dict, bases: dict) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """vLLM's answer per adapter (one probe per base model), and a note for each question it could not answer (the
    rules decide those)."""
    answers: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for base in dict.fromkeys(bases.values()):
        names = [n for n, b in bases.items() if b == base]
        try:
            result = run_probe(python, {n: adapters[n][0] for n in names}, base)
        except ProbeFailed as exc:
            notes.append(f"note: could not ask vLLM ({exc}); the rules for vLLM {VLLM_DEFAULT} decide")
            continue
        if result.get("model_error"):
            notes.append(
                f"note: vLLM {result['vllm']} could not build the base model {base} "
                f"({result['model_error'][:300]}); "
                "its module names were judged by the rules"
            )
        for n in names:
            if result["adapters"].get(n, {}).get("probe_error"):
                notes.append(
                    f"note: could not ask vLLM {result['vllm']} about {n!r} "
                    f"({result['adapters'][n]['probe_error'][:200]}); "
                    f"the rules for vLLM {VLLM_DEFAULT} decide"
                )
            else:
                answers[n] = result
    return answers, notes


def run(args: argparse.Namespace) -> int:
    if args.vllm_version is not None:
        parse_vllm_version(args.vllm_version)
        if args.vllm_python:
            raise ExportError(
                f"--vllm-version {args.vllm_version} asks for the rules, --vllm-python {args.vllm_python} for vLLM "
                f"itself; pass one of them"
            )
    adapters = read_adapters(args.adapter_dir)
    bases = {name: _base(args.base, config) for name, (_, config, _) in adapters.items()}
    model_types = {
        name: (read_hf_config(str(base)) or {}).get("model_type") if base else None for name, base in bases.items()
    }
    python = engine_python(args.vllm_python) if args.target == "vllm" and args.vllm_version is None else None
    answers, notes = _ask_vllm(python, adapters, bases) if python else ({}, [])
    for note in notes:
        print(note)
    version = args.vllm_version or VLLM_DEFAULT
    if args.target == "vllm" and not answers and (note := _version_note(version)):
        print(f"note: {note}")
    status = 0
    for name, (_, config, shapes) in adapters.items():
        where = args.adapter_dir if name == "default" else f"{args.adapter_dir} (adapter {name!r})"
        result = answers.get(name)
        if result is not None:
            findings = engine_findings(result, name, config, shapes, model_types[name])
            asked = " on " + result["model"]["class"] if result.get("model") else ", no base model"
            against = f"vLLM {result['vllm']} (asked vLLM{asked})"
        else:
            findings = check_adapter(config, shapes, args.target, vllm_version=version, model_type=model_types[name])
            against = (
                f"vLLM {version} (rules{', ' + model_types[name] if model_types[name] else ', no base model'})"
                if args.target == "vllm"
                else "peft"
            )
        _print(where, against, findings, args.quiet)
        if result is not None and not args.quiet:
            for line in applied_summary(result["adapters"][name]):
                print(f"  applies: {line}")
        status = max(status, 1 if has_errors(findings) else 0)
    return status


def _print(where: str, against: str, findings: list[Finding], quiet: bool) -> None:
    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    verdict = "NOT compatible" if errors else "compatible"
    print(
        f"{where}: {verdict} with {against}: {errors} error(s), {warnings} warning(s), "
        f"{len(findings) - errors - warnings} note(s)"
    )
    if not quiet:
        for finding in findings:
            print(f"  {finding.line()}")
