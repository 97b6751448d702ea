"""The dependency rule between the packages, read from the source (every import, function-level ones included).

    mann  <-  study (all but cli)  <-  analysis  <-  study/cli.py

mann imports neither study nor analysis; analysis reads the record through study.record, study.tracking,
study.spec and study.redact only; study/cli.py is the one study module that imports analysis. MLflow is
study/tracking.py's alone, Ray is study's alone (each study module that imports it imports study/ray_env.py, a
leaf, first), and no module imports itself through others (no cycle).
See docs/architecture.md.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mann", "study", "analysis")
ANALYSIS_READS = {"study.record", "study.tracking", "study.spec", "study.redact"}


@functools.cache
def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages (a package's __init__ is the package)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@functools.cache
def _imports(module: str) -> tuple[tuple[int, str], ...]:
    """(line, imported module) of every import in ``module``: ``from a.b import c`` names ``a.b.c`` when that
    is a module of the project, else ``a.b``."""
    modules = _modules()
    path = modules[module]
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append((node.lineno, child if child in modules else base))
    return tuple(dict.fromkeys(found))  # one entry per import and name, in file order


def _is(name: str, target: str) -> bool:
    return name == target or name.startswith(target + ".")


def _file(module: str) -> str:
    return str(_modules()[module].relative_to(REPO))


def _offending(modules, bad) -> list[str]:
    """'file:line: imports name' for every import of ``modules`` that ``bad(module, name)`` refuses."""
    return [f"{_file(m)}:{line}: imports {name}" for m in modules for line, name in _imports(m) if bad(m, name)]


def _in(package: str) -> list[str]:
    return [m for m in _modules() if _is(m, package)]


def test_mann_imports_neither_study_nor_analysis():
    bad = _offending(_in("mann"), lambda m, name: _is(name, "study") or _is(name, "analysis"))
    assert not bad, "mann is the model library: it imports nothing of study or analysis:\n" + "\n".join(bad)


def test_only_the_cli_imports_analysis_from_study():
    bad = _offending([m for m in _in("study") if m != "study.cli"], lambda m, name: _is(name, "analysis"))
    assert not bad, "only study/cli.py, the command line on top, imports analysis:\n" + "\n".join(bad)


def test_analysis_reads_study_only_through_the_record_tracking_spec_and_redact():
    def bad(m, name):
        return _is(name, "study") and not any(_is(name, allowed) for allowed in ANALYSIS_READS)

    offending = _offending(_in("analysis"), bad)
    assert not offending, (f"analysis may import from study only {', '.join(sorted(ANALYSIS_READS))}:\n"
                           + "\n".join(offending))


def test_the_record_schema_imports_nothing_from_the_project():
    assert "study.record" in _modules(), "study/record.py, the record's vocabulary, is missing"
    bad = _offending(["study.record"], lambda m, name: any(_is(name, p) for p in PACKAGES))
    assert not bad, "study/record.py is a leaf (stdlib only), so that anything may read the record:\n" + "\n".join(bad)


def test_rays_environment_is_set_by_a_leaf_module_before_ray_is_imported():
    """Ray and Tune read their settings when imported: a study module imports study.ray_env before ray."""
    bad = _offending(["study.ray_env"], lambda m, name: any(_is(name, p) for p in PACKAGES))
    assert not bad, "study/ray_env.py is a leaf:\n" + "\n".join(bad)
    late = []
    for m in _in("study"):
        names = [name for _, name in sorted(_imports(m)) if _is(name, "ray") or name == "study.ray_env"]
        if names and names[0] != "study.ray_env" and any(_is(n, "ray") for n in names):
            first = next(line for line, name in _imports(m) if _is(name, "ray"))
            late.append(f"{_file(m)}:{first}: imports ray before study.ray_env")
    assert not late, "\n".join(late)


def test_mlflow_is_imported_by_study_tracking_alone():
    bad = _offending([m for m in _modules() if m != "study.tracking"], lambda m, name: _is(name, "mlflow"))
    assert not bad, "every MLflow call goes through study/tracking.py:\n" + "\n".join(bad)


def test_ray_is_imported_by_study_alone():
    bad = _offending([m for m in _modules() if not _is(m, "study")], lambda m, name: _is(name, "ray"))
    assert not bad, "only study imports ray (the model and the analysis run without it):\n" + "\n".join(bad)


def test_the_record_names_are_imported_from_study_record():
    """A tag, kind or artifact name comes from study.record itself, not through a module that imported it."""
    assert "study.record" in _modules(), "study/record.py, the record's vocabulary, is missing"
    record = _modules()["study.record"]
    names = {target.id for node in _tree(record).body if isinstance(node, ast.Assign)
             for target in node.targets if isinstance(target, ast.Name)}
    bad = []
    for path in _modules().values():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module != "study.record":
                bad += [f"{path.relative_to(REPO)}:{node.lineno}: imports {a.name} from {node.module}"
                        for a in node.names if a.name in names]
    assert not bad, "import the record's names from study.record:\n" + "\n".join(bad)


def _cycle() -> list[str] | None:
    """One import cycle among the project's modules (a list that starts and ends at one module), or None."""
    modules = _modules()
    graph = {m: sorted({name for _, name in _imports(m)
                        if name in modules and name != m}) for m in modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_module_imports_have_no_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle (each imports the next): " + " -> ".join(
        f"{name} ({_file(name)}:{next(line for line, imp in _imports(name) if imp == nxt)})"
        for name, nxt in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"
