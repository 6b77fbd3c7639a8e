"""The package's layout: imports between fcconv's modules form no circle and point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import fcconv

ROOT = Path(fcconv.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> list[str]:
    """Imports that run when the module is imported (module level and ``if TYPE_CHECKING:``), not
    those inside functions."""
    names: list[str] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + [s for h in getattr(node, "handlers", []) for s in h.body]
    return names


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {n for n in _top_level_imports(ast.parse(path.read_text())) if n in files and n != name}
            for name, path in files.items()}


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, route = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return route + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, route + [nxt]))
    return None


def test_no_import_circle_between_modules() -> None:
    # A package's __init__ re-exports its modules, so edges into packages are left out: a circle
    # here is two modules that import each other (directly or through others), type hints included.
    graph = _graph()
    packages = {name for name in graph if (ROOT.parent / name.replace(".", "/") / "__init__.py").is_file()}
    modules = {name: deps - packages for name, deps in graph.items() if name not in packages}
    circles = [c for name in sorted(modules) if (c := _cycle_from(name, modules))]
    assert not circles, f"import circles: {circles[:3]}"


def test_big_images_deployment_and_viewer_do_not_import_the_package_root() -> None:
    # Arrows point one way: fcconv/__init__ re-exports them, so they import the modules they need.
    for package in ("tiling", "onnx", "viewer", "models"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    assert node.module != "fcconv", f"{path.relative_to(ROOT)} imports the package root"
                elif isinstance(node, ast.Import):
                    assert "fcconv" not in [a.name for a in node.names], f"{path.relative_to(ROOT)}"
