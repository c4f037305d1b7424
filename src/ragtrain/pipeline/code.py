"""The package code a stage runs: the static import closure of its function, read with `ast`.

The closure starts at the stage function (the imports at the top of its module, the imports in
its body and in the module's functions it calls), then follows every `ragtrain.*` import, at
top level or inside a function, of each module reached; a package's ``__init__.py`` comes with
every submodule imported from it. Over-approximation is safe (a stage reruns when it need not);
missing a module is the bug (`dvc repro` skips a stage whose code changed), so dvc.yaml's code
deps and the resume fingerprints of the training stages both come from here.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ragtrain.io import sha256_file

PACKAGE = "ragtrain"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/ragtrain
REPO_PREFIX = "src/ragtrain"  # how dvc.yaml names the package's files (relative to the repo)


def _module_file(name: str) -> Path | None:
    """The file of module ``ragtrain.a.b`` (a.b.py or a/b/__init__.py), if it exists."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _with_packages(name: str) -> list[Path]:
    """The module's file and the ``__init__.py`` of every package above it (import runs them)."""
    parts = name.split(".")
    files = [_module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    return [f for f in files if f is not None]


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[Path]:
    """The package files one import statement loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            pkg = module.split(".") if is_package else module.split(".")[:-1]
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import submodule`
    return [f for n in names if n.split(".")[0] == PACKAGE for f in _with_packages(n)]


def _imports(nodes: Iterable[ast.AST], module: str, is_package: bool) -> set[Path]:
    return {f for n in nodes if isinstance(n, ast.Import | ast.ImportFrom)
            for f in _imported(n, module, is_package)}


def _top_level(tree: ast.Module) -> Iterable[ast.AST]:
    """Every node that runs at import: all but the bodies of functions."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            todo.extend(ast.iter_child_nodes(node))


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _entry_files(fn: Callable[..., Any]) -> set[Path]:
    """What the function's own module contributes: its top-level imports, the imports in the
    function and in the module-level functions it names (transitively)."""
    path = Path(sys.modules[fn.__module__].__file__ or "").resolve()
    tree = _parse(path)
    module, is_package = fn.__module__, path.name == "__init__.py"
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    if fn.__name__ not in funcs:
        raise ValueError(f"{fn.__module__}.{fn.__name__}: not a module-level function")
    files = {path} | _imports(_top_level(tree), module, is_package)
    seen: set[str] = set()
    todo = [fn.__name__]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        body = list(ast.walk(funcs[name]))
        files |= _imports(body, module, is_package)
        todo.extend(n.id for n in body if isinstance(n, ast.Name) and n.id in funcs)
    return files | {f for p in files for f in _with_packages(_module_name(p))}


def code_files(fn: Callable[..., Any], extra: Iterable[str] = ()) -> list[Path]:
    """The package files stage function ``fn`` runs, sorted; ``extra``: files it loads by path
    rather than by import (relative to src/ragtrain), followed the same way."""
    todo = sorted(_entry_files(fn) | {(PACKAGE_DIR / e).resolve() for e in extra})
    done: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in done:
            continue
        done.add(path)
        if path != Path(sys.modules[fn.__module__].__file__ or "").resolve():
            module = _module_name(path)
            todo.extend(_imports(ast.walk(_parse(path)), module, path.name == "__init__.py")
                        - done)
    return sorted(done, key=repo_path)


def repo_path(path: Path) -> str:
    """A package file as dvc.yaml names it: src/ragtrain/..."""
    return f"{REPO_PREFIX}/{path.relative_to(PACKAGE_DIR).as_posix()}"


def code_hashes(fn: Callable[..., Any], extra: Iterable[str] = ()) -> list[str]:
    """``"<path> <sha256>"`` of every file of ``fn``'s closure: a training checkpoint is resumed
    only by the same code (the files `dvc repro` reruns the stage for)."""
    return [f"{repo_path(f)} {sha256_file(f)}" for f in code_files(fn, extra)]
