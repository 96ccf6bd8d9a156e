"""The approval timer of a local retrain run: 'already resumed' is normal, anything else is a warning."""

import logging
import uuid

from flows import retrain


def test_a_timer_that_cannot_reach_the_server_warns(caplog):
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
        with caplog.at_level(logging.INFO, logger=retrain.log.name):
            retrain._expire_pause(uuid.uuid4(), 60)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings and "could not expire run" in warnings[0].getMessage()


def test_a_run_already_resumed_is_only_noted(caplog, monkeypatch):
    from prefect.exceptions import NotPausedError

    def already_resumed(*args, **kwargs):
        raise NotPausedError("Cannot resume a run that isn't paused!")

    monkeypatch.setattr(retrain, "resume_flow_run", already_resumed)  # the decision a human made first
    with caplog.at_level(logging.INFO, logger=retrain.log.name):
        retrain._expire_pause(uuid.uuid4(), 60)
    assert [record.levelno for record in caplog.records] == [logging.INFO]
    assert "already resumed" in caplog.records[0].getMessage()
