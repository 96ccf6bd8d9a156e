"""A hostile enrolled device against a real rollout: the real Mosquitto with the fleet's passwords and ACLs, three
honest simulated devices (the real edge service and updater each, serving traffic) and one device owned by an
attacker, who publishes with its own credentials on its own status and telemetry topics.

1. While a rollout runs, hypothesis generates hostile status and telemetry payloads (nested, huge, non-JSON,
   NaN/Infinity, wrong types, negative and enormous counts, unknown fields, another device's id) and the
   attacker publishes each: the rollout ends completed or rolled back with a reason, the channel's network
   thread lives, every message is dropped or accepted as the schema says, counted per reason, and no honest
   device's figures move.
2. The attacker leaves a nested document retained on its status topic: a new channel receives it on subscribe,
   drops it, and the next rollout completes.
3. The attacker acknowledges the next rollout's manifest as a failed install: one failure is not a veto, the
   stage counts it like a silent device (within ``max_missing_fraction``) and the honest devices update.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import require_system_tools
from tests.stack_helpers import wait_for

pytestmark = pytest.mark.integration
GROUP = "hostile"
HONEST = ["sim-0", "sim-1", "sim-2"]
ATTACKER = "sim-3"
FUZZ_CASES = 300
SLOW_HOST_S = 90  # waits that end at once on an idle host, generous for a CI host also building images under qemu
BROKER_PAYLOAD_LIMIT = 60_000  # under the broker's message_size_limit: every case reaches the control plane


def _release(bundle: Path, version: str):
    from edge.files import sha256_file
    from tasks.rollout.engine import Release

    return Release(version, bundle.resolve().as_uri(), sha256_file(bundle))


@pytest.fixture(scope="module")
def hostile_fleet(tmp_path_factory, bundle_kit, digits):
    """The broker, the three honest devices on v1 serving traffic, and the attacker's broker password."""
    from scripts.device_fleet import DeviceFleet
    from tasks.rollout.fleet import ACL_FILE, PASSWORD_FILE, ensure_control_plane, simulated_fleet
    from tasks.stack import mosquitto, services

    require_system_tools("mosquitto", packages="mosquitto")
    root = tmp_path_factory.mktemp("hostile-fleet")
    credentials = root / "credentials"
    passwords = simulated_fleet(len(HONEST) + 1, [GROUP], credentials, iterations=2)
    control_password = ensure_control_plane(credentials)
    broker = mosquitto.start_mosquitto(root / "run", services.free_port(), credentials / PASSWORD_FILE,
                                       credentials / ACL_FILE)
    releases = {version: _release(bundle_kit.bundle(version, name=f"hostile-{version}.tar.gz"), version)
                for version in ("v1", "v2", "v3", "v4")}
    address = f"127.0.0.1:{broker.port}"
    devices = DeviceFleet(root / "devices", address, GROUP, bundle_kit.public_dir)
    try:
        for device in HONEST:
            devices.start(device, passwords[device][1], Path(releases["v1"].bundle_url.removeprefix("file://")))
        wait_for(lambda: set(devices.versions().values()) == {"v1"}, SLOW_HOST_S, "every honest device to serve v1")
        with devices.traffic(digits.x[1200:1500], rate_per_device_hz=8.0):
            yield devices, address, control_password, passwords[ATTACKER][1], releases
    finally:
        try:
            devices.stop()
        finally:
            mosquitto.stop_mosquitto(root / "run")


