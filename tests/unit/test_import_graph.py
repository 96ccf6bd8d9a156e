"""The layout stays honest: no import cycles, no stage importing a stage, imports that run one way between the
top-level folders, dvc.yaml deps = import closures, modules and functions that fit on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tasks.contracts import Workspace
from tests.conftest import REPO_ROOT

# Imports run one way: a folder imports only itself and the folders before it (demos and benchmarks drive flows,
# flows wire tasks, tasks use the device package, the device package uses nothing of ours).
LAYERS = ("edge", "tasks", "flows", "scripts", "bench")
PACKAGES = LAYERS
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_EDGE_TOP_LEVEL = 400, 60, 13
STAGE_MODULES = {"prepare": "tasks/data/prepare.py", "train": "tasks/model/train.py",
                 "convert": "tasks/model/convert.py", "evaluate": "tasks/evaluation/evaluate.py",
                 "benchmark": "tasks/benchmark/stage.py", "register": "tasks/registry/register.py",
                 "package": "tasks/packaging/package.py"}
# in a stage's command path or packaged by it, though the stage module does not import them
EXTRA_DEPS = {stage: {"tasks/cli.py"} for stage in STAGE_MODULES}
EXTRA_DEPS["register"] |= {"tasks/registry/edge_pyfunc.py", "edge/runtime.py"}
EXTRA_DEPS["package"] |= {path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "edge").rglob("*.py")}
# the runners ship the whole device package (ssh) or run it (local), and the prefect runner deploys its flow
EXTRA_DEPS["benchmark"] |= EXTRA_DEPS["package"] - {"tasks/cli.py"} | {"edge/bench/prefect_flow.py"}


def project_imports(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            for candidate in (Path(*name.split(".")).with_suffix(".py"), Path(*name.split("."), "__init__.py")):
                if (REPO_ROOT / candidate).is_file() and not _docstring_only(REPO_ROOT / candidate):
                    found.add(candidate.as_posix())
    return found


def _docstring_only(path: Path) -> bool:
    """A package ``__init__`` that only describes its folder: importing a module of it depends on nothing here."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                                              for node in body)


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += project_imports(REPO_ROOT / current)
    return seen


def project_modules() -> list[str]:
    return sorted(path.relative_to(REPO_ROOT).as_posix() for package in PACKAGES
                  for path in (REPO_ROOT / package).rglob("*.py") if "__pycache__" not in path.parts)


def test_imports_run_one_way_between_the_top_level_folders():
    upward = [f"{module} imports {imported}" for module in project_modules() for imported in project_imports(
              REPO_ROOT / module) if LAYERS.index(imported.split("/")[0]) > LAYERS.index(module.split("/")[0])]
    assert not upward, f"imports against {' <- '.join(LAYERS)}: {upward}"


