"""Packaging: the declared dependencies are the ones the code imports, and a plain `pip install .` into a
fresh environment gives a working `unigendet` command.

The import check reads engine/ and kernels/ with `ast` (nothing is imported). The install check builds the
working tree (tracked and untracked, not ignored, files, copied aside) into a new venv that has nothing but
the torch this environment runs and the build requirements; everything else must come from
pyproject.toml's [project.dependencies].
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
SOURCE_DIRS = ("engine", "kernels")
# kernels/ needs triton at import; the engine imports kernels/ only inside functions, after
# engine/ops/triton_support.py found triton installed (checked below).
OPTIONAL_AT_MODULE_LEVEL = {"kernels": {"triton"}}


def _dist_name(requirement: str) -> str:
    """'torch>=2.7' -> 'torch'; 'Scikit_Learn' -> 'scikit-learn' (normalised as pip compares names)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert name, f"pyproject.toml: requirement {requirement!r} has no distribution name"
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


REQUIRED = {_dist_name(r) for r in PROJECT["dependencies"]}
EXTRAS = {extra: {_dist_name(r) for r in reqs} for extra, reqs in PROJECT["optional-dependencies"].items()}


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(top-level module, imported at module level?, line) for every absolute import in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], not in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], not in_function, child.lineno))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _third_party_imports() -> list[tuple[str, str, bool]]:
    """(module, 'file:line', module level?) for every import that is neither stdlib nor unigendet itself."""
    out = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, top, line in _imports(path):
                if module in sys.stdlib_module_names or module in ("unigendet", "__future__"):
                    continue
                out.append((module, f"{path.relative_to(ROOT)}:{line}", top))
    return out


@functools.cache
def _module_owners() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # top-level module -> distributions (a full scan)


def _distributions(module: str, where: str) -> set[str]:
    dists = _module_owners().get(module)
    assert dists, (f"{where} imports {module!r}, which no installed distribution provides: declare it in "
                   "pyproject.toml ([project.dependencies] or an extra) and install it (make venv)")
    return {_dist_name(d) for d in dists}


def test_module_level_imports_are_runtime_dependencies():
    """What `import unigendet` (and any of its modules) needs is in [project.dependencies]."""
    undeclared = []
    for module, where, top in _third_party_imports():
        folder = where.split("/")[0]
        if not top or module in OPTIONAL_AT_MODULE_LEVEL.get(folder, set()):
            continue
        if not _distributions(module, where) & REQUIRED:
            undeclared.append(f"{where}: {module} ({', '.join(sorted(_distributions(module, where)))})")
    assert not undeclared, "imported at module level but not in [project.dependencies]:\n" + "\n".join(undeclared)


def test_function_level_imports_are_declared():
    """Imports deferred into functions (optional features) are declared: as dependencies or in an extra."""
    declared = REQUIRED.union(*EXTRAS.values())
    undeclared = [f"{where}: {module}" for module, where, top in _third_party_imports()
                  if not _distributions(module, where) & declared]
    assert not undeclared, "imported but declared nowhere in pyproject.toml:\n" + "\n".join(undeclared)


def test_optional_modules_are_imported_lazily():
    """The module-level optional imports of kernels/ never run on `import unigendet`: the engine reaches
    kernels/ only from inside functions."""
    eager = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for path in sorted((ROOT / "engine").rglob("*.py"))
             for node in ast.parse(path.read_text()).body
             if isinstance(node, ast.ImportFrom) and node.module and "kernels" in node.module.split(".")]
    assert not eager, f"module-level imports of unigendet.kernels (needs triton): {eager}"
    for extra in ("triton",):
        assert OPTIONAL_AT_MODULE_LEVEL["kernels"] <= EXTRAS[extra], f"the {extra} extra must provide it"


def test_requires_python_matches_the_lint_target():
    """ruff checks syntax against the oldest Python the package declares (and tomllib needs 3.11)."""
    floor = re.fullmatch(r">=\s*3\.(\d+)", PROJECT["requires-python"])
    assert floor, f"pyproject.toml: requires-python {PROJECT['requires-python']!r} is not of the form '>=3.N'"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{floor.group(1)}"
    assert int(floor.group(1)) >= 11, "engine/config.py imports tomllib (Python 3.11)"


def test_dev_extra_holds_every_other_extra_the_tests_need():
    """`make test` installs .[triton,dali,dev]: the export and tensorboard features are tested too."""
    assert EXTRAS["export"] | EXTRAS["tensorboard"] <= EXTRAS["dev"]
    assert {"pytest", "ruff"} <= EXTRAS["dev"]


def _working_tree_copy(dest: Path) -> Path:
    """The files a fresh clone of the working tree would have (tracked, and untracked but not ignored)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: the files to package cannot be listed")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not packaged
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int) -> str:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_gives_a_working_command(tmp_path):
    """About 90 s on 2 cores: a venv without pip (this environment's pip drives it with --python), the same
    torch as here (public version, so a CPU build resolves to the same wheel), the build requirements,
    then `pip install .` without the extension (tested in test_ext.py), and `unigendet info` from its bin/."""
    src = _working_tree_copy(tmp_path / "src")
    venv = tmp_path / "fresh"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {"UNIGENDET_NO_EXT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env, tmp_path, 120)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile"]
    torch = importlib.metadata.version("torch").split("+")[0]
    build = [r for r in PYPROJECT["build-system"]["requires"] if _dist_name(r) != "torch"]
    _run(pip + [f"torch=={torch}", *build], env, tmp_path, 600)
    _run(pip + ["--no-build-isolation", "."], env, src, 600)

    out = _run([str(venv / "bin" / "unigendet"), "info"], env, tmp_path, 300)
    version = next(node.value.value for node in ast.parse((ROOT / "engine/__init__.py").read_text()).body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "__version__")
    assert out.startswith(f"unigendet {version} "), out[:200]
    assert "unigendet._C" in out and "reference  ok" in out
    # every module but kernels/ (triton is an extra) imports with the declared dependencies alone, and every
    # package folder of engine/ was installed
    probe = ("import importlib, json, pkgutil, unigendet\n"
             "names = [m.name for m in pkgutil.walk_packages(unigendet.__path__, 'unigendet.')\n"
             "         if not m.name.startswith('unigendet.kernels')]\n"
             "for name in names: importlib.import_module(name)\n"
             "print(json.dumps({'file': unigendet.__file__, 'modules': names}))")
    installed = json.loads(_run([str(python), "-c", probe], env, tmp_path, 300))
    assert Path(installed["file"]).is_relative_to(venv), f"unigendet imported from {installed['file']}"
    packages = {".".join(("unigendet",) + p.parent.relative_to(ROOT / "engine").parts)
                for p in (ROOT / "engine").rglob("__init__.py")} - {"unigendet"}
    assert packages <= set(installed["modules"]), f"not installed: {sorted(packages - set(installed['modules']))}"
