"""The layering of the packages, read from the source (the AST of every module; nothing is imported).

Layers, bottom to top (docs: DESIGN.md, section 2):

* the core, ``qmanifold/`` -- groups as objects (declarations), geometry, samplers, kernels. It
  knows no *named* group and no molecular model: it never imports ``qmanifold.groups`` or
  ``qmanifold.models``, at module level or inside a function;
* ``qmanifold.groups`` (``groups/``) and ``qmanifold.models`` (``models/``), built on the core;
* the command-line layer on top: ``qmanifold/cli.py``, and ``qmanifold/bench.py``, which
  implements ``qmanifold bench``: it times the product end to end, with the molecular EGNN /
  transformer denoisers of ``qmanifold.models`` and the SE(3) of ``qmanifold.groups``, and only
  the command line (and the scripts of ``benchmarks/``) imports it. Both may import anything; the
  core imports neither (checked below, so the exclusion cannot leak).

Exceptions to the rule for the core are listed in :data:`ALLOWED`, each with its reason.

Import cycles: the module-level import graph of the three packages (their installed names) has no
cycle (imports inside functions and under ``if TYPE_CHECKING:`` do not run at import time and are
left out); and not even the imports inside functions form a cycle (a deferred import that closes
a circle is still two modules that each take pieces of the other; the shared piece belongs in a
module below both).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import itertools
import sys
from pathlib import Path

import pytest
import sympy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]

#: Core modules that may import a named group or model, and why.
ALLOWED = {
    "qmanifold.verify.runner": (
        "qmanifold.groups",
        ("the verification suite's toy targets ARE built-in groups (SO(2), SE(3), torus, permutations, "
         "lattice): checking the samplers on them is the product's main job, and `qmanifold verify` runs them"),
    ),
    "qmanifold.verify.curved_targets": (
        "qmanifold.groups",
        ("the curved verification targets act with the built-in SO(3) and SE(3) declarations on (S^2)^N and "
         "SE(3)^N: the same reason as the runner's toy targets"),
    ),
}

#: The command-line layer: may import anything; the core must not import it.
COMMAND_LINE = ("qmanifold.cli", "qmanifold.bench")

#: Named groups and models, under their installed names and the pre-namespace top-level names.
NAMED = ("qmanifold.groups", "qmanifold.models", "groups", "models")

PLUGINS = ("qmanifold.groups", "qmanifold.models")


# ----------------------------------------------------------------------------------------------
# reading the import graph from the source


@dataclasses.dataclass(frozen=True)
class Import:
    """One module named by an import statement (or ``importlib.import_module("...")``)."""

    target: str  # absolute dotted name: a module of ours when it is one, else what the statement names
    line: int
    deferred: bool  # inside a function: runs when called, not at import
    typing_only: bool  # under ``if TYPE_CHECKING:``: never runs


def package_dirs() -> dict[str, str]:
    """Source folder -> installed package, from pyproject.toml (``qmanifold.groups`` lives in
    ``groups/``, ``qmanifold.models`` in ``models/``)."""
    mapping = {"qmanifold": "qmanifold"}
    if tomllib is not None:
        config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
        for package, folder in config["tool"]["setuptools"].get("package-dir", {}).items():
            mapping[folder] = package
    else:  # pragma: no cover
        mapping.update(groups="qmanifold.groups", models="qmanifold.models")
    return mapping


def discover(dirs: dict[str, str]) -> dict[str, tuple[str, bool]]:
    """Installed module name -> (source text, is a package ``__init__``)."""
    modules = {}
    for folder, package in dirs.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [*package.split("."), *path.relative_to(ROOT / folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            modules[name] = (path.read_text(encoding="utf-8"), is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, source: str, is_package: bool, known) -> list[Import]:
    """Every import of module ``name`` (relative ones resolved), with where it runs."""
    package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []

    def absolute(module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = package.split(".")[: len(package.split(".")) - level + 1]
        return ".".join([*base, module] if module else base)

    def add(target: str, node: ast.AST, deferred: bool, typing_only: bool) -> None:
        found.append(Import(target, node.lineno, deferred, typing_only))

    def visit(node: ast.AST, deferred: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, typing_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), deferred, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), deferred, typing_only)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, deferred, typing_only)
            elif isinstance(child, ast.ImportFrom):
                source_module = absolute(child.module, child.level)
                for alias in child.names:
                    sub = f"{source_module}.{alias.name}"
                    # `from pkg import sub` names the module pkg.sub when there is one
                    add(sub if sub in known else source_module, child, deferred, typing_only)
                    if sub not in known and any(sub == n or sub.startswith(n + ".") for n in NAMED):
                        add(sub, child, deferred, typing_only)  # `from qmanifold import groups` et al.
            elif (isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)
                  and ((isinstance(child.func, ast.Name) and child.func.id in ("import_module", "__import__"))
                       or (isinstance(child.func, ast.Attribute) and child.func.attr == "import_module"))):
                text = child.args[0].value
                level = len(text) - len(text.lstrip("."))
                add(absolute(text.lstrip(".") or None, level) if level else text, child, deferred, typing_only)
                visit(child, deferred, typing_only)
            else:
                visit(child, deferred, typing_only)

    visit(ast.parse(source, filename=name), False, False)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, tuple[str, bool]], *, deferred: bool) -> dict[str, dict[str, int]]:
    """``module -> {module it imports: line}`` among ``modules``; ``deferred`` includes imports inside
    functions; imports under ``if TYPE_CHECKING:`` never count.

    Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``: an edge to each of them, except
    to the importer's own enclosing packages (which Python has already started importing)."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, (source, is_package) in modules.items():
        own = set(_ancestors(name))
        for imp in imports_of(name, source, is_package, modules):
            if imp.typing_only or (imp.deferred and not deferred) or imp.target not in modules:
                continue
            for target in [*(a for a in _ancestors(imp.target) if a not in own), imp.target]:
                if target in modules and target != name:
                    graph[name].setdefault(target, imp.line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle ``[m0, m1, ..., m0]`` of ``graph`` if it has any (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, {}))))
    return None


