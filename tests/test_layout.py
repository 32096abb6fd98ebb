"""The package's layout: imports between allconv_cli's modules form no cycle, and the library
imports our own modules at the top of a file, never inside a function (an import hidden in a
function is how a cycle hides)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "allconv_cli"

# Imports inside library functions that are allowed, each for a reason: (module, imported).
FUNCTION_IMPORTS_ALLOWED = {
    # onnx, onnxscript and onnxruntime take seconds to import and serve one export format only
    ("allconv_cli.export", "onnx"),
    ("allconv_cli.export", "onnxruntime"),
    ("allconv_cli.export", "ml_dtypes"),  # comes with onnx; only bf16 ONNX checks need it
    # matplotlib takes about a second to import; only the saliency figures need it
    ("allconv_cli.explain.figures", "matplotlib"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def is_library(name: str) -> bool:
    """The CLI imports torch and the library inside command bodies on purpose (a fast --help)."""
    return not (name == "allconv_cli.cli" or name.startswith("allconv_cli.cli."))


def imported(node: ast.AST, importer: str, known: set[str]) -> list[str]:
    """Our modules an import statement loads (``from allconv_cli.data import datasets`` loads both)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return []
    found = []
    for name in names:
        if name in known:
            found.append(name)
    return [n for n in found if n.startswith("allconv_cli.") and n != importer]


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    edges = {}
    for name, tree in trees.items():
        targets = set()
        for node in ast.walk(tree):
            targets.update(imported(node, name, known))
        # a package's __init__ runs on importing any module below it: depend on it too
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    return edges


def test_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_library_imports_at_the_top():
    hidden = []
    for name, tree in modules().items():
        if not is_library(name):
            continue
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if module.startswith("allconv_cli") or (name, module.split(".")[0]) not in FUNCTION_IMPORTS_ALLOWED:
                        hidden.append(f"{name}.{function.name}: import {module}")
    assert not hidden, "imports inside library functions: " + "; ".join(hidden)


LONGEST_FUNCTION = 60  # lines of a library function's body, its docstring counted


def test_no_long_library_function():
    long = []
    for name, tree in modules().items():
        if not is_library(name):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.body[0].lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert not long, "library functions over 60 lines: " + ", ".join(long)
