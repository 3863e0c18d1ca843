"""The package's import graph: no loops, layers point down, ``import fastdiag`` stays cheap.

The graph is read from the source (module-level imports only: an import inside a function is
a deliberate lazy load), so a loop fails here before it bites at runtime; every module is also
imported for real in fresh interpreters.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastdiag"
KERNELS = ROOT / "kernels"  # installed as fastdiag.kernels


def _modules() -> dict[str, Path]:
    found = {}
    for base, prefix in ((PACKAGE, "fastdiag"), (KERNELS, "fastdiag.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(module: str, path: Path) -> set[str]:
    """fastdiag modules imported when ``module`` is imported (not inside functions/classes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node)
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # submodules imported by name
            elif isinstance(node, (ast.If, ast.Try)):
                # `if TYPE_CHECKING:` imports never run
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    visit(block)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return {m for m in out if m in MODULES and m != module}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        deps = _top_level_imports(module, path)
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        closure = set()
        for dep in deps:
            parts = dep.split(".")
            closure.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        graph[module] = {d for d in closure if d in MODULES and d != module and not module.startswith(d + ".")}
    return graph


def test_no_import_loops():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                loops.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                dfs(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            dfs(module)
    assert not loops, "import loops:\n" + "\n".join(" -> ".join(loop) for loop in loops)


LOWER_LAYERS = {
    # a module of this layer ...                 may not import these at module level
    "fastdiag.ops": ("fastdiag.kernels", "fastdiag.diagnostics", "fastdiag.integrations",
                     "fastdiag.store", "fastdiag.report", "fastdiag.accumulator"),
    "fastdiag.kernels": ("fastdiag.diagnostics", "fastdiag.integrations", "fastdiag.store",
                         "fastdiag.report", "fastdiag.accumulator", "fastdiag.backends"),
    "fastdiag.backends": ("fastdiag.ops", "fastdiag.kernels", "fastdiag.diagnostics"),
    "fastdiag._extension": ("fastdiag.ops", "fastdiag.kernels", "fastdiag.backends"),
    "fastdiag.diagnostics": ("fastdiag.integrations", "fastdiag.store", "fastdiag.report",
                             "fastdiag.kernels"),
    "fastdiag.accumulator": ("fastdiag.diagnostics", "fastdiag.integrations", "fastdiag.kernels"),
}


def test_layers_point_down():
    graph = _graph()
    bad = []
    for module, deps in graph.items():
        for layer, forbidden in LOWER_LAYERS.items():
            if module == layer or module.startswith(layer + "."):
                bad += [f"{module} imports {d}" for d in deps if d.startswith(forbidden)]
    assert not bad, "\n".join(sorted(bad))


def test_kernel_modules_read_only_layouts_of_ops():
    """Kernels import the op's layout leaf (``_<op>_layout``), never the op module or dispatch."""
    graph = _graph()
    bad = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        if m.startswith("fastdiag.kernels.")
        for d in deps
        if d.startswith("fastdiag.ops.") and not d.rsplit(".", 1)[-1].endswith("_layout")
    ]
    assert not bad, "\n".join(bad)


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_every_module_imports_first():
    """Each module imported first, in a forked child of an interpreter that holds only torch
    (a fresh interpreter per module, without paying torch's import ~70 times): a loop that
    the static graph missed shows up as an ImportError here."""
    names = [m for m in MODULES if m != "fastdiag.__main__"]
    code = f"""
import importlib, os, sys
import numpy, torch
bad = []
for name in {names!r}:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            sys.stdout.write(f"{{name}}: {{type(exc).__name__}}: {{exc}}\\n")
            sys.stdout.flush()
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)
"""
    failures = _run(code)
    assert not failures.strip(), failures


def test_resolve_is_constant_for_dynamo():
    """backends marks resolve() as dynamo does, without importing torch._dynamo at import."""
    import torch._dynamo

    from fastdiag import backends

    probe = torch._dynamo.assume_constant_result(lambda: None)
    markers = {k for k in vars(probe) if k.startswith("_dynamo")}
    assert markers and all(getattr(backends.resolve, k, None) is True for k in markers)


def test_import_fastdiag_ops_loads_no_kernel_and_builds_nothing():
    out = _run(
        "import sys, fastdiag, fastdiag.ops, fastdiag.diagnostics\n"
        "print(sorted(m for m in sys.modules if m.startswith(\n"
        "    ('triton', 'fastdiag.kernels', 'torch._dynamo'))))\n"
        "from fastdiag import _extension\n"
        "print(_extension._state)\n"
    )
    assert out.splitlines() == ["[]", "{}"], out
