"""The house's shape, read from the source with `ast` (nothing is imported): imports flow one way.

core (the config, storage, runtime, command runner) is a leaf every stage imports; datasets -> trainers -> registry
-> serve_app in the direction data flows; cluster (the main job, the job helpers) sits on top and nothing imports
it. Lazy imports inside functions count like the others.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "datasets", "trainers", "registry", "serve_app", "cluster")
# What serve_app may take from ingestion: the shared contracts, never its storage layout (id maps, shards, state).
SERVE_MAY_USE_FROM_DATASETS = {"datasets.schema", "datasets.validate", "datasets.pseudonym", "datasets.tombstones",
                               "datasets.live_files"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """First-party modules a file imports: `from a.b import c` is a.b.c when c is a module, else a.b."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= submodules if len(submodules) == len(node.names) else submodules | {node.module}
    return {n for n in found if n in modules}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = defaultdict(set)
    for module, imported in graph.items():
        packages[module.split(".")[0]] |= {i.split(".")[0] for i in imported} - {module.split(".")[0]}
    return packages


def test_the_graph_sees_the_project(graph: dict[str, set[str]]) -> None:
    assert {"core.config", "registry.writer", "trainers.loop", "serve_app.app", "cluster.main"} <= set(graph)
    assert "registry" in graph["trainers.publish"] and "core.config" in graph["datasets.schema"]
    assert "datasets.schema" in graph["serve_app.events"] and "datasets" not in graph["serve_app.events"]


def test_no_package_level_cycle(graph: dict[str, set[str]]) -> None:
    packages = _package_graph(graph)
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(packages[node]):
            if seen.get(nxt) == 1:
                raise AssertionError(f"import cycle between packages: {' -> '.join(path + [nxt])}")
            if nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for package in PACKAGES:
        if package not in seen:
            visit(package, [package])


def test_the_config_is_a_leaf_and_core_imports_only_core(graph: dict[str, set[str]]) -> None:
    assert graph["core.config"] == set(), graph["core.config"]
    for module, imported in graph.items():
        if module.startswith("core."):
            assert all(i.startswith("core.") for i in imported), (module, imported)


def test_serving_reads_versions_through_the_registry_only(graph: dict[str, set[str]]) -> None:
    for module, imported in graph.items():
        if module.startswith("serve_app"):
            assert not any(i.startswith("trainers") for i in imported), (module, imported)
            from_datasets = {i for i in imported if i.startswith("datasets")}
            assert from_datasets <= SERVE_MAY_USE_FROM_DATASETS, (module, from_datasets)


def test_the_registry_knows_neither_training_nor_serving(graph: dict[str, set[str]]) -> None:
    for module, imported in graph.items():
        if module.startswith("registry"):
            assert all(i.split(".")[0] in ("core", "registry") for i in imported), (module, imported)


def test_nothing_imports_the_composition(graph: dict[str, set[str]]) -> None:
    for module, imported in graph.items():
        if not module.startswith("cluster"):
            assert not any(i.startswith("cluster") for i in imported), (module, imported)
    # The update cycle's orchestration (ingest -> train -> gate -> publish) is run, not imported, by the stages.
    users = {m for m, imported in graph.items() if "trainers.update" in imported}
    assert users <= {"cluster.main"}, users
