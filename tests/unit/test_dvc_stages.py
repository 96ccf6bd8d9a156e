"""dvc.yaml stays honest: each stage depends on every project module its CLI imports."""

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

STAGE_MODULES = {"prepare": "tasks/data.py", "train": "tasks/train.py", "convert": "tasks/convert.py",
                 "evaluate": "tasks/evaluate.py", "register": "tasks/registry.py"}


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            candidate = Path(*name.split(".")).with_suffix(".py")
            if name.split(".")[0] in ("tasks", "edge") and (REPO_ROOT / candidate).is_file():
                found.add(candidate.as_posix())
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += project_imports(REPO_ROOT / current)
    return seen


@pytest.mark.parametrize("stage", list(STAGE_MODULES))
def test_stage_deps_cover_every_imported_module(stage):
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    declared = {dep for dep in stages[stage]["deps"] if dep.endswith(".py")}
    missing = closure(STAGE_MODULES[stage]) - declared
    assert not missing, f"dvc.yaml stage {stage} lacks deps {sorted(missing)}"