class Attacker:
    """The hostile device: a plain MQTT client with the device's own login, publishing on its own topics.

    Besides the fuzz it lies the way a compromised device would: it acknowledges every manifest as installed
    without installing anything and, every half second, reports absurd but valid figures about the version it
    claims (a billion requests, all errors, an hour's p95, no confidence), to drown or roll back the others.
    """

    SABOTAGE = {"requests": 10**9, "errors": 10**9, "error_rate": 1.0, "p50_ms": 3_600_000.0,
                "p95_ms": 3_600_000.0, "mean_confidence": 0.0}

    def __init__(self, address: str, password: str) -> None:
        host, _, port = address.rpartition(":")
        self.manifest: dict | None = None
        self.ack_state = "installed"  # what it claims for every manifest: "failed" to try a veto
        self.sabotage: list[dict] = []  # the summaries it sent as its own, valid by the schema
        self.stopping = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=ATTACKER, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(ATTACKER, password)
        self.client.on_message = self._manifest
        self.client.connect(host, int(port))
        self.client.loop_start()
        wait_for(self.client.is_connected, 20, "the attacker to connect", interval_s=0.05)
        self.client.subscribe(f"fleet/{GROUP}/model", qos=1)
        self.saboteur = threading.Thread(target=self._sabotage, daemon=True, name="saboteur")
        self.saboteur.start()

    def _manifest(self, client, userdata, message) -> None:
        self.manifest = json.loads(json.loads(message.payload)["manifest"])  # the control plane's, signed
        self.ack()

    def ack(self) -> None:
        """A valid status claiming ``ack_state`` for the last manifest (nothing was installed either way)."""
        if (manifest := self.manifest) is not None:
            installed = self.ack_state == "installed"
            status = {"device": ATTACKER, "group": GROUP, "rollout_id": manifest["rollout_id"],
                      "sequence": manifest["sequence"], "state": self.ack_state,
                      "version": manifest["version"] if installed else "v1", "target": manifest["version"],
                      "reason": "" if installed else "health_check", "at": time.time()}
            self.client.publish(f"fleet/{GROUP}/status/{ATTACKER}", json.dumps(status).encode(), qos=1)

    def _sabotage(self) -> None:
        while not self.stopping.wait(0.5):
            claimed = self.manifest["version"] if self.manifest else "v1"
            summary = {"device": ATTACKER, "version": claimed, "window_s": 0.5, **self.SABOTAGE, "at": time.time()}
            self.sabotage.append(summary)
            self.client.publish(f"fleet/{GROUP}/telemetry/{ATTACKER}", json.dumps(summary).encode(), qos=1)

    def publish(self, kind: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(f"fleet/{GROUP}/{kind}/{ATTACKER}", payload, qos=1, retain=retain)
        info.wait_for_publish(20)
        assert info.is_published(), f"the broker did not acknowledge a {len(payload)}-byte {kind} message"

    def close(self) -> None:
        self.stopping.set()
        self.saboteur.join(10)
        self.client.loop_stop()
        self.client.disconnect()


def _templates() -> dict[str, dict]:
    summary = {"device": ATTACKER, "version": "v2", "window_s": 1.0, "requests": 40, "errors": 0, "error_rate": 0.0,
               "p50_ms": 2.0, "p95_ms": 4.0, "mean_confidence": 0.9, "at": 1_780_000_000.0}
    status = {"device": ATTACKER, "group": GROUP, "rollout_id": None, "sequence": None, "state": "refused",
              "version": "v1", "target": None, "reason": "malformed", "at": 1_780_000_000.0}
    return {"telemetry": summary, "status": status}


def hostile_messages():
    """(kind, payload) of every hostile class the issue names; a valid-looking one now and then."""
    from hypothesis import strategies as st

    from tasks.rollout.messages import MAX_COUNT, MAX_MESSAGE_BYTES

    templates = _templates()
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                               lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=12)

    def encoded(kind: str, message: object) -> tuple[str, bytes]:
        return kind, json.dumps(message, allow_nan=True).encode()

    def mutated(kind: str, field_strategy, value_strategy):
        return st.tuples(field_strategy, value_strategy).map(
            lambda change: encoded(kind, {**templates[kind], change[0]: change[1]}))

    cases = []
    for kind, template in templates.items():
        numeric = st.sampled_from(["requests", "errors", "p95_ms", "mean_confidence", "window_s"]
                                  if kind == "telemetry" else ["sequence", "at"])
        counts = st.sampled_from(["requests", "errors"] if kind == "telemetry" else ["sequence"])
        cases += [
            st.integers(1_000, 4_000).map(lambda depth, k=kind: (k, b"[" * depth + b"]" * depth)),  # nested
            st.integers(1_000, 3_000).map(lambda depth, k=kind: (k, b'{"device":' + b'{"a":' * depth + b"1"
                                                                 + b"}" * depth + b"}")),
            st.integers(MAX_MESSAGE_BYTES + 1, BROKER_PAYLOAD_LIMIT).map(  # huge, and otherwise valid
                lambda size, k=kind: encoded(k, {**templates[k], "pad": "x" * size})),
            st.binary(max_size=300).map(lambda raw, k=kind: (k, raw)),  # non-JSON (mostly)
            st.text(max_size=200).map(lambda text, k=kind: (k, text.encode())),
            mutated(kind, numeric, st.sampled_from([math.nan, math.inf, -math.inf])),  # NaN / Infinity literals
            mutated(kind, st.sampled_from(sorted(set(template) - {"sequence"})), json_values),  # wrong types
            mutated(kind, counts, st.integers(max_value=-1) | st.integers(min_value=MAX_COUNT + 1)),
            st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda key, t=template: key not in t), json_values,
                            min_size=1, max_size=3).map(lambda extra, k=kind: encoded(k, {**templates[k], **extra})),
            st.sampled_from([*HONEST, "sim-9", "", "sim-0 "]).map(  # another device's id in the payload
                lambda device, k=kind: encoded(k, {**templates[k], "device": device, "requests": MAX_COUNT})),
        ]
    absurd = st.fixed_dictionaries({"requests": st.integers(0, MAX_COUNT), "p95_ms": st.floats(0, 3_600_000.0),
                                    "mean_confidence": st.floats(0, 1)}).map(  # valid, absurd: the attacker's own
        lambda figures: encoded("telemetry", {**templates["telemetry"], **figures, "errors": 0}))
    return st.one_of(*cases, absurd)


