"""The fleet's broker security, against a real Mosquitto started by tasks/stack/mosquitto.py with the password
file and ACL of tasks/rollout/fleet.py and the settings of tasks/rollout/broker.py, through real
paho-mqtt clients (MQTT v5).

The broker replaces every client id with the login's user name, so one login holds one connection: a
test never opens a second connection as a login another connection of the module still uses.

Negative checks ("the control plane never saw it", "the device never got it") are synchronised by a
barrier message: the same sender's next, allowed message on the same path. The broker keeps one
sender's messages in order for one subscriber, so once the barrier arrives, the refused message
would already have arrived.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_system_tools
from tests.mqtt_helpers import TIMEOUT_S, Peer

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 135  # MQTT v5 reason code Mosquitto 2 answers a refused CONNECT and a refused PUBLISH with
NO_MATCHING_SUBSCRIBERS = 16  # PUBACK: accepted, and nobody subscribes to it (yet)
PACKET_TOO_LARGE = 149  # DISCONNECT reason for a packet over max_packet_size
GROUP_A, GROUP_B = "group-a", "group-b"


@dataclass(frozen=True)
class Fleet:
    credentials: Path
    passwords: dict[str, str]   # device -> plaintext (control plane included)
    fleet_file: Path


@dataclass(frozen=True)
class BrokerUnderTest:
    run_dir: Path
    broker: object  # tasks.stack.mosquitto.Broker
    fleet: Fleet

    @property
    def port(self) -> int:
        return self.broker.port

    def peer(self, user: str | None, password: str | None = None, **options) -> Peer:
        return Peer(self.port, user, self.fleet.passwords.get(user, "") if password is None else password,
                    **options)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    """Four simulated devices (two per group, hashed with 1 PBKDF2 iteration) plus one added as an operator
    would (Mosquitto's 101 iterations)."""
    from tasks.rollout.fleet import CONTROL_PLANE_USER, add_device, ensure_control_plane, simulated_fleet

    credentials = tmp_path_factory.mktemp("fleet-credentials")
    devices = simulated_fleet(4, [GROUP_A, GROUP_B], credentials, iterations=1)
    assert {device: group for device, (group, _) in devices.items()} == {
        "sim-0": GROUP_A, "sim-1": GROUP_B, "sim-2": GROUP_A, "sim-3": GROUP_B}
    passwords = {device: password for device, (_, password) in devices.items()}
    passwords["cam-9"] = add_device(credentials / "fleet.yaml", credentials, "cam-9", GROUP_A)
    passwords[CONTROL_PLANE_USER] = ensure_control_plane(credentials)
    return Fleet(credentials, passwords, credentials / "fleet.yaml")


def _start(run_dir: Path, fleet: Fleet) -> BrokerUnderTest:
    from tasks.rollout.fleet import ACL_FILE, PASSWORD_FILE
    from tasks.stack import mosquitto, services

    broker = mosquitto.start_mosquitto(run_dir, services.free_port(), fleet.credentials / PASSWORD_FILE,
                                      fleet.credentials / ACL_FILE)
    return BrokerUnderTest(run_dir, broker, fleet)


@pytest.fixture(scope="module")
def broker(fleet, tmp_path_factory) -> Iterator[BrokerUnderTest]:
    from tasks.stack import mosquitto
    require_system_tools("mosquitto", packages="mosquitto")
    run_dir = tmp_path_factory.mktemp("mosquitto")
    try:
        yield _start(run_dir, fleet)
    finally:
        mosquitto.stop_mosquitto(run_dir)


@pytest.fixture(scope="module")
def control_plane(broker) -> Iterator[Peer]:
    """The control plane, subscribed to everything under ``fleet/``, with the rollout channel's client id."""
    peer = broker.peer("control-plane", client_id="edgeloop-control-plane")
    assert peer.connack.value == 0
    assert peer.subscribe("fleet/#") == 1
    yield peer
    peer.close()


@pytest.mark.parametrize(("user", "password"), [("sim-0", "not-its-password"), ("nobody", "whatever"),
                                                ("control-plane", "guessed"), (None, None)],
                         ids=["wrong-password", "unknown-user", "control-plane-wrong-password", "anonymous"])
def test_bad_credentials_are_refused_at_connect(broker, user, password):
    peer = broker.peer(user, password)
    try:
        assert peer.connack.value == NOT_AUTHORIZED, peer.connack
    finally:
        peer.close()


@pytest.mark.parametrize("device", ["sim-0", "cam-9"], ids=["1-iteration-hash", "101-iteration-hash"])
def test_a_device_reads_its_groups_retained_model_and_writes_its_own_status(broker, control_plane, device):
    manifest = f"manifest for {GROUP_A} ({device})".encode()
    assert control_plane.publish(f"fleet/{GROUP_A}/model", manifest, retain=True) == 0
    peer = broker.peer(device)
    try:
        assert peer.connack.value == 0
        assert peer.subscribe(f"fleet/{GROUP_A}/model") == 1
        assert peer.received(f"fleet/{GROUP_A}/model", manifest).retain
        for kind in ("status", "telemetry"):
            assert peer.publish(f"fleet/{GROUP_A}/{kind}/{device}", b"installed") == 0
            control_plane.received(f"fleet/{GROUP_A}/{kind}/{device}", b"installed")
    finally:
        peer.close()


@pytest.mark.parametrize("topic", [
    f"fleet/{GROUP_A}/model",             # its own group's manifest: only the control plane publishes those
    f"fleet/{GROUP_B}/model",
    f"fleet/{GROUP_A}/status/sim-2",      # a neighbour's status and telemetry
    f"fleet/{GROUP_A}/telemetry/sim-2",
    f"fleet/{GROUP_B}/status/sim-0",      # its own id under another group
    "fleet/anything",
], ids=["own-group-manifest", "other-group-manifest", "neighbour-status", "neighbour-telemetry",
        "status-in-other-group", "outside-its-topics"])
def test_a_device_cannot_publish_outside_its_own_topics(broker, control_plane, topic):
    peer = broker.peer("sim-0")
    forged = f"forged by sim-0 on {topic}".encode()
    barrier = f"barrier after {topic}".encode()
    try:
        assert peer.publish(topic, forged, retain=True) == NOT_AUTHORIZED
        assert peer.publish(f"fleet/{GROUP_A}/status/sim-0", barrier, retain=True) == 0
        control_plane.received(f"fleet/{GROUP_A}/status/sim-0", barrier)
        assert not [m for m in control_plane.messages if m.payload == forged]
    finally:
        peer.close()
    # and nothing was retained for later readers: subscribing again sends the retained messages again
    since = len(control_plane.messages)
    control_plane.subscribe(topic)
    control_plane.subscribe(f"fleet/{GROUP_A}/status/sim-0")
    assert control_plane.received(f"fleet/{GROUP_A}/status/sim-0", barrier, since, retained=True).retain
    assert not [m for m in control_plane.messages[since:] if m.payload == forged]


def test_a_device_cannot_read_another_groups_model(broker, control_plane):
    peer = broker.peer("sim-0")
    secret, barrier = b"group-b manifest", b"group-a manifest after it"
    try:
        for topic in (f"fleet/{GROUP_B}/model", "fleet/#", "#"):
            assert peer.subscribe(topic) in (1, NOT_AUTHORIZED)  # 2.0 grants and then filters delivery
        assert control_plane.publish(f"fleet/{GROUP_B}/model", secret, retain=True) == 0
        assert control_plane.publish(f"fleet/{GROUP_A}/model", barrier, retain=True) == 0
        peer.received(f"fleet/{GROUP_A}/model", barrier)
        assert not [topic for topic in peer.topics() if not topic.startswith(f"fleet/{GROUP_A}/model")]
    finally:
        peer.close()
    assert control_plane.received(f"fleet/{GROUP_B}/model", secret)  # it was there to be read


@pytest.mark.parametrize("taken", ["edgeloop-control-plane", "control-plane", "sim-2"],
                         ids=["channel-client-id", "control-plane-user", "device-id"])
def test_a_device_taking_another_client_id_disconnects_nobody(broker, control_plane, taken):
    """sim-0 connects with the control plane's or sim-2's client id: the broker gives it its own user name as
    client id instead, so the control plane and sim-2 stay connected and keep talking, and the attacker
    gets no more than sim-0 may do (not sim-2's topics)."""
    victim = broker.peer("sim-2", client_id="sim-2")  # as its updater connects
    attacker = broker.peer("sim-0", client_id=taken)
    try:
        assert attacker.connack.value == 0  # admitted as itself, whatever id it asked for
        assert attacker.publish(f"fleet/{GROUP_A}/status/sim-2", b"forged", retain=True) == NOT_AUTHORIZED
        assert attacker.publish(f"fleet/{GROUP_A}/status/sim-0", f"attack as {taken}".encode()) == 0
        control_plane.received(f"fleet/{GROUP_A}/status/sim-0", f"attack as {taken}".encode())
        after = f"sim-2 still here after {taken}".encode()
        assert victim.publish(f"fleet/{GROUP_A}/telemetry/sim-2", after) == 0  # on the same connection as before
        control_plane.received(f"fleet/{GROUP_A}/telemetry/sim-2", after)
        assert control_plane.publish(f"fleet/{GROUP_A}/model", after, retain=True) == 0  # the control plane too
        assert victim.subscribe(f"fleet/{GROUP_A}/model") == 1
        victim.received(f"fleet/{GROUP_A}/model", after)
        assert victim.disconnects == [] and control_plane.disconnects == [] and attacker.disconnects == []
        assert victim.client.is_connected() and control_plane.client.is_connected()
    finally:
        attacker.close()
        victim.close()


def test_a_packet_over_the_size_limit_is_dropped_with_its_senders_connection(broker, control_plane):
    """The largest fleet message (a signed manifest's payload limit) passes; one byte over the packet limit
    costs the sender its connection, and the message is neither forwarded nor retained."""
    from edge.rollout import MAX_MESSAGE_BYTES
    from tasks.rollout.broker import MAX_PACKET_BYTES

    topic = f"fleet/{GROUP_A}/status/cam-9"
    largest, oversized = b"l" * MAX_MESSAGE_BYTES, b"o" * MAX_PACKET_BYTES
    peer = broker.peer("cam-9")
    try:
        assert peer.publish(topic, largest) == 0
        control_plane.received(topic, largest)
        peer.client.publish(topic, oversized, qos=1, retain=True)
        peer.wait(lambda: peer.disconnects, "the broker to disconnect the sender")
        assert [code.value for code in peer.disconnects] == [PACKET_TOO_LARGE]
    finally:
        peer.close()
    again = broker.peer("cam-9")  # the device itself may come back, with messages of a sane size
    try:
        assert again.publish(topic, b"barrier after the oversized one", retain=True) == 0
        control_plane.received(topic, b"barrier after the oversized one")
    finally:
        again.close()
    assert not [m for m in control_plane.messages if m.payload == oversized]
    assert control_plane.disconnects == [] and control_plane.client.is_connected()
    since = len(control_plane.messages)
    control_plane.subscribe(topic)  # the retained copy is the barrier, not the oversized message
    assert control_plane.received(topic, b"barrier after the oversized one", since).retain
    assert not [m for m in control_plane.messages[since:] if len(m.payload) > MAX_MESSAGE_BYTES]


def test_a_reloaded_broker_admits_added_and_refuses_removed_devices(broker):
    from tasks.rollout.fleet import add_device, remove_device
    from tasks.stack import mosquitto

    password = add_device(broker.fleet.fleet_file, broker.fleet.credentials, "cam-new", GROUP_B)
    # sim-3 is used by no other test of this module
    remove_device(broker.fleet.fleet_file, broker.fleet.credentials, "sim-3")
    assert mosquitto.reload_mosquitto(broker.run_dir)
    deadline = time.monotonic() + TIMEOUT_S
    while True:  # the broker re-reads its files on SIGHUP, asynchronously: poll until they apply
        added, removed = broker.peer("cam-new", password), broker.peer("sim-3")
        codes = (added.connack.value, removed.connack.value)
        added.close()
        removed.close()
        if codes == (0, NOT_AUTHORIZED) or time.monotonic() > deadline:
            break
    assert codes == (0, NOT_AUTHORIZED)


def _wait_for_autosave(database: Path, payloads: list[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not (database.is_file() and all(payload in database.read_bytes() for payload in payloads)):
        assert time.monotonic() < deadline, f"{database} did not hold the messages within {TIMEOUT_S} s"
        time.sleep(0.1)


@pytest.mark.parametrize("hard", [False, True], ids=["stopped", "killed"])
def test_retained_manifests_and_queued_messages_survive_a_broker_restart(fleet, tmp_path, hard):
    from tasks.stack import mosquitto
    require_system_tools("mosquitto", packages="mosquitto")
    started = _start(tmp_path / "run", fleet)
    retained, queued = f"retained manifest {hard}".encode(), f"queued while offline {hard}".encode()
    try:
        device = started.peer("sim-2", client_id="sim-2", clean_start=False, session_expiry_s=3600)
        assert device.subscribe(f"fleet/{GROUP_A}/model") == 1
        device.close()  # its session (subscription, QoS 1 queue) stays on the broker
        control = started.peer("control-plane")
        assert control.publish(f"fleet/{GROUP_B}/model", retained, retain=True) == NO_MATCHING_SUBSCRIBERS
        assert control.publish(f"fleet/{GROUP_A}/model", queued) == 0  # 0: the offline session subscribes
        control.close()
        if hard:  # a killed broker keeps what its last autosave wrote: wait for one that holds both messages
            _wait_for_autosave(started.run_dir / "mosquitto" / "data" / "mosquitto.db", [retained, queued])
        restarted = mosquitto.restart_mosquitto(started.run_dir, started.broker, hard=hard)
        assert restarted.port == started.port and restarted.pid != started.broker.pid
        device = started.peer("sim-2", client_id="sim-2", clean_start=False, session_expiry_s=3600)
        try:
            assert device.session_present
            assert not device.received(f"fleet/{GROUP_A}/model", queued).retain
        finally:
            device.close()
        reader = started.peer("sim-1")
        try:
            reader.subscribe(f"fleet/{GROUP_B}/model")
            assert reader.received(f"fleet/{GROUP_B}/model", retained).retain
        finally:
            reader.close()
    finally:
        mosquitto.stop_mosquitto(started.run_dir)
