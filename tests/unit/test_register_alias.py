"""Registration is all-or-nothing: a version whose description or ``candidate`` alias cannot be set is deleted
again, and the user gets the project's error (no traceback). Real local SQLite MLflow store, no server."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from edge.errors import EXIT_USER_ERROR
from tasks.config import Params
from tasks.entrypoint import report_user_errors
from tasks.errors import EdgeloopError, ServiceUnavailable, StageError
from tasks.registry.register import CANDIDATE_ALIAS, register_candidate
from tasks.registry.tracking import RunRecord

VARIANT = "tflite_int8"


@dataclass(frozen=True)
class Registry:
    """A logged run in a scratch store and a registered model name of this test's own."""

    run: RunRecord
    model_uri: str
    name: str

    def params(self) -> Params:
        return Params.model_validate({"mlflow": {"registered_model": self.name}})

    def versions(self) -> list[str]:
        return [str(v.version) for v in mlflow.MlflowClient().search_model_versions(f"name = '{self.name}'")]

    def register(self) -> str:
        return register_candidate(self.params().mlflow, self.run, self.model_uri, VARIANT, {"variant": VARIANT})


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunRecord, str]]:
    """One finished run with a model file logged, in a scratch store shared by this module (creating a store
    takes seconds); its record and the file's artifact URI."""
    root = tmp_path_factory.mktemp("register-alias")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.MlflowClient().create_experiment("unit", artifact_location=(root / "artifacts").as_uri())
    model_file = root / f"{VARIANT}.tflite"
    model_file.write_bytes(b"TFL3 not a real model: registration does not read it")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(model_file), f"models/{VARIANT}")
    yield (RunRecord(run.info.run_id, experiment, run.info.artifact_uri, mlflow.get_tracking_uri()),
           f"{run.info.artifact_uri}/models/{VARIANT}")
    mlflow.set_tracking_uri(None)


@pytest.fixture
def registry(logged_run: tuple[RunRecord, str], request: pytest.FixtureRequest) -> Registry:
    return Registry(*logged_run, name=re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name))


def refuse_with(error: Exception, registry: Registry, seen: list[list[str]]) -> Callable[..., None]:
    """A client method that fails with ``error``, noting which versions existed when it was called."""
    def refuse(self: mlflow.MlflowClient, *args: object, **kwargs: object) -> None:
        seen.append(registry.versions())
        raise error
    return refuse


def test_a_registered_version_gets_the_candidate_alias(registry: Registry) -> None:
    version = registry.register()
    assert registry.versions() == [version]
    by_alias = mlflow.MlflowClient().get_model_version_by_alias(registry.name, CANDIDATE_ALIAS)
    assert str(by_alias.version) == version and by_alias.tags["variant"] == VARIANT
    assert by_alias.description == f"{VARIANT} from run {registry.run.run_id}"


@pytest.mark.parametrize(("method", "error", "kind"), [
    ("set_registered_model_alias", MlflowException("alias refused by the store"), StageError),
    ("update_model_version", MlflowException("description refused by the store"), StageError),
    ("set_registered_model_alias", ConnectionRefusedError(111, "Connection refused"), ServiceUnavailable),
])
def test_a_version_whose_alias_cannot_be_set_is_deleted_again(registry: Registry, monkeypatch: pytest.MonkeyPatch,
                                                              method: str, error: Exception,
                                                              kind: type[StageError]) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(mlflow.MlflowClient, method, refuse_with(error, registry, seen))
    with pytest.raises(kind, match=rf"version 1 of {re.escape(registry.name)} could not be given its description "
                                   r"and the alias 'candidate' \(.+\); it was deleted again and nothing is "
                                   r"registered") as raised:
        registry.register()
    assert raised.value.__cause__ is error
    assert seen == [["1"]]  # the version existed when the step failed ...
    assert registry.versions() == []  # ... and is gone now
    with pytest.raises(MlflowException):
        mlflow.MlflowClient().get_model_version_by_alias(registry.name, CANDIDATE_ALIAS)


def test_a_version_that_cannot_be_deleted_either_is_named_for_the_user(registry: Registry,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    for method in ("set_registered_model_alias", "delete_model_version"):
        monkeypatch.setattr(mlflow.MlflowClient, method, refuse_with(MlflowException(f"{method} refused"),
                                                                     registry, seen))
    with pytest.raises(StageError, match=r"nor be deleted again \(MlflowException: delete_model_version refused\); "
                                         r"delete it in MLflow, then run the register stage again"):
        registry.register()
    assert registry.versions() == ["1"]  # the message is honest: the version is still there


def test_the_user_gets_the_message_and_exit_code_without_a_traceback(registry: Registry,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    refusal = MlflowException("alias refused by the store")
    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", refuse_with(refusal, registry, []))
    assert issubclass(StageError, EdgeloopError)  # what every entry point catches
    exit_code = report_user_errors(registry.register)
    stderr = capsys.readouterr().err
    assert exit_code == EXIT_USER_ERROR
    (message,) = [line for line in stderr.splitlines() if line.startswith("error: ")]  # MLflow prints notes too
    assert message.startswith(f"error: version 1 of {registry.name} could not be given")
    assert "alias refused by the store" in message and "deleted again" in message and "Traceback" not in stderr
    assert registry.versions() == []
