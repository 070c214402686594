"""The package is layered: each module imports only modules of its own layer or below, and no modules import each
other in a loop. Imports are read from the source (all of them: at the top, inside functions, under TYPE_CHECKING).

Bottom to top: errors; core (pure); io (files); the low live modules (config, collectives, dialects, targets, check
rules); the export path (export, snapshots, multi-adapter, import); offline export; the services that run on a
published adapter (verify, W&B, Hub, serving); the hook; the framework integrations; the CLI and the package's face.
"""

from __future__ import annotations

import ast
from pathlib import Path

import megatron_peft_export

PACKAGE = Path(megatron_peft_export.__file__).parent
NAME = PACKAGE.name

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("core",),
    ("io",),
    ("config", "redact", "distributed", "dialects", "targets", "quantization", "compat"),
    ("export", "multi_adapter", "host_snapshot", "importer", "live"),
    ("offline",),
    ("services",),
    ("hook",),
    ("integrations",),
    ("cli", ""),
)
"""Each layer's modules and packages, by their path under the package ("" is the package's `__init__`)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for number, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members if m) or (module == "" and "" in members):
            return number
    raise AssertionError(f"{module or '__init__'} is in no layer: add it to LAYERS in {__file__}")


def imports(source: str, own: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that module `own` imports (a name imported from a package counts as its module if it
    is one)."""
    base = own.split(".") if is_package else own.split(".")[:-1]
    base = [b for b in base if b]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == NAME:
                target = node.module.removeprefix(NAME).lstrip(".")
            else:
                continue
            names = [f"{target}.{a.name}".lstrip(".") for a in node.names]
            found.update([n for n in names if n in modules] or [target])
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix(NAME).lstrip(".") for a in node.names if a.name.split(".")[0] == NAME)
    resolved = set()
    for target in found:
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in modules and target != own:
            resolved.add(target)
    return resolved


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports(p.read_text(), m, p.name == "__init__.py", set(paths)) for m, p in paths.items()}


def test_every_module_has_a_layer():
    for module in graph():
        layer_of(module)


def test_no_import_runs_upward():
    upward = [
        f"{m or '__init__'} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in graph().items()
        for t in targets
        if layer_of(t) > layer_of(m) and not t == ""
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_modules_import_each_other_in_a_loop():
    edges = graph()
    state: dict[str, int] = {}
    loops = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                loops.append(" -> ".join(trail[trail.index(target) :] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not loops, "\n".join(loops)


def test_the_graph_reader_sees_lazy_and_relative_imports():
    """The reader itself: an import inside a function, a relative import of a module and an absolute one count."""
    modules = {"core.plan", "io.peft_dir", "io", "hook", "cli"}
    source = "from ..core.plan import x\n\ndef f():\n    from ..hook import y\n    import megatron_peft_export.cli\n"
    assert imports(source, "io.peft_dir", False, modules) == {"core.plan", "hook", "cli"}
    assert layer_of("hook") > layer_of("io.peft_dir") > layer_of("core.plan")
