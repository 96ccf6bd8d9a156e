"""Helpers shared by the tests that talk to the real Prefect and MLflow servers of the ``stack`` fixture."""

from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def read_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def mlflow_client(stack):
    import mlflow

    return mlflow.MlflowClient(stack.mlflow_url)


def mlflow_runs_of(stack, flow_run_id) -> list:
    """MLflow runs tagged with a Prefect flow run id, across all experiments."""
    client = mlflow_client(stack)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")


def terminate_all(processes) -> None:
    """SIGTERM every process still running (resumed first, should a test have paused it), then wait for each:
    killed when it does not stop within 10 s."""
    import signal
    import subprocess

    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
