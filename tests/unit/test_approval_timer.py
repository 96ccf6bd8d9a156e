"""The approval timer of a local retrain run: a server it cannot reach is a warning (the normal case,
a run a human already resumed, is in tests/integration/test_flows.py against a real server)."""

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
