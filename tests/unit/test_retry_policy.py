"""Flows retry only what retrying can fix: no answer, timeouts, 5xx; never a bug, bad data or a refusal."""

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from flows.retry import is_transient
from tasks.errors import DataError, GateFailure, PromotionRefused, ServiceUnavailable


@pytest.mark.parametrize("error", [
    ServiceUnavailable("MLflow tracking store http://x is unreachable"),
    ConnectionRefusedError(111, "refused"),
    TimeoutError("timed out"),
    requests.ConnectionError("no route"),
    requests.Timeout("read timed out"),
    RestException({"error_code": "INTERNAL_ERROR", "message": "database is locked"}),  # the server said 500
    MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed with exception "
                    "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded"),
])
def test_transient_failures_are_retried(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    PromotionRefused("no approving decision"),
    GateFailure("no variant passed the quality gates"),
    DataError("labels out of range"),
    ValueError("a bug"),
    KeyError("variant"),
    MlflowException("bad name", error_code=INVALID_PARAMETER_VALUE),
    MlflowException("no such version", error_code=RESOURCE_DOES_NOT_EXIST),
    MlflowException("signature does not match the model"),  # raised client-side: INTERNAL_ERROR, still a bug
    RestException({"error_code": "RESOURCE_ALREADY_EXISTS", "message": "exists"}),
])
def test_bugs_bad_input_and_refusals_are_not_retried(error):
    assert not is_transient(error)


def test_an_mlflow_server_that_does_not_answer_is_transient_and_named(monkeypatch):
    from tasks.config import MlflowParams
    from tasks.registry.tracking import configure

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ServiceUnavailable, match="http://127.0.0.1:9 is unreachable"):
        configure(MlflowParams(tracking_uri="http://127.0.0.1:9"))


def test_an_unusable_tracking_store_is_not_retried(monkeypatch, tmp_path):
    from tasks.config import MlflowParams
    from tasks.errors import StageError
    from tasks.registry.tracking import configure

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "store.db").write_text("this is not a SQLite database")
    with pytest.raises(StageError, match="cannot be used") as caught:
        configure(MlflowParams(tracking_uri=f"sqlite:///{tmp_path / 'store.db'}"))
    assert not is_transient(caught.value)
