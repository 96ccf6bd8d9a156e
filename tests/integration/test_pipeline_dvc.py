"""The whole model half on the bundled data, through real DVC and a real (SQLite) MLflow store."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import GENEROUS_LATENCY_MS, REPO_ROOT

pytestmark = pytest.mark.integration
PROJECT_FILES = ("tasks", "edge", "flows", "docker", "dvc.yaml", "params.yaml", "devices.yaml", "requirements.lock",
                 ".dvc/config", ".gitignore")
FAST_PARAMS = {
    "train": {"epochs": 4},
    "quantize": {"strategy": "qat", "qat_epochs": 1},
    "prune": {"epochs": 2, "target_sparsities": [0.5, 0.8], "max_accuracy_drop_pts": 3.0},
    "cluster": {"cluster_counts": [8], "epochs": 1, "max_accuracy_drop_pts": 3.0},
    "evaluate": {"latency_warmup_runs": 5, "latency_runs": 30,
                 "gates": {"max_accuracy_drop_pts": 5.0, "max_host_latency_ms": GENEROUS_LATENCY_MS}},
    "package": {"platforms": ["linux/amd64"], "repository": "edgeloop/dvc-test"},
    "benchmark": {"devices": ["x86-gateway"], "iterations": 20, "eval_samples": 60},
}


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", GIT_AUTHOR_NAME="edgeloop-test",
               GIT_AUTHOR_EMAIL="test@edgeloop.invalid", GIT_COMMITTER_NAME="edgeloop-test",
               GIT_COMMITTER_EMAIL="test@edgeloop.invalid", PYTHONPATH=str(workdir))
    return env


def _run(args: list[str], workdir: Path, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run(args, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=900)
    if check and completed.returncode != 0:
        raise AssertionError(f"{args} failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n"
                             f"{completed.stderr[-5000:]}")
    return completed


def _merge(base: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        base[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


@pytest.fixture(scope="module")
def project(tmp_path_factory, images) -> Path:
    """A copy of the repository, git + DVC initialised, with fast training params, after `dvc repro`
    (the package stage pushes to the session's registry, signed with its key: ``images``)."""
    workdir = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        source, target = REPO_ROOT / name, workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    (workdir / "params.yaml").write_text(yaml.safe_dump(_merge(params, FAST_PARAMS)))
    _run(["git", "init", "-q"], workdir)
    _run(["git", "add", "-A"], workdir)
    _run(["git", "commit", "-qm", "test project"], workdir)
    _run([str(Path(sys.executable).parent / "dvc"), "repro"], workdir)
    return workdir


def test_repro_writes_every_output(project):
    for path in ("data/prepared/train.npz", "data/prepared/dataset.json", "models/keras/baseline.h5",
                 "models/keras/qat.h5", "models/keras/pruned.h5", "models/variants/conversion.json",
                 "reports/comparison.csv", "reports/comparison.md", "reports/comparison.png",
                 "reports/metrics.json", "reports/train_metrics.json", "reports/registration.json",
                 "reports/benchmark/summary.json", "reports/benchmark/x86-gateway.json",
                 "reports/package.json", "dvc.lock"):
        assert (project / path).is_file(), path
    package = json.loads((project / "reports/package.json").read_text())
    registration = json.loads((project / "reports/registration.json").read_text())
    assert package["mlflow_version"] == registration["version"] and package["variant"] == registration["variant"]
    assert {image["status"] for image in package["images"]} == {"pushed"}
    summary = json.loads((project / "reports/benchmark/summary.json").read_text())
    gateway = next(outcome["recommended"] for outcome in summary["devices"] if outcome["device"] == "x86-gateway")
    registered = [image for image in package["images"] if image["variant"] == package["variant"]]
    assert [image["platform"] for image in registered] == ["linux/amd64"]  # package.platforms here
    # the gateway's measured choice gets an image of its own runtime (the registered one's, if it is that variant)
    assert [(image["variant"], image["platform"], image["runtime"]) for image in package["images"]
            if "x86-gateway" in image["classes"]] == [(gateway, "linux/amd64", gateway.partition("_")[0])]
    with open(project / "reports/comparison.csv") as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"tflite_fp32", "tflite_fp16", "tflite_dynamic", "tflite_int8", "tflite_int8_qat",
                         "tflite_int8_pruned", "tflite_int8_clustered", "tflite_int8_pruned_clustered",
                         "tflite_int16x8", "onnx_fp32", "onnx_int8", "onnx_int8_u8s8"}
    assert all(row["status"] == "ok" for row in rows.values()), {k: r["error"] for k, r in rows.items()}
    assert float(rows["tflite_int8"]["size_reduction"]) > 3.0
    assert float(rows["tflite_int8_pruned"]["sparsity"]) >= 0.45
    # read back from the converted files: PCQAT kept the zeros and the centroids through int8, CQAT the centroids
    assert float(rows["tflite_int8_pruned_clustered"]["file_sparsity"]) >= 0.45
    assert int(rows["tflite_int8_pruned_clustered"]["max_distinct_weights"]) <= 9  # 8 centroids (+ the zero)
    assert int(rows["tflite_int8_clustered"]["max_distinct_weights"]) <= 9 < int(rows["tflite_int8"][
        "max_distinct_weights"])
    for variant in rows:
        suffix = ".onnx" if variant.startswith("onnx") else ".tflite"
        sidecar = json.loads((project / "models/variants" / f"{variant}{suffix}.json").read_text())
        assert sidecar["variant"] == variant and len(sidecar["sha256"]) == 64


