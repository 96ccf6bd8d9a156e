"""The fleet broker's configuration (tasks/rollout/broker.py) is the compose stack's, file for file.

That Mosquitto enforces it (client ids bound to logins, the size limit) is tests/integration/test_mqtt_security.py.
"""

from __future__ import annotations

import yaml

from edge.rollout import MAX_MESSAGE_BYTES
from tasks.rollout.broker import (
    COMPOSE_CONFIG,
    COMPOSE_CREDENTIALS,
    COMPOSE_TLS,
    COMPOSE_TLS_PORT,
    MAX_PACKET_BYTES,
    compose_config,
    security_settings,
)
from tasks.rollout.fleet import ACL_FILE
from tests.conftest import REPO_ROOT

REGENERATE = ("regenerate it: .venv/bin/python -c 'from tasks.rollout.broker import compose_config; "
              "print(compose_config(), end=\"\")' > docker/mosquitto.conf")


def test_docker_mosquitto_conf_is_the_generated_configuration():
    assert COMPOSE_CONFIG.read_text() == compose_config(), REGENERATE


def test_the_security_settings_bind_identity_and_bound_each_client():
    settings = dict(line.split(" ", 1) for line in security_settings("/p", "/a"))
    assert settings["allow_anonymous"] == "false" and settings["use_username_as_clientid"] == "true"
    assert (settings["password_file"], settings["acl_file"]) == ("/p", "/a")
    assert int(settings["max_packet_size"]) == MAX_PACKET_BYTES > MAX_MESSAGE_BYTES  # a signed manifest fits
    for limit in ("max_queued_messages", "max_queued_bytes", "max_inflight_messages"):
        assert int(settings[limit]) > 0, f"{limit} 0 means no limit"


def test_the_compose_stack_hands_the_fleet_files_to_the_broker():
    compose = yaml.safe_load((REPO_ROOT / "docker" / "compose.control-plane.yml").read_text())["services"]
    broker, copier = compose["mosquitto"], compose["mosquitto-credentials"]
    assert f"./{COMPOSE_CONFIG.name}:/mosquitto/config/mosquitto.conf:ro" in broker["volumes"]
    assert f"mosquitto-credentials:{COMPOSE_CREDENTIALS}:ro" in broker["volumes"]
    assert broker["depends_on"]["mosquitto-credentials"]["condition"] == "service_completed_successfully"
    assert f"mosquitto-credentials:{COMPOSE_CREDENTIALS}" in copier["volumes"]
    assert f"/fleet/{ACL_FILE}" in copier["command"][0] and f"{COMPOSE_CREDENTIALS}/{ACL_FILE}" in compose_config()
    for source, target in (("/ca/ca.crt", COMPOSE_TLS.ca), ("/ca/servers/broker.crt", COMPOSE_TLS.certificate),
                           ("/ca/servers/broker.key", COMPOSE_TLS.key), ("/ca/crl.pem", COMPOSE_TLS.crl)):
        assert source in copier["command"][0] and f" {target}" in compose_config()
    assert "password_file" not in compose_config() and "require_certificate true" in compose_config()
    assert broker["ports"][0].endswith(f":{COMPOSE_TLS_PORT}")