def _functions(tree: ast.AST):
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_modules_and_functions_fit_on_a_screen():
    too_long = []
    for module in project_modules():
        text = (REPO_ROOT / module).read_text()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{module}: {lines} lines")
        too_long += [f"{module}:{node.lineno} {node.name}(): {node.end_lineno - node.lineno + 1} lines"
                     for node in _functions(ast.parse(text)) if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not too_long, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function: {too_long}"


def test_the_device_package_keeps_its_top_level_small():
    top_level = sorted(path.name for path in (REPO_ROOT / "edge").glob("*.py"))
    assert len(top_level) <= MAX_EDGE_TOP_LEVEL, f"edge/ has {len(top_level)} top-level modules: {top_level}"


def test_no_product_code_or_message_names_the_demo_scripts():
    """What a user runs is an ``edgeloop`` command; ``scripts/`` holds demo drivers only, and is not packaged."""
    offenders = [module for module in project_modules() if module.split("/")[0] in ("edge", "tasks", "flows")
                 and "scripts." in (REPO_ROOT / module).read_text()]
    assert not offenders


def test_the_readme_layout_names_every_sub_package():
    layout = (REPO_ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    packages = sorted(path.parent.relative_to(REPO_ROOT).as_posix() for top in ("tasks", "edge")
                      for path in (REPO_ROOT / top).glob("*/__init__.py"))
    assert [package for package in packages if f"`{package}`" not in layout] == []
    assert [path.name for path in (REPO_ROOT / "edge").glob("*.py")
            if path.stem != "__init__" and f"`{path.stem}`" not in layout] == []


def test_the_import_graph_has_no_cycle():
    graph = {module: project_imports(REPO_ROOT / module) - {module} for module in project_modules()}
    visiting, done, cycles = set(), set(), []

    def visit(module: str, trail: list[str]) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append(trail[trail.index(module):] + [module])
            return
        visiting.add(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*trail, module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("stage", list(STAGE_MODULES))
def test_no_stage_imports_another_stage(stage):
    others = set(STAGE_MODULES.values()) - {STAGE_MODULES[stage]}
    assert not closure(STAGE_MODULES[stage]) & others


@pytest.mark.parametrize("stage", list(STAGE_MODULES))
def test_stage_deps_are_exactly_its_import_closure(stage):
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    declared = {dep for dep in stages[stage]["deps"] if dep.endswith(".py")}
    folders = [dep for dep in stages[stage]["deps"] if (REPO_ROOT / dep).is_dir() and dep.split("/")[0] in PACKAGES]
    for folder in folders:  # a whole package the stage ships (edge/ in the image)
        declared |= {path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / folder).rglob("*.py")}
    expected = closure(STAGE_MODULES[stage]) | EXTRA_DEPS[stage]
    assert declared == expected, (f"dvc.yaml stage {stage}: missing {sorted(expected - declared)}, "
                                  f"not imported {sorted(declared - expected)}")


def test_register_depends_on_registry_code_contracts_config_and_errors_only():
    allowed_prefixes = ("tasks/registry/", "edge/sidecar.py", "edge/files.py", "edge/errors.py", "edge/runtime.py")
    allowed = {"tasks/contracts.py", "tasks/workspace.py", "tasks/config.py", "tasks/config_format.py",
               "tasks/errors.py", "tasks/variants.py",
               "tasks/entrypoint.py", "tasks/lineage.py",
               "tasks/monitoring/reference.py",  # the drift reference logged with every version
               "tasks/devices.py",  # the device classes the release chooses a variant for (device_choice.py)
               "tasks/evaluation/gates.py",  # ... ranked as the evaluate stage ranks (evaluate.recommend_by)
               "edge/features.py",
               "tasks/cli.py"}
    deps = {dep for dep in yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["register"]["deps"]
            if dep.endswith(".py")}
    assert {dep for dep in deps if dep not in allowed and not dep.startswith(allowed_prefixes)} == set()


def test_stage_outputs_in_dvc_yaml_are_the_contract_paths():
    workspace = Workspace(Path("."))
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]

    def declared(stage: str, kind: str) -> set[str]:
        return {next(iter(entry)) if isinstance(entry, dict) else entry for entry in stages[stage].get(kind, [])}

    assert declared("prepare", "outs") == {workspace.prepared_dir.as_posix()}
    assert declared("train", "outs") == {workspace.keras_dir.as_posix()}
    assert declared("train", "metrics") == {workspace.train_metrics_file.as_posix()}
    assert declared("convert", "outs") == {workspace.variants_dir.as_posix()}
    assert declared("evaluate", "outs") == {workspace.evaluation_file.as_posix(),
                                            workspace.comparison_file("csv").as_posix(),
                                            workspace.comparison_file("md").as_posix()}
    assert declared("evaluate", "metrics") == {workspace.metrics_file.as_posix()}
    assert declared("evaluate", "plots") == {workspace.comparison_file("png").as_posix()}
    assert declared("benchmark", "outs") == {workspace.benchmark_dir.as_posix()}
    assert declared("register", "outs") == {workspace.registration_file.as_posix()}
    assert declared("package", "outs") == {workspace.package_file.as_posix()}


@pytest.mark.parametrize("module", ["tasks/errors.py", "edge/errors.py"])
def test_error_modules_import_nothing(module):
    tree = ast.parse((REPO_ROOT / module).read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def test_no_sys_path_edits_or_sys_modules_lookups():
    offenders = []
    for path in project_modules():
        text = (REPO_ROOT / path).read_text()
        if "sys.path.insert" in text or "sys.path.append" in text or "sys.modules[" in text:
            offenders.append(path)
    assert not offenders


def test_edge_never_imports_tasks():
    for module in project_modules():
        if module.startswith("edge/"):
            assert not {dep for dep in project_imports(REPO_ROOT / module) if not dep.startswith("edge/")}, module


def test_conversion_does_not_depend_on_the_training_recipe():
    """Editing the recipe (QAT, pruning, BatchNorm) must not re-run convert: it loads models, it does not train."""
    convert = closure(STAGE_MODULES["convert"])
    assert not convert & {"tasks/model/optimize.py", "tasks/model/batchnorm.py", "tasks/model/train.py",
                          "tasks/model/zoo.py"}
