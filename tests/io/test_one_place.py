"""Each file-format fact is spelled in one module: the PEFT adapter directory's names in core/peft_names.py, Megatron's
checkpoint layout in io/checkpoints.py; every other module imports them.

The string literals of each module are read with the tokenizer (f-strings whole, as written). Documentation is
exempt: docstrings and other bare string statements may name the files, as may comments; a string any code uses
(a message, a help text, a key, a path, a pattern) may not. Messages name an iteration directory by the
placeholder `iter_XXXXXXX` (io.checkpoints.ITERATION_PLACEHOLDER); that prose form is allowed, as are example paths
with digits; what builds or matches the layout (a format, a pattern or a glob) is not.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

import megatron_peft_export

PACKAGE = Path(megatron_peft_export.__file__).parent
PEFT_NAMES = re.compile(r"adapter_model|base_model\.model\.")
LAYOUT = re.compile(r"latest_checkpointed_iteration|iter_[{%(\\*\[]")
OWNERS = {PEFT_NAMES: "core/peft_names.py", LAYOUT: "io/checkpoints.py"}


def _documentation(tree: ast.AST) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) of every bare string statement: docstrings and the attribute docs under constants."""
    return [
        ((node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset))
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    ]


def string_literals(source: str) -> list[tuple[int, str]]:
    """(line, text as written) of every string literal that is not documentation."""
    docs = _documentation(ast.parse(source))
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.STRING:
            continue
        if not any(start <= token.start and token.end <= end for start, end in docs):
            found.append((token.start[0], token.string))
    return found


def spellings(pattern: re.Pattern[str], owner: str) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == owner:
            continue
        for line, text in string_literals(path.read_text()):
            if pattern.search(text):
                found.append(f"{relative}:{line}: {text[:100]}")
    return found


@pytest.mark.parametrize("pattern", list(OWNERS), ids=["peft_dir", "checkpoints"])
def test_only_the_owner_spells_the_names(pattern):
    owner = OWNERS[pattern]
    found = spellings(pattern, owner)
    assert not found, f"spelled outside {owner} (import its names instead):\n" + "\n".join(found)


def test_the_owners_spell_them_and_the_scan_sees_code_but_not_documentation():
    """The scan finds what it looks for (else the test above could never fail), in code strings only."""
    assert spellings(PEFT_NAMES, "nothing") and spellings(LAYOUT, "nothing")
    source = (
        '"""adapter_model.safetensors in a docstring."""\n'
        "X = 1\n"
        '"""iter_{n:07d} documented under a constant."""\n'
        "# base_model.model. in a comment\n"
        'def f(n):\n    """latest_checkpointed_iteration.txt"""\n    return f"iter_{n:07d}", "a" "adapter_model.bin"\n'
    )
    literals = string_literals(source)
    assert [line for line, _ in literals] == [7, 7, 7]
    assert [bool(LAYOUT.search(t)) for _, t in literals] == [True, False, False]
    assert [bool(PEFT_NAMES.search(t)) for _, t in literals] == [False, False, True]
    assert not LAYOUT.search('"expected an iter_XXXXXXX directory, e.g. runs/iter_0000500"')
