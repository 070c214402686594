"""The documentation cannot drift from the code: README.md and docs/*.md are read as a user would.

- every relative link resolves to a file of the repository, and every `#anchor` to a heading of that file;
- every `megatron-peft-export <command>` names a command of the CLI, and every `--flag` on such a line (in code
  blocks, where users copy from) is an option of that command;
- every Megatron-LM flag of ours (`--export-hf-adapter`, `--hf-adapter-*`) anywhere in the docs is one that
  `megatron_lm.add_args` defines; every `bench/run.py` flag in a code block is one of the benchmark's;
- any other `--flag` anywhere in the docs is one of the other programs' flags listed in OTHER_FLAGS (Megatron-LM's
  own ones checked against its source when it is on this machine), so a new one is added there knowingly;
- README.md stays a first screen plus pointers (under 200 lines) and keeps the two set-up commands verbatim
  (`.ci/run` runs the second).
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INSTALL = (
    "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[test]' && "
    ".venv/bin/python examples/train_tiny_gpt.py"
)
TESTS = ".venv/bin/python -m pytest"

MEGATRON_LM_OWN = [
    "--save",
    "--save-interval",
    "--async-save",
    "--use-persistent-ckpt-worker",
    "--ckpt-convert-format",
    "--exit-duration-in-mins",
    "--exit-interval",
    "--exit-signal-handler",
    "--non-persistent-save-interval",
    "--train-iters",
]
OTHER_FLAGS = {
    **dict.fromkeys(MEGATRON_LM_OWN, "Megatron-LM"),
    "--nproc-per-node": "torchrun",
    "--max-lora-rank": "vLLM's server",
    "--max-cpu-loras": "vLLM's server",
    "--enable-lora": "vLLM's server",
    "--api-key": "vLLM's server",
    "--check": "ruff format",
    "--markdown": "python -m megatron_peft_export.core.options, the generator of docs/options.md",
}

LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
OUR_LM_FLAG = re.compile(r"(?<![\w-])--(?:export-hf-adapter|hf-adapter-[a-z0-9-]+)")
COMMAND = re.compile(r"megatron-peft-export\s+([a-z][a-z-]*)")


def _prose_and_code(text: str) -> tuple[list[str], list[str]]:
    """Lines outside fenced code blocks (inline code removed) and the commands inside them (continuations joined,
    comments dropped)."""
    prose, code, fence, pending = [], [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            prose.append(line)
            continue
        line = re.sub(r"(^|\s)#.*$", "", line)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        code.append(pending + line)
        pending = ""
    return prose, code


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, punctuation other than - and _ dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    prose, _ = _prose_and_code(path.read_text())
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(path: Path) -> list[str]:
    prose, _ = _prose_and_code(path.read_text())
    text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in prose)
    broken = []
    for _, target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and (resolved.suffix != ".md" or anchor not in _anchors(resolved)):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.name}")
    return broken


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


@functools.cache
def cli_commands() -> dict[str, set[str]]:
    from megatron_peft_export.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: _options(sub) | _options(parser) for name, sub in commands.choices.items()}


@functools.cache
def megatron_lm_flags() -> set[str]:
    from megatron_peft_export.integrations import megatron_lm

    return _options(megatron_lm.add_args(argparse.ArgumentParser()))


@functools.cache
def bench_flags() -> set[str]:
    """The options bench/run.py declares (read from its source: importing it starts megatron)."""
    tree = ast.parse((ROOT / "bench" / "run.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"]
    return {a.value for c in calls for a in c.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}


def unknown_names(path: Path, commands: dict[str, set[str]], lm: set[str], bench: set[str]) -> list[str]:
    prose, code = _prose_and_code(path.read_text())
    unknown = []
    for line in prose + code:
        unknown += [f"megatron-peft-export {c}: no such command" for c in COMMAND.findall(line) if c not in commands]
        unknown += [
            f"{f}: not a Megatron-LM flag of megatron_lm.add_args" for f in OUR_LM_FLAG.findall(line) if f not in lm
        ]
    for line in code:
        match = COMMAND.search(line)
        if match and match.group(1) in commands:
            options = commands[match.group(1)]
            flags = FLAG.findall(line[match.end() :])
            unknown += [
                f"{f}: not an option of megatron-peft-export {match.group(1)}" for f in flags if f not in options
            ]
        if "bench/run.py" in line:
            unknown += [f"{f}: not an option of bench/run.py" for f in FLAG.findall(line) if f not in bench]
    return unknown


def foreign_flags(path: Path, ours: set[str]) -> list[str]:
    """Flags that are neither ours nor listed in OTHER_FLAGS; `--x-` (written `--x-*`) must start one of ours."""
    unknown = []
    for flag in FLAG.findall(path.read_text()):
        if flag.endswith("-"):
            if not any(known.startswith(flag) for known in ours):
                unknown.append(f"{flag}*: no flag of ours starts so")
        elif flag not in ours and flag not in OTHER_FLAGS:
            unknown.append(f"{flag}: neither ours nor in OTHER_FLAGS")
    return unknown


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_flag_shown_exists(path):
    assert unknown_names(path, cli_commands(), megatron_lm_flags(), bench_flags()) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_other_flag_is_a_known_one(path):
    ours = set().union(*cli_commands().values()) | megatron_lm_flags() | bench_flags()
    assert foreign_flags(path, ours) == []


def test_megatron_lm_own_flags_exist_in_its_source():
    from tests.support.megatron_lm import megatron_lm_dir

    source = megatron_lm_dir()
    if source is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Megatron-LM's source is missing (CI must check the flags the docs name)", pytrace=False)
        pytest.skip("Megatron-LM's source is not on this machine ($MEGATRON_LM or ../shared/thirdparty)")
    text = "\n".join(p.read_text() for p in (source / "megatron" / "training").glob("*.py"))
    missing = [f for f in MEGATRON_LM_OWN if not re.search(rf"\b{f[2:].replace('-', '_')}\b", text)]
    assert missing == []


def test_readme_is_a_first_screen_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    _, code = _prose_and_code(readme)
    assert INSTALL in code and TESTS in code
    for page in ("docs/options.md", "docs/architecture.md", "docs/guarantees.md"):
        assert f"]({page}" in readme, page
