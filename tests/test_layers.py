"""The package's layering, read from its import statements: each layer imports only the
layers below it (``ir`` <- ``lowering`` <- ``backends`` <- ``autotune`` <- compile / export /
custom ops <- ``ops`` <- ``nn`` <- the package root and its CLI), lazily or not; module-level
imports form no cycle; no layer above the backends tests a backend's name; no file is much
past 400 lines."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "recurkit"
LAYERS = [("recurkit._version",), ("recurkit.ir",), ("recurkit.lowering",),
          ("recurkit.backends",), ("recurkit.autotune",),
          ("recurkit.compiler", "recurkit.export", "recurkit.custom_op", "recurkit.tiled_op",
           "recurkit.context"),
          ("recurkit.ops",), ("recurkit.nn",), ("recurkit", "recurkit.cli", "recurkit.demo")]
MAX_LINES = 420


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), is_pkg, path


def layer(mod: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    assert best is not None, mod
    return best[0]


def imports(mod: str, is_pkg: bool, path: Path, top_only: bool = False):
    """(imported module, line) for every import of a recurkit module in ``path``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else ast.walk(tree)
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "recurkit":
                    yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[:len(base) - node.level + 1]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "recurkit":
                continue
            for a in node.names:   # "from . import x" may name a submodule
                sub = f"{target}.{a.name}"
                as_module = (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() \
                    or (PKG.parent / Path(*sub.split("."))).is_dir()
                yield (sub if as_module else target), node.lineno


def test_every_import_points_down_the_layers():
    bad = []
    for mod, is_pkg, path in modules():
        for target, line in imports(mod, is_pkg, path):
            if layer(target) > layer(mod):
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} (layer "
                           f"{layer(mod)}) imports {target} (layer {layer(target)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_shared_backend_modules_import_no_backend():
    bad = []
    for mod, is_pkg, path in modules():
        if mod.startswith("recurkit.backends.shared") or mod == "recurkit.backends.base":
            for target, line in imports(mod, is_pkg, path):
                if target.startswith("recurkit.backends.") and not (
                        target.startswith("recurkit.backends.shared")
                        or target == "recurkit.backends.base"):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_module_level_imports_form_no_cycle():
    graph = {}
    for mod, is_pkg, path in modules():
        graph[mod] = {t for t, _ in imports(mod, is_pkg, path, top_only=True)}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            # importing a package's submodule runs the package first: not an edge back
            if t not in graph or m.startswith(t + "."):
                continue
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [m])


BACKEND_NAMES = {"torch", "tvm", "triton", "reference"}


def test_no_backend_name_is_tested_above_the_backends():
    """``backend == "tvm"``, ``backend in ("tvm", ...)``, ``{"cpu": "tvm"}[...]``: choices that
    belong to the registry (``recurkit.backends``) and the backends themselves."""
    bad = []
    for mod, _, path in modules():
        if mod.startswith("recurkit.backends"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            consts = []
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):   # ("tvm", "triton") anywhere
                consts += [e.value for e in node.elts if isinstance(e, ast.Constant)]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("startswith", "endswith"):
                consts += [a.value for a in node.args if isinstance(a, ast.Constant)]
            elif isinstance(node, ast.Compare):
                for c in [node.left, *node.comparators]:
                    if isinstance(c, ast.Constant):
                        consts.append(c.value)
                    elif isinstance(c, (ast.Tuple, ast.List, ast.Set)):
                        consts += [e.value for e in c.elts if isinstance(e, ast.Constant)]
            elif isinstance(node, ast.Dict):
                consts += [v.value for v in [*node.keys, *node.values]
                           if isinstance(v, ast.Constant)]
            if BACKEND_NAMES & {c for c in consts if isinstance(c, str)}:
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, "backend names tested outside the registry:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_files_are_of_a_readable_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PKG.parent)} has {n} lines: split it by meaning"
