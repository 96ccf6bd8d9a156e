"""The flow a client with only the control plane's two URLs runs in the team tests: it logs an MLflow run with a
metric and an artifact, registers a model version from it, and returns (and prints, run as a script) what it
logged as JSON."""

from __future__ import annotations

import textwrap


def smoke_flow(flow_name: str, model_name: str, evidence: str) -> str:
    """The source of a module holding the flow ``smoke`` (Prefect name ``flow_name``)."""
    return textwrap.dedent(f'''
        import json
        from pathlib import Path

        import mlflow
        from prefect import flow

        @flow(name={flow_name!r})
        def smoke() -> str:
            client = mlflow.MlflowClient()
            with mlflow.start_run() as run:
                mlflow.log_metric("accuracy", 0.97)
                Path("evidence.txt").write_text({evidence!r})
                mlflow.log_artifact("evidence.txt")
            client.create_registered_model({model_name!r})
            version = client.create_model_version({model_name!r}, f"{{run.info.artifact_uri}}/evidence.txt",
                                                  run.info.run_id)
            return json.dumps({{"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri,
                               "version": version.version}})

        if __name__ == "__main__":
            print(smoke())
    ''')