def describe(cycle: list[str], graph) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)) + f" -> {cycle[-1]}"


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def core_modules(modules) -> list[str]:
    """The modules of ``qmanifold/`` (not the plug-ins installed under ``qmanifold.``), command line excluded."""
    return [m for m in modules if _within(m, ("qmanifold",)) and not _within(m, PLUGINS) and m not in COMMAND_LINE]


@pytest.fixture(scope="module")
def modules():
    return discover(package_dirs())


# ----------------------------------------------------------------------------------------------
# the machinery itself (on small made-up packages)


def test_the_graph_reader_on_a_made_up_package():
    pkg = {
        "pkg": ("from . import a\n", True),
        "pkg.a": ("from .b import f\nimport pkg.sub.c\n", False),
        "pkg.b": ("def f():\n    from . import a\n    return a\n", False),
        "pkg.sub": ("", True),
        "pkg.sub.c": (("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                       "else:\n    import json\nclass C:\n    from .. import b\n"), False),
        "pkg.d": ("import importlib\nM = importlib.import_module('pkg.sub.c')\n", False),
    }
    eager = import_graph(pkg, deferred=False)
    assert eager == {"pkg": {"pkg.a": 1}, "pkg.a": {"pkg.b": 1, "pkg.sub": 2, "pkg.sub.c": 2}, "pkg.b": {},
                     "pkg.sub": {}, "pkg.sub.c": {"pkg.b": 7}, "pkg.d": {"pkg.sub": 2, "pkg.sub.c": 2}}
    assert find_cycle(eager) is None
    full = import_graph(pkg, deferred=True)
    assert full["pkg.b"] == {"pkg.a": 2}  # the import inside f; the TYPE_CHECKING one of pkg.sub.c never counts
    assert find_cycle(full) == ["pkg.a", "pkg.b", "pkg.a"]
    assert describe(find_cycle(full), full) == "pkg.a (line 1) -> pkg.b (line 2) -> pkg.a"
    named = imports_of("pkg.x", "from qmanifold import groups\nimport models.egnn\n", False, {"pkg.x": None})
    assert [i.target for i in named if _within(i.target, NAMED)] == ["qmanifold.groups", "models.egnn"]


def test_the_sources_are_found(modules):
    """A guard against the checks below passing because they read nothing."""
    assert package_dirs() == {"qmanifold": "qmanifold", "groups": "qmanifold.groups", "models": "qmanifold.models"}
    for name in ("qmanifold", "qmanifold.kernels", "qmanifold.kernels.aot", "qmanifold.packed",
                 "qmanifold.verify.runner", "qmanifold.groups", "qmanifold.groups.definitions", "qmanifold.models"):
        assert name in modules, name
    core = core_modules(modules)
    assert "qmanifold.kernels.aot" in core and "qmanifold.cli" not in core and "qmanifold.groups" not in core
    assert sum(len(import_graph(modules, deferred=False)[m]) for m in core) > 50


# ----------------------------------------------------------------------------------------------
# the core knows no named group or model


def test_the_core_imports_no_named_group_or_model(modules):
    """Anywhere in a core module: module level, inside functions, under TYPE_CHECKING, importlib."""
    wrong = []
    for name in core_modules(modules):
        source, is_package = modules[name]
        allowed = ALLOWED.get(name, ("",))[0]
        for imp in imports_of(name, source, is_package, modules):
            if _within(imp.target, NAMED) and not (allowed and _within(imp.target, (allowed,))):
                wrong.append(f"{name} (line {imp.line}) imports {imp.target}")
    assert not wrong, ("the core must not know named groups or models; resolve names in the command-line "
                       "layer and pass declarations (LieGroup objects) in:\n" + "\n".join(wrong))


def test_the_allow_list_is_current(modules):
    core = core_modules(modules)
    for name, (allowed, reason) in ALLOWED.items():
        assert name in core and reason, name
        source, is_package = modules[name]
        assert any(_within(i.target, (allowed,)) for i in imports_of(name, source, is_package, modules)), (
            f"{name} no longer imports {allowed}: remove it from ALLOWED")


def test_no_core_module_reaches_a_named_group_except_through_the_allow_list(modules):
    """Transitively, through imports inside functions too: e.g. the kernels (and what they import)
    do not depend on qmanifold.groups by way of some other module."""
    graph = import_graph(modules, deferred=True)
    stops = set(ALLOWED) | set(COMMAND_LINE)
    wrong = []
    for start in core_modules(modules):
        if start in stops:
            continue
        seen, stack, parent = {start}, [start], {}
        while stack:
            node = stack.pop()
            for nxt in graph[node]:
                if nxt in seen or nxt in stops:
                    continue
                seen.add(nxt)
                parent[nxt] = node
                if _within(nxt, NAMED):
                    chain = [nxt]
                    while chain[-1] != start:
                        chain.append(parent[chain[-1]])
                    wrong.append(" -> ".join(reversed(chain)))
                else:
                    stack.append(nxt)
    assert not wrong, "core modules that depend on named groups / models:\n" + "\n".join(sorted(wrong))


def test_the_core_does_not_import_the_command_line_layer(modules):
    wrong = []
    for name in core_modules(modules):
        source, is_package = modules[name]
        wrong += [f"{name} (line {i.line}) imports {i.target}" for i in imports_of(name, source, is_package, modules)
                  if _within(i.target, COMMAND_LINE)]
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------------------------
# no import cycles


def test_module_level_imports_form_no_cycle(modules):
    graph = import_graph(modules, deferred=False)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle at module level: {describe(cycle, graph)}"


def test_imports_form_no_cycle_even_inside_functions(modules):
    """E.g. ``qmanifold.kernels`` and ``qmanifold.packed`` once took private helpers from each other
    (the segment ops, now in ``qmanifold._segments``, below both), and so did
    ``qmanifold.models.data.io`` and ``qmanifold.models.data.qm9``."""
    graph = import_graph(modules, deferred=True)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle (counting imports inside functions): {describe(cycle, graph)}"


# ----------------------------------------------------------------------------------------------
# the kernel compiler takes declarations


def _kernels_parser(resolve_group):
    from qmanifold.kernels import aot

    parser = argparse.ArgumentParser(prog="qmanifold")
    aot.register(parser.add_subparsers(), resolve_group=resolve_group)
    return parser


def test_the_kernels_command_compiles_the_declarations_it_is_handed(monkeypatch, capsys):
    """``qmanifold kernels --groups`` resolves each name with the resolver the command line hands
    ``register`` and compiles the LieGroup it returns (here one declared on the spot)."""
    import qmanifold.kernels as K
    from qmanifold import LieGroup
    from qmanifold.kernels import aot

    so4 = LieGroup("SO(4)", 4, generators=[
        sympy.Matrix(4, 4, lambda r, c, i=i, j=j: (1 if (r, c) == (j, i) else -1 if (r, c) == (i, j) else 0))
        for i in range(4) for j in range(i + 1, 4)])
    compiled = []

    def fake_compile(geom, *, arch, mode, points, dtype, **op):  # no Triton needed: record what would compile
        compiled.append(geom.group)
        return aot.CompileReport(kernel=geom.kernels.name, mode=mode, dtype=str(dtype), layout="dense", points=points,
                                 block_b=1, block_n=32, num_warps=4, arch=arch, registers=32, stack_bytes=0,
                                 local_bytes=0, shared_bytes=0, seconds=0.0)

    monkeypatch.setattr(K, "status", lambda: dict(triton=True, cuda=False, interpreting=False, triton_error=None))
    monkeypatch.setattr(aot, "compile_op", fake_compile)
    names = []
    args = _kernels_parser(lambda name: names.append(name) or so4).parse_args(["kernels", "--groups", "MySO4"])
    assert args.func(args) == 0
    assert names == ["MySO4"]
    assert compiled and all(g is so4 for g in compiled)
    assert "generic:SO(4)" in capsys.readouterr().out


@pytest.mark.parametrize("returned", ["unknown", "not a group", "no generators"])
def test_the_kernels_command_rejects_a_bad_name_with_exit_status_2(returned, capsys):
    from qmanifold import LieGroup
    from qmanifold.errors import InputError

    def resolve(name):
        if returned == "unknown":
            raise InputError(f"unknown group {name!r}")
        return object() if returned == "not a group" else LieGroup("R2", 2, translations=True)

    args = _kernels_parser(resolve).parse_args(["kernels", "--groups", "Nope"])
    assert args.func(args) == 2
    out = capsys.readouterr().out
    assert "error:" in out and "Nope" in out, out
