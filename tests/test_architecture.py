"""The import rules of docs/architecture.md, checked on the source (every import, also inside functions).

Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "megabert"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` gives ``a`` and ``a.b``), run-time imports only."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _violations(sources: tuple[str, ...], forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in IMPORTS.items() if _in(module, *sources)
        for target in targets if _in(target, *forbidden) and not _in(target, *allowed)
    )


def test_the_scan_sees_the_package():
    assert {"megabert.modeling.layers", "megabert.train.engine.trainer", "megabert.cli", "megabert.fast_paths"} <= set(MODULES)
    assert "megabert.modeling.attention" in IMPORTS["megabert.modeling.layers"]


def test_modeling_is_single_device_model_code():
    forbidden = tuple(f"megabert.{p}" for p in ("train", "convert", "inference", "data", "commands", "cli",
                                                "serving", "demo", "tokenization")) + ("torch.distributed",)
    assert _violations(("megabert.modeling",), forbidden) == []


def test_fast_paths_know_no_model_code():
    """megabert.fast_paths is applied to a model from outside; it imports nothing but torch, numpy and errors."""
    assert _violations(("megabert.fast_paths",), ("megabert",), ("megabert.fast_paths", "megabert.errors")) == []


def test_convert_and_data_do_not_reach_into_training_or_model_internals():
    # convert/ may load and save models (pretrained.py, the model classes), nothing below that
    assert _violations(("megabert.convert",), ("megabert.train", "megabert.modeling", "megabert.inference"),
                       ("megabert.modeling.pretrained", "megabert.modeling.heads")) == []
    assert _violations(("megabert.data",), ("megabert.train", "megabert.modeling", "megabert.inference",
                                            "megabert.convert")) == []


# The argparse.Namespace objects inside Megatron checkpoints are data: reading and writing them
# needs the class, not a parser.
NAMESPACE_AS_DATA = ("megabert.convert.megatron_args", "megabert.safe_pickle",
                     "megabert.safe_pickle", "megabert.convert.to_torch_dist")


def test_only_commands_and_cli_parse_arguments():
    users = sorted(m for m, targets in IMPORTS.items() if "argparse" in targets)
    outside = [m for m in users if not _in(m, "megabert.commands", "megabert.cli") and m not in NAMESPACE_AS_DATA]
    assert outside == []
    for module in NAMESPACE_AS_DATA:
        if module in MODULES:
            assert "ArgumentParser" not in MODULES[module].read_text(encoding="utf-8"), module


def test_no_module_registers_a_process_wide_hook_or_reads_the_environment_in_modeling():
    for name, path in MODULES.items():
        if not _in(name, "megabert.modeling"):
            continue
        text = path.read_text(encoding="utf-8")
        for word in ("os.environ", "getenv", "register_optimizer_step", "register_module_forward",
                     "register_module_full_backward"):
            assert word not in text, f"{name} uses {word}"


def _cycles() -> list[list[str]]:
    graph = {m: sorted(t for t in targets if t in MODULES and t != m) for m, targets in IMPORTS.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongly_connected(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                strongly_connected(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            strongly_connected(node)
    return found


def test_no_import_circles_between_modules():
    # A package's __init__ importing its own submodules (to re-export them) is not a circle.
    assert _cycles_without_reexports() == []


def _cycles_without_reexports() -> list[list[str]]:
    """Cycles, once the edges from a package's __init__ to its own submodules are dropped."""
    saved = {m: set(t) for m, t in IMPORTS.items()}
    try:
        for module, targets in IMPORTS.items():
            if MODULES[module].name == "__init__.py":
                IMPORTS[module] = {t for t in targets if not t.startswith(module + ".")}
        return _cycles()
    finally:
        IMPORTS.update(saved)


@pytest.mark.parametrize("package", ["modeling", "fast_paths", "train", "convert", "data", "inference", "serving",
                                     "commands"])
def test_docs_architecture_names_every_package(package):
    text = (SRC.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert f"`{package}/`" in text