def _rollout(channel, key, releases, target: str, previous: str, stages: list[float]):
    from tasks.config import DriftParams, RolloutParams
    from tasks.rollout.engine import Rollout

    params = RolloutParams(group=GROUP, stages=stages, stage_window_s=3, ack_timeout_s=SLOW_HOST_S, jitter_s=0.5,
                           max_missing_fraction=0.5, baseline_window_s=30, max_confidence_drop=0.2,
                           min_p95_increase_ms=60_000)  # live latency on a busy host is no signal here
    return Rollout(channel, [*HONEST, ATTACKER], key, params, DriftParams(), "edgeloop-digits", releases[target],
                   releases[previous], poll_s=0.2)


def _honest_summaries_hold(channel, devices) -> None:
    """Every summary held for an honest device names it and counts no more requests than it was sent."""
    summaries = channel.telemetry_since(0.0)
    for device in HONEST:
        own = [s for s in summaries if s["device"] == device]
        sent = devices.devices[device].requests + devices.devices[device].errors
        assert own and sum(s["requests"] for s in own) <= sent, (device, sent, own[-3:])


def _check_stages(report, devices) -> None:
    """Figures only from installed devices; honest ones as they were sent; the saboteur counted, capped, outvoted."""
    for stage in report.stages:
        assert stage.figures is not None and stage.problems == [], stage
        assert set(stage.figures.by_device) <= set(stage.installed)
        for device in set(HONEST) & set(stage.figures.by_device):
            sent = devices.devices[device].requests + devices.devices[device].errors
            assert 0 < stage.figures.by_device[device].requests <= sent
        if ATTACKER in stage.installed:  # it lied its way in: its billion requests weigh as one typical device
            assert stage.figures.by_device[ATTACKER].requests >= 10**9 > stage.figures.requests


