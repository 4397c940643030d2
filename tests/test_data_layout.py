"""The layout of `unigendet.data`: imports point one way, down the layers its package docstring declares.

Every module of the package is parsed with `ast` (nothing is imported), so the checks see the
imports as written: (a) no package import hides inside a function (the usual way to dodge an
import cycle; only optional third-party modules in `LAZY_IMPORT_ALLOWLIST` may be imported on
first use), (b) the graph of imports between the data modules has no cycle, and (c) every module
sits in exactly one layer of the table in `engine/data/__init__.py` and imports only modules of
lower layers. The checkers run on small synthetic packages too, so a broken checker fails here.
"""
from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

import unigendet.data

PACKAGE_DIR = Path(unigendet.data.__file__).parent
ROOT = "__init__"  # the name the layer table gives the package's own __init__.py
# Third-party modules a function may import on first use (prefix match), and why: the package
# must import where they are not installed.
LAZY_IMPORT_ALLOWLIST = {
    "nvidia.dali": "NVIDIA DALI is optional: only the DALI loader needs it, when it runs",
}
_LAYER_ROW = re.compile(r"^ {4}(\d+) {2,}([A-Za-z_][\w.]*)(?: {2,}.*)?$")


def module_names(package_dir: Path) -> dict[str, Path]:
    """{dotted name relative to the package ("batch", "sources.folder", "sources" for
    sources/__init__.py, ROOT for the package itself): its file}."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts) or ROOT] = path
    return names


def _package_of(name: str, path: Path) -> list[str]:
    """The package a module's relative imports start from, as name parts ([] = the data package)."""
    parts = [] if name == ROOT else name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _ancestors(name: str) -> list[str]:
    """The packages Python initialises before `name`: ROOT, then each enclosing subpackage."""
    parts = [] if name == ROOT else name.split(".")
    return [ROOT] + [".".join(parts[:k]) for k in range(1, len(parts))]


def _relative_name(dotted: str, package_root: str) -> str | None:
    """"x.y" for "ROOT_PACKAGE.x.y", ROOT for the package itself, None for a module outside it."""
    if dotted == package_root:
        return ROOT
    return dotted[len(package_root) + 1:] if dotted.startswith(package_root + ".") else None


def _join(package: str, name: str) -> str:
    return name if package == ROOT else f"{package}.{name}"


def _targets(node: ast.Import | ast.ImportFrom, name: str, path: Path, modules: dict[str, Path],
             package_root: str) -> list[str]:
    """The data modules an import statement uses by name (none for imports from outside the package).
    `from P import x, y`: the modules P.x, P.y when they are modules, and P itself when a name is not."""
    if isinstance(node, ast.Import):
        return [t for alias in node.names if (t := _relative_name(alias.name, package_root)) is not None]
    if node.level == 0:
        base = _relative_name(node.module or "", package_root)
        if base is None:
            return []
    else:
        package = _package_of(name, path)
        if node.level - 1 > len(package):
            return []  # climbs out of the package (e.g. `from .. import ops` in unigendet.data)
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + (node.module.split(".") if node.module else [])) or ROOT
    submodules = [_join(base, a.name) for a in node.names if _join(base, a.name) in modules]
    return submodules if len(submodules) == len(node.names) else [base] + submodules


def _is_relative_or_package(node: ast.Import | ast.ImportFrom, package_root: str) -> bool:
    if isinstance(node, ast.ImportFrom) and node.level > 0:
        return True
    return any(_relative_name(n, package_root) is not None for n in _imported_names(node))


def _imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]


