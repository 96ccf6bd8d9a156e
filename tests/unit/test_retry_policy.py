"""Flows retry only what retrying can fix: no answer, timeouts, 5xx; never a bug, bad data or a refusal."""

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from flows.retry import is_transient
from tasks.errors import DataError, GateFailure, PromotionRefused, ServiceUnavailable


@pytest.mark.parametrize("error", [
    ServiceUnavailable("MLflow tracking store http://x is unreachable"),
    ConnectionRefusedError(111, "refused"),
    TimeoutError("timed out"),
    requests.ConnectionError("no route"),
    requests.Timeout("read timed out"),
    MlflowException("server error", error_code=INTERNAL_ERROR),
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
])
def test_bugs_bad_input_and_refusals_are_not_retried(error):
    assert not is_transient(error)