def test_a_hostile_device_cannot_stop_steer_or_hide_a_rollout(hostile_fleet, bundle_kit, capsys):
    from hypothesis import HealthCheck, Phase, given, settings

    from tasks.rollout.channel import MqttChannel
    from tasks.rollout.fleet import CONTROL_PLANE_USER
    from tasks.rollout.messages import MAX_MESSAGE_BYTES, MessageRefused, parse_device_message

    devices, address, control_password, attacker_password, releases = hostile_fleet
    keys = bundle_kit.trusted_keys()
    attacker = Attacker(address, attacker_password)
    expected: dict[str, int] = {}  # reason -> messages the schema refuses, as the control plane must count them
    accepted: list[dict] = []  # the fuzz summaries the schema accepts: the attacker's own figures
    try:
        with MqttChannel(address, GROUP, CONTROL_PLANE_USER, control_password, keys) as channel:
            wait_for(lambda: all(any(s["device"] == d and s["version"] == "v1" and s["requests"] > 0
                                     for s in channel.telemetry_since(0.0)) for d in HONEST),
                     SLOW_HOST_S, "v1 telemetry from every honest device")

            def send(kind: str, payload: bytes) -> None:
                try:
                    message = parse_device_message(kind, ATTACKER, payload)
                    if kind == "telemetry":
                        accepted.append(message)
                except MessageRefused as refused:
                    expected[refused.reason] = expected.get(refused.reason, 0) + 1
                attacker.publish(kind, payload)

            # Hostile messages counted before the rollout starts: its report must show at least these. The
            # fuzz below runs beside the rollout, which may end first on a slow host, so its report is a
            # snapshot somewhere between these counts and the final ones.
            send("telemetry", b"{not json")
            send("status", json.dumps({"pad": "x" * (MAX_MESSAGE_BYTES + 1)}).encode())
            before = dict(expected)
            wait_for(lambda: channel.dropped_messages().get(ATTACKER, {}) == before, SLOW_HOST_S,
                     "the control plane to count the first hostile messages", interval_s=0.2)
            rollout = _rollout(channel, bundle_kit.private_key, releases, "v2", "v1", [75, 100])
            result: dict = {}
            runner = threading.Thread(target=lambda: result.update(report=rollout.run()), daemon=True)
            runner.start()

            @settings(max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=hostile_messages())
            def publish(case: tuple[str, bytes]) -> None:
                send(*case)

            publish()
            attacker.ack()  # a valid fuzzed status may have replaced its acknowledgement
            wait_for(lambda: channel.dropped_messages().get(ATTACKER, {}) == expected, SLOW_HOST_S,
                     "the control plane to count every hostile message", interval_s=0.2)
            assert channel.network_alive()
            runner.join(2 * SLOW_HOST_S + 60)
            assert not runner.is_alive(), "the rollout did not end"
            first = result["report"]
            assert first.outcome == "completed", first.reason  # never in progress; and the saboteur lost
            assert channel.network_alive()
            assert set(channel.dropped_messages()) == {ATTACKER}  # nobody else lost a message
            reported = first.dropped_messages[ATTACKER]
            assert set(before) <= set(reported) <= set(expected), (before, reported, expected)
            assert all(before.get(reason, 0) <= count <= expected[reason] for reason, count in reported.items())
            _honest_summaries_hold(channel, devices)
            sent_by_attacker = [{**m, "received_at": None} for m in [*accepted, *attacker.sabotage]]
            assert all({**s, "received_at": None} in sent_by_attacker
                       for s in channel.telemetry_since(0.0) if s["device"] == ATTACKER)  # its own, valid ones
            _check_stages(first, devices)

        # ---- 2: a poisoned retained status does not stop the next rollout ---------------------------------
        poison = b"[" * 4_000 + b"]" * 4_000
        with pytest.raises(RecursionError):
            json.loads(poison)  # what used to end the channel's network thread, on every new channel
        attacker.publish("status", poison, retain=True)
        with MqttChannel(address, GROUP, CONTROL_PLANE_USER, control_password, keys) as channel:
            wait_for(lambda: channel.dropped_messages().get(ATTACKER, {}).get("not_json", 0) >= 1, SLOW_HOST_S,
                     "the retained poison to arrive and be dropped", interval_s=0.1)
            assert channel.network_alive()
            wait_for(lambda: all(any(s["device"] == d and s["version"] == "v2" and s["requests"] > 0
                                     for s in channel.telemetry_since(0.0)) for d in HONEST),
                     SLOW_HOST_S, "v2 telemetry from every honest device")
            second = _rollout(channel, bundle_kit.private_key, releases, "v3", "v2", [100]).run()
            assert second.outcome == "completed", second.reason
            assert sorted(second.stages[-1].installed) == sorted([*HONEST, ATTACKER]), second.stages[-1]
            assert channel.network_alive() and second.dropped_messages[ATTACKER]["not_json"] >= 1
            _check_stages(second, devices)
        wait_for(lambda: set(devices.versions().values()) == {"v3"}, SLOW_HOST_S, "every honest device to serve v3")

        # ---- 3: a false 'failed' acknowledgement is one device that did not update, not a veto -----------
        attacker.ack_state = "failed"
        with MqttChannel(address, GROUP, CONTROL_PLANE_USER, control_password, keys) as channel:
            wait_for(lambda: all(any(s["device"] == d and s["version"] == "v3" and s["requests"] > 0
                                     for s in channel.telemetry_since(0.0)) for d in HONEST),
                     SLOW_HOST_S, "v3 telemetry from every honest device")
            third = _rollout(channel, bundle_kit.private_key, releases, "v4", "v3", [100]).run()
            assert third.outcome == "completed", third.reason
            assert list(third.stages[-1].failed) == [ATTACKER] and not third.stages[-1].missing, third.stages[-1]
            assert sorted(third.stages[-1].installed) == HONEST
        wait_for(lambda: set(devices.versions().values()) == {"v4"}, SLOW_HOST_S, "every honest device to serve v4")
    finally:
        attacker.close()
    with capsys.disabled():
        print(f"\nhostile device: {FUZZ_CASES} fuzz cases during rollout 1, {sum(expected.values())} dropped by "
              f"reason {dict(sorted(expected.items()))}, {len(accepted)} valid summaries kept as its own, "
              f"{len(attacker.sabotage)} sabotage summaries outvoted; rollout 1 {first.outcome}; after the retained "
              f"poison, rollout 2 {second.outcome} (dropped {second.dropped_messages}); with a false 'failed' "
              f"acknowledgement, rollout 3 {third.outcome}")