def imports_inside_functions(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements anywhere inside a function, method or lambda body."""
    found = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found += [n for n in ast.walk(func) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return sorted(set(found), key=lambda n: n.lineno)


def lazy_import_violations(package_dir: Path, package_root: str) -> list[str]:
    """One line per import inside a function that is a package import or not allowlisted."""
    problems = []
    for path in module_names(package_dir).values():
        for node in imports_inside_functions(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = _imported_names(node)
            if _is_relative_or_package(node, package_root):
                problems.append(f"{path}:{node.lineno}: package import inside a function ({ast.unparse(node)}); "
                                "import it at the top of the module and keep the layers acyclic")
            elif not all(any(n == ok or n.startswith(ok + ".") for ok in LAZY_IMPORT_ALLOWLIST) for n in names):
                problems.append(f"{path}:{node.lineno}: {ast.unparse(node)} inside a function; only optional "
                                f"dependencies ({', '.join(LAZY_IMPORT_ALLOWLIST)}) may be imported there")
    return problems


def import_graph(package_dir: Path, package_root: str) -> dict[str, dict[str, int]]:
    """{module: {imported data module: line}}, every import of the module (top level or not). Importing
    a.b.c also runs the packages a and a.b first: those count too, except the importer's own enclosing
    packages (already running); importing one of those by name still counts."""
    modules = module_names(package_dir)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        own = set(_ancestors(name))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, name, path, modules, package_root):
                if target != name:
                    edges.setdefault(target, node.lineno)
                for implied in _ancestors(target):  # run first by Python, unless they enclose the importer
                    if implied != name and implied not in own:
                        edges.setdefault(implied, node.lineno)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def declared_layers(package_dir: Path) -> dict[str, int]:
    """{module: layer} from the rows "    LAYER  MODULE  what it does" of the package docstring."""
    init = package_dir / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")), clean=False) or ""
    layers: dict[str, int] = {}
    for line in doc.splitlines():
        if match := _LAYER_ROW.match(line):
            layer, name = int(match[1]), match[2]
            assert name not in layers, f"{init}: module {name} is listed twice in the layer table"
            layers[name] = layer
    return layers


def layer_violations(package_dir: Path, package_root: str) -> list[str]:
    """One line per module missing from (or unknown to) the layer table, and per import that does not
    go to a strictly lower layer."""
    layers = declared_layers(package_dir)
    modules = module_names(package_dir)
    if not layers:
        return [f"{package_dir / '__init__.py'}: no layer table (rows '    LAYER  MODULE  job') in the docstring"]
    problems = [f"{path}: module {name} is not in the layer table of {package_dir / '__init__.py'}"
                for name, path in modules.items() if name not in layers]
    problems += [f"{package_dir / '__init__.py'}: the layer table lists {name}, which is not a module"
                 for name in layers if name not in modules]
    for name, edges in import_graph(package_dir, package_root).items():
        for target, line in edges.items():
            if name in layers and target in layers and layers[target] >= layers[name]:
                problems.append(f"{modules[name]}:{line}: {name} (layer {layers[name]}) imports {target} "
                                f"(layer {layers[target]}); a module may import only lower layers")
    return problems


# ------------------------------------------------------------------------------------ the package


def test_no_package_import_inside_a_function():
    assert lazy_import_violations(PACKAGE_DIR, "unigendet") == []


def test_import_graph_is_acyclic():
    cycle = find_cycle(import_graph(PACKAGE_DIR, "unigendet.data"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_follow_the_declared_layers():
    assert len(declared_layers(PACKAGE_DIR)) == len(module_names(PACKAGE_DIR))
    assert layer_violations(PACKAGE_DIR, "unigendet.data") == []


def test_optional_dali_stays_lazy():
    """The one allowlisted lazy import is really used lazily: no module imports nvidia.dali at the top."""
    for path in module_names(PACKAGE_DIR).values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not any(x.startswith("nvidia") for n in top for x in _imported_names(n)), path


# ------------------------------------------------------------------------------------ the checkers


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text), encoding="utf-8")
    return root


_GOOD = {
    "__init__.py": '''\
        """Demo.

            2  __init__  public names
            1  sub       dispatch
            0  leaf      the leaf
            0  sub.a     a source
        """
        from .leaf import X
        from .sub import pick
        ''',
    "leaf.py": "import os\nX = 1\n",
    "sub/__init__.py": "from . import a\nfrom ..leaf import X\n\ndef pick():\n    import nvidia.dali\n",
    "sub/a.py": "import json\n",
}


def test_checkers_accept_a_layered_package(tmp_path):
    pkg = _write_package(tmp_path / "pkg", _GOOD)
    assert lazy_import_violations(pkg, "pkg") == []
    assert find_cycle(import_graph(pkg, "pkg")) is None
    assert import_graph(pkg, "pkg")["sub"] == {"sub.a": 1, "leaf": 2}
    assert layer_violations(pkg, "pkg") == []


@pytest.mark.parametrize("rel, text, lazy, cycle, layer", [
    # a lazy import that breaks a cycle: all three checks fail
    ("sub/a.py", "def f():\n    from ..sub import pick\n", "package import inside a function", ["sub", "sub.a", "sub"],
     "sub.a (layer 0) imports sub (layer 1)"),
    # the same through the absolute package name, at the top
    ("leaf.py", "from pkg.sub.a import b\n", None, ["leaf", "sub", "leaf"], "leaf (layer 0) imports sub (layer 1)"),
    # a direct two-module cycle
    ("leaf.py", "from .sub import a\n", None, ["leaf", "sub", "leaf"], "leaf (layer 0) imports sub"),
    # a lazily imported third-party module that is not allowlisted
    ("sub/a.py", "def f():\n    import skimage.data\n", "only optional dependencies", None, None),
    # a module missing from the layer table
    ("extra.py", "X = 2\n", None, None, "module extra is not in the layer table"),
])
def test_checkers_reject_a_tangled_package(tmp_path, rel, text, lazy, cycle, layer):
    pkg = _write_package(tmp_path / "pkg", {**_GOOD, rel: text})
    lazy_found = lazy_import_violations(pkg, "pkg")
    assert (lazy is None and not lazy_found) or any(lazy in p for p in lazy_found), lazy_found
    assert find_cycle(import_graph(pkg, "pkg")) == cycle
    layer_found = layer_violations(pkg, "pkg")
    assert (layer is None and not layer_found) or any(layer in p for p in layer_found), layer_found
