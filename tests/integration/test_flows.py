"""Flows against a real Prefect server, a real MLflow server and a real process worker (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import GENEROUS_LATENCY_MS, REPO_ROOT, fast_parameters
from tests.stack_helpers import mlflow_client, mlflow_runs_of, read_run, wait_for

pytestmark = pytest.mark.integration
MODEL_NAME = "edgeloop-digits"


def alias_version(stack, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client(stack).get_model_version_by_alias(MODEL_NAME, alias).version)
    except MlflowException:
        return None


def test_nightly_run_publishes_artifacts_and_records_overrides(stack, nightly_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.contracts import Workspace, read_registration, read_train_summary

    workspace = Workspace(Path(nightly_run.parameters["workspace"]))

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[nightly_run.id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert {"variant-comparison", "training-summary", "mlflow-run"} <= set(by_key)
    table = json.loads(by_key["variant-comparison"].data) if isinstance(by_key["variant-comparison"].data, str) \
        else by_key["variant-comparison"].data
    assert {row["variant"] for row in table} == {"tflite_fp32", "tflite_int8"}
    assert "rpi4-8gb" in by_key["training-summary"].data
    assert f"({stack.mlflow_url}/#/experiments/" in by_key["mlflow-run"].data

    client = mlflow_client(stack)
    runs = mlflow_runs_of(stack, nightly_run.id)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.epochs"] == "3"
    assert json.loads(run.data.tags["prefect.overrides"])["epochs"] == 3
    assert run.data.tags["edgeloop.trigger"] == "schedule or manual"
    # the default strategy, auto: the PTQ drop was measured in LiteRT and decided whether QAT ran
    summary = read_train_summary(workspace)
    assert run.data.tags["quantize.strategy"] == "auto"
    assert summary.qat.reason.startswith(f"PTQ drop {summary.ptq_check.drop_pts:.2f} pts"), summary.qat.reason
    assert summary.qat.trained == ("QAT not needed" not in summary.qat.reason)
    (registered,) = client.search_model_versions(f"name = '{MODEL_NAME}' and run_id = '{run.info.run_id}'")
    assert str(registered.version) == read_registration(workspace).version
    # the register step set `candidate` on it (a later test's registration may have moved it on since)
    assert int(alias_version(stack, "candidate")) >= int(registered.version)


def test_the_registered_candidate_loads_as_an_mlflow_pyfunc_and_predicts_like_the_device(stack, nightly_run):
    import mlflow

    from edge.runtime import EdgeModel
    from tasks.contracts import Workspace, read_prepared, read_registration

    workspace = Workspace(Path(nightly_run.parameters["workspace"]))
    registration = read_registration(workspace)
    test = read_prepared(workspace).test
    mlflow.set_tracking_uri(stack.mlflow_url)
    # the nightly's own version (by number: later tests move the candidate alias to their own versions)
    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{registration.version}")
    probabilities = np.asarray(loaded.predict(test.x.astype(np.float32)))
    device = EdgeModel.load(workspace.variant_file(registration.variant)).predict(test.x)
    assert probabilities.shape == device.shape == (len(test.y), len(test.labels))
    assert np.array_equal(probabilities.argmax(axis=1), device.argmax(axis=1))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=0.02)
    no_tensorflow = ("import sys, mlflow, numpy as np\n"
                     f"model = mlflow.pyfunc.load_model('models:/{MODEL_NAME}/{registration.version}')\n"
                     "print(model.predict(np.zeros((2, 8, 8, 1), np.float32)).shape)\n"
                     "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'")
    completed = subprocess.run([sys.executable, "-c", no_tensorflow], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "MLFLOW_TRACKING_URI": stack.mlflow_url}, cwd="/")
    assert completed.returncode == 0 and "(2, 10)" in completed.stdout, completed.stderr[-3000:]


def test_the_candidate_exports_as_a_signed_bundle_that_a_device_installs(stack, nightly_run, tmp_path):
    from edge.runtime import EdgeModel
    from edge.signing import load_public_keys
    from edge.store.model_store import ModelStore
    from tasks.contracts import Workspace, read_prepared, read_registration

    workspace = Workspace(Path(nightly_run.parameters["workspace"]))
    registration = read_registration(workspace)
    edgeloop = str(Path(sys.executable).parent / "edgeloop")
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack.mlflow_url}

    def run(*args):
        return subprocess.run([edgeloop, *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)

    assert run("keys", "generate", "--dir", str(tmp_path / "keys"), "--name", "cp").returncode == 0
    # an alias of this test's own on the nightly's version (later tests move `candidate` to their versions)
    mlflow_client(stack).set_registered_model_alias(MODEL_NAME, "bundle-test", registration.version)
    assert oct((tmp_path / "keys" / "cp.key").stat().st_mode & 0o777) == "0o600"
    exported = run("bundle", "export", "--alias", "bundle-test", "--key", str(tmp_path / "keys" / "cp.key"),
                   "--out", str(tmp_path / "bundles"), "--large-variant", "tflite_fp32")
    assert exported.returncode == 0, exported.stderr[-3000:]
    bundle = Path(exported.stdout.strip().splitlines()[-1])
    store = ModelStore(tmp_path / "store", load_public_keys([tmp_path / "keys" / "cp.pub"]))
    manifest = store.install(bundle)
    assert (manifest.version, manifest.mlflow_version) == (f"v{registration.version}", registration.version)
    assert manifest.variant == registration.variant and manifest.data_version == registration.data_version
    assert manifest.model("large").sidecar["variant"] == "tflite_fp32" and manifest.alias == "bundle-test"
    test = read_prepared(workspace).test
    loaded = store.load(manifest.version)
    device = EdgeModel.load(workspace.variant_file(registration.variant)).predict(test.x)
    assert np.array_equal(loaded.primary.predict(test.x), device)
    sample = np.load(store.version_dir(manifest.version) / manifest.sample.file)
    assert np.array_equal(sample, test.x[:8].astype(np.float32))  # the registered input example
    missing = run("bundle", "export", "--alias", "no-such-alias", "--key", str(tmp_path / "keys" / "cp.key"),
                  "--out", str(tmp_path / "bundles"))
    assert missing.returncode == 2 and "has no alias 'no-such-alias'" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert sorted(path.name for path in (tmp_path / "bundles").iterdir()) == [bundle.name]  # nothing half-written


def test_mlflow_models_serve_answers_with_the_champion(stack, nightly_run):
    import urllib.request

    from tasks.contracts import Workspace, read_prepared
    from tasks.registry.promotion import ApprovalRecord, promote
    from tasks.stack.services import free_port

    if alias_version(stack, "champion") is None:
        promote(MODEL_NAME, alias_version(stack, "candidate"), ApprovalRecord.from_decision(True, "setup", ""))
    batch = read_prepared(Workspace(Path(nightly_run.parameters["workspace"]))).test.x[:16]
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow_bin), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "MLFLOW_TRACKING_URI": stack.mlflow_url,  # uvicorn from the venv
                                   "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        def answers():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    return response.status == 200
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                return False

        wait_for(answers, 120, "mlflow models serve to answer /ping")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": batch.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = np.asarray(json.loads(response.read())["predictions"])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert predictions.shape == (16, 10)
    assert np.allclose(predictions.sum(axis=1), 1.0, atol=0.02)


def test_invalid_parameters_are_rejected_before_any_work(stack):
    from prefect.deployments import run_deployment

    with pytest.raises(Exception) as caught:  # the server validates against the parameter schema
        run_deployment("training/nightly", parameters={"params": fast_parameters(epochs=-1)}, timeout=0)
    assert "epochs" in str(caught.value)


def test_cross_field_error_fails_the_run_before_any_task(stack, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    flow_run = run_deployment("training/nightly", timeout=300, poll_interval=1, parameters={
        "params": fast_parameters(model="keras_file"), "workspace": str(tmp_path)})
    assert flow_run.state.is_failed()
    assert "train.model_path is required" in flow_run.state.message
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert task_runs == []


def test_unreachable_mlflow_retries_then_fails_with_the_error(stack, tmp_path):
    code = ("from flows.training import training; from tests.conftest import fast_parameters; "
            "from flows.parameters import TrainingParameters; "
            f"training(params=TrainingParameters(**fast_parameters()), workspace={str(tmp_path)!r})")
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "PYTHONPATH": str(REPO_ROOT),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                               timeout=300)
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0
    assert "MLflow tracking store http://127.0.0.1:9 is unreachable" in output
    assert output.count("Retry") >= 3 or output.count("retry") >= 3, output[-3000:]
    assert not (tmp_path / "models").exists()  # nothing was trained


def _retrain_via_deployment(stack, workspace: Path):
    from prefect.deployments import run_deployment

    flow_run = run_deployment("retrain/on-drift", timeout=0, parameters={
        "params": fast_parameters(), "workspace": str(workspace), "approval_timeout_s": 900})
    return wait_for(lambda: (run := read_run(flow_run.id)).state.is_paused() and run, 300, "the approval pause")


def test_approval_through_the_client_promotes_with_audit_trail(stack, nightly_run, images, tmp_path):
    from prefect import resume_flow_run

    from tasks.registry.promotion import ApprovalRecord, promote

    if alias_version(stack, "champion") is None:  # make sure there is a champion to demote
        promote(MODEL_NAME, alias_version(stack, "candidate"), ApprovalRecord.from_decision(True, "setup", ""))
    old_champion = alias_version(stack, "champion")
    paused = _retrain_via_deployment(stack, tmp_path)
    assert paused.state.name == "Suspended"  # a deployment run holds no worker process while it waits
    new_version = alias_version(stack, "candidate")
    assert new_version != old_champion
    resume_flow_run(paused.id, run_input={"approve": True, "reviewer": "alice", "comment": "better on new data"})
    final = wait_for(lambda: (run := read_run(paused.id)).state.is_final() and run, 600, "packaging and promotion")
    assert final.state.is_completed(), final.state.message
    assert alias_version(stack, "champion") == new_version
    assert alias_version(stack, "previous") == old_champion
    tags = mlflow_client(stack).get_model_version(MODEL_NAME, new_version).tags
    assert tags["approved_by"] == "alice" and tags["approval_comment"] == "better on new data"
    assert tags["approved_at"].startswith(time.strftime("%Y"))
    # the approved version's images were built, checked and pushed before the promotion
    assert tags["image.amd64"].startswith(f"{images.registry}/edgeloop/edge@sha256:") and tags["image.version"]
    # no fleet file in this checkout: the rollout step says so instead of failing the promoted run
    assert final.state.result()["rollout"] == f"skipped: no fleet file {Path('fleet.yaml')}"


def _local_retrain(tmp_path: Path, timeout_s: int) -> tuple[subprocess.Popen, str]:
    """A local (non-deployment) retrain run in its own process; it pauses, keeping the process."""
    tag = f"test-{uuid.uuid4().hex[:8]}"
    code = ("import prefect; from flows.retrain import retrain; from flows.parameters import TrainingParameters; "
            "from tests.conftest import fast_parameters\n"
            f"with prefect.tags({tag!r}):\n"
            f"    retrain(params=TrainingParameters(**fast_parameters()), workspace={str(tmp_path)!r}, "
            f"approval_timeout_s={timeout_s}, return_state=True)")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return process, tag


def _run_by_tag(tag: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
    return runs[0] if runs else None


def test_rejection_from_the_terminal_keeps_the_champion(stack, nightly_run, tmp_path):
    """`edgeloop waiting` lists the paused retrain by name; `edgeloop reject NAME` decides it."""
    edgeloop = str(Path(sys.executable).parent / "edgeloop")
    champion = alias_version(stack, "champion")
    process, tag = _local_retrain(tmp_path, timeout_s=600)
    try:
        paused = wait_for(lambda: (run := _run_by_tag(tag)) and run.state.is_paused() and run, 300, "the pause")
        assert paused.state.name == "Paused"  # a local run pauses in its own process
        waiting = subprocess.run([edgeloop, "waiting"], capture_output=True, text=True, timeout=120)
        assert waiting.returncode == 0 and paused.name in waiting.stdout and str(paused.id) in waiting.stdout
        rejected = subprocess.run([edgeloop, "reject", paused.name, "--reviewer", "bob", "--comment",
                                   "worse on night shots"], capture_output=True, text=True, timeout=120)
        assert rejected.returncode == 0, rejected.stderr
        assert f"rejected {paused.name}" in rejected.stdout
        process.wait(timeout=120)
    finally:
        process.kill()
    final = read_run(paused.id)
    assert final.state.name == "Rejected"
    assert "rejected by bob: worse on night shots" in final.state.message
    assert alias_version(stack, "champion") == champion
    again = subprocess.run([edgeloop, "approve", paused.name, "--reviewer", "eve"], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and "not waiting for a decision" in again.stderr  # a decided run stays decided


def _flow_run_states(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [state.name for state in client.read_flow_run_states(flow_run_id)]


def test_no_decision_before_the_timeout_keeps_the_champion(stack, nightly_run, tmp_path):
    """Both timeout paths at once (they train side by side): a deployment run suspends and the server fails
    it when the pause expires; a local run pauses in its own process and its own timer ends it."""
    from prefect.deployments import run_deployment

    champion = alias_version(stack, "champion")
    deployed = run_deployment("retrain/on-drift", timeout=0, parameters={
        "params": fast_parameters(), "workspace": str(tmp_path / "deployed"), "approval_timeout_s": 5})
    process, tag = _local_retrain(tmp_path / "local", timeout_s=3)
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    local = _run_by_tag(tag)
    assert local.state.is_failed(), output[-2000:]
    assert "no decision within 3 s" in local.state.message and "not promoted" in local.state.message

    final = wait_for(lambda: (run := read_run(deployed.id)).state.is_final() and run, 300,
                     "the suspended retrain to time out")
    assert final.state.is_failed(), f"{final.state.name}: {final.state.message}"
    assert "never resumed" in final.state.message
    assert "Suspended" in _flow_run_states(deployed.id)  # it waited for a decision holding no worker
    (registered,) = [version for run in mlflow_runs_of(stack, deployed.id) for version in mlflow_client(stack)
                     .search_model_versions(f"name = '{MODEL_NAME}' and run_id = '{run.info.run_id}'")]
    assert "approved_by" not in registered.tags  # registered as a challenger, never promoted
    assert alias_version(stack, "champion") == champion


def test_the_approval_timer_only_notes_a_run_someone_already_decided(stack, nightly_run, caplog):
    """The real NotPausedError of a real server (the nightly run is long finished) is logged at info."""
    import logging

    from flows import retrain

    with caplog.at_level(logging.INFO, logger=retrain.log.name):
        retrain._expire_pause(nightly_run.id, 60)
    timer_records = [record for record in caplog.records if record.name == retrain.log.name]
    assert [record.levelno for record in timer_records] == [logging.INFO]
    assert "already resumed" in timer_records[0].getMessage()


def test_promotion_refuses_without_an_approving_record(stack, nightly_run):
    from tasks.registry.promotion import ApprovalRecord, PromotionRefused, promote

    candidate = alias_version(stack, "candidate")
    champion = alias_version(stack, "champion")
    with pytest.raises(PromotionRefused, match="no approval record"):
        promote(MODEL_NAME, candidate, None)
    with pytest.raises(PromotionRefused, match="rejected by carol"):
        promote(MODEL_NAME, candidate, ApprovalRecord.from_decision(False, "carol", "no"))
    with pytest.raises(PromotionRefused, match="names no reviewer"):
        promote(MODEL_NAME, candidate, ApprovalRecord.from_decision(True, "  ", ""))
    assert alias_version(stack, "champion") == champion


def test_gate_failure_fails_the_run_but_still_publishes_the_matrix(stack, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    candidate_before = alias_version(stack, "candidate")
    impossible = {"max_accuracy_drop_pts": 5.0, "min_size_reduction": 1000.0,
                  "max_host_latency_ms": GENEROUS_LATENCY_MS}
    flow_run = run_deployment("training/nightly", timeout=600, poll_interval=1, parameters={
        "params": fast_parameters(gates=impossible), "workspace": str(tmp_path)})
    assert flow_run.state.is_failed()
    assert "no variant passed the quality gates" in flow_run.state.message
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert "variant-comparison" in by_key
    assert "short by" in by_key["training-summary"].data
    assert alias_version(stack, "candidate") == candidate_before  # nothing registered
    runs = mlflow_runs_of(stack, flow_run.id)  # ... but the rejected candidate has its lineage in MLflow
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    rejected = runs[0]
    assert rejected.data.tags["edgeloop.outcome"] == "rejected by the quality gates"
    assert rejected.data.params["train.epochs"] == "2" and "tflite_int8.accuracy" in rejected.data.metrics
    reports = {artifact.path for artifact in mlflow_client(stack).list_artifacts(rejected.info.run_id, "reports")}
    assert {"reports/comparison.md", "reports/evaluation.json"} <= reports
    name = rejected.data.params["mlflow.registered_model"]
    assert not mlflow_client(stack).search_model_versions(f"name = '{name}' and run_id = '{rejected.info.run_id}'")


def test_a_broken_params_yaml_fails_prefect_deploy_with_the_config_message(stack, tmp_path):
    import shutil

    for name in ("flows", "tasks", "edge", "scripts"):
        shutil.copytree(REPO_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("prefect.yaml", "devices.yaml"):
        shutil.copy2(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 0\n")
    completed = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": str(tmp_path), "PWD": str(tmp_path)})
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output[-3000:]
    assert "train.epochs: got 0" in output, output[-3000:]