def test_data_version_matches_dvc_lock(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    prepared_md5 = next(out["md5"] for out in lock["stages"]["prepare"]["outs"] if out["path"] == "data/prepared")
    registration = json.loads((project / "reports/registration.json").read_text())
    sidecar = json.loads((project / "models/variants/tflite_int8.tflite.json").read_text())
    assert registration["data_version"] == prepared_md5 == sidecar["data_version"]
    status = _run([str(Path(sys.executable).parent / "dvc"), "status"], project)
    assert "up to date" in status.stdout
    pushed = _run([str(Path(sys.executable).parent / "dvc"), "push"], project)
    assert (project / ".dvc-storage" / "files" / "md5").is_dir(), pushed.stdout


def _mlflow_client(project: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns.db'}")
    return mlflow.MlflowClient()


def test_mlflow_run_and_candidate_version(project):
    registration = json.loads((project / "reports/registration.json").read_text())
    client = _mlflow_client(project)
    run = client.get_run(registration["run_id"])
    assert run.data.params["train.epochs"] == "4"
    assert run.data.tags["data_version"] == registration["data_version"]
    assert "tflite_int8.accuracy" in run.data.metrics and "onnx_int8.latency_p95_ms" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/comparison.csv", "reports/comparison.md", "reports/comparison.png"} <= artifacts
    model_artifacts = {a.path for a in client.list_artifacts(run.info.run_id, f"models/{registration['variant']}")}
    assert any(p.endswith(".json") for p in model_artifacts) and len(model_artifacts) == 2
    version = client.get_model_version_by_alias(registration["registered_model"], "candidate")
    assert str(version.version) == str(registration["version"]) and version.run_id == run.info.run_id
    for tag in ("variant", "data_version", "quantize.strategy", "hardware_targets", "sha256"):
        assert tag in version.tags, tag
    assert version.tags["variant"] == registration["variant"]


def test_dvc_experiments_compare_the_recommended_variant(project):
    """`dvc exp show` and `dvc metrics diff` read the metrics of two experiments (they live in git).

    The experiments change the MLflow experiment name: only the register stage re-runs (fast), yet the
    metrics of both experiments must be listed, which is what failed when they lived nowhere.
    """
    dvc = str(Path(sys.executable).parent / "dvc")
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "pipeline run"], project)
    for name in ("by-size", "by-accuracy"):
        # up to register: the metrics are there; packaging the experiment's version would only rebuild an image
        _run([dvc, "exp", "run", "-n", name, "-S", f"mlflow.experiment=edgeloop-{name}", "register"], project)
    shown = _run([dvc, "exp", "show", "--no-pager", "--md"], project).stdout
    header = next(line for line in shown.splitlines() if line.startswith("| Experiment"))
    columns = [cell.strip() for cell in header.split("|")]
    for name in ("by-size", "by-accuracy"):
        line = next((line for line in shown.splitlines() if f"[{name}]" in line), None)
        assert line, f"experiment {name} missing from:\n{shown}"
        cells = dict(zip(columns, (cell.strip() for cell in line.split("|"))))
        assert cells["recommended"] not in ("", "!", "-"), shown  # the metrics live in the experiment
        assert 0.5 < float(cells["recommended_accuracy"]) <= 1.0, shown
    diff = json.loads(_run([dvc, "metrics", "diff", "by-size", "by-accuracy", "--all", "--json"], project).stdout)
    metrics = diff["reports/metrics.json"]
    assert metrics["recommended"]["old"] and metrics["recommended"]["new"], diff
    assert 0.5 < metrics["recommended_accuracy"]["new"] <= 1.0


def test_no_variant_passing_fails_with_margins_and_registers_nothing(project):
    client = _mlflow_client(project)
    name = json.loads((project / "reports/registration.json").read_text())["registered_model"]
    versions_before = len(client.search_model_versions(f"name = '{name}'"))
    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["evaluate"]["gates"]["min_size_reduction"] = 1000.0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        completed = _run([str(Path(sys.executable).parent / "dvc"), "repro"], project, check=False)
    finally:
        (project / "params.yaml").write_text(original)
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "no variant passed the quality gates" in output
    assert "size reduction" in output and "short by" in output
    assert "Traceback" not in output
    assert len(client.search_model_versions(f"name = '{name}'")) == versions_before
    assert (project / "reports/comparison.md").is_file()  # the report is still there to read
    experiment = client.get_experiment_by_name(params["mlflow"]["experiment"])
    rejected = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FAILED'")
    assert rejected and rejected[0].data.tags["edgeloop.outcome"] == "rejected by the quality gates"
    assert rejected[0].data.params["evaluate.gates.min_size_reduction"] == "1000.0"


def test_bad_params_fail_before_any_work(project, tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    completed = _run([str(Path(sys.executable).parent / "edgeloop"), "train", "--params", str(bad)], project,
                     check=False)
    assert completed.returncode == 2
    assert "train.epochz: unknown key" in completed.stderr and "Traceback" not in completed.stderr
