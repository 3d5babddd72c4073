"""Which way the imports go: the agent runtime and the question sets are below evaluation and the Prefect
layers, so the rollout runner that evaluation and the teacher rollouts share imports none of them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_packages(path: Path) -> set[str]:
    """Top-level packages ``path`` imports (absolute imports, at any depth in the module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["agent_runtime", "questions"])
def test_the_runtime_and_the_question_sets_import_no_higher_layer(package):
    offenders = {str(path.relative_to(ROOT)): sorted(found)
                 for path in sorted((ROOT / package).rglob("*.py"))
                 if (found := imported_packages(path) & {"evaluation", "tasks", "flows", "prefect"})}
    assert offenders == {}


def test_services_are_below_every_other_package():
    """``services`` (child processes, the HTTP client) is used by every layer, so it imports none of them;
    only ``common.errors``, which imports nothing itself."""
    above = {"agent_runtime", "questions", "evaluation", "retrieval", "training", "models", "devices", "tasks",
             "flows", "bench", "prefect", "storage"}
    modules = sorted((ROOT / "services").rglob("*.py"))
    offenders = {str(path.relative_to(ROOT)): sorted(found) for path in modules
                 if (found := imported_packages(path) & above)}
    assert offenders == {}
    common = {node.module for path in modules for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("common")}
    assert common == {"common.errors"}


def test_common_imports_nothing_of_the_project():
    """``common`` (the user errors, atomic writes) is the bottom of every layer."""
    project = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} - {"common"}
    offenders = {str(path.relative_to(ROOT)): sorted(found) for path in sorted((ROOT / "common").rglob("*.py"))
                 if (found := imported_packages(path) & project)}
    assert offenders == {}
