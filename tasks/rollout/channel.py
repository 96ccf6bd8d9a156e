"""The control plane's MQTT channel to one device group (paho-mqtt, MQTT v5, QoS 1).

It publishes rollout manifests retained on ``fleet/<group>/model`` and keeps, per device, the latest
status and recent telemetry summaries it received on ``fleet/<group>/status/+`` and
``fleet/<group>/telemetry/+``. The sequence of the next manifest continues from the retained one
(read back on connect), so sequences keep increasing across control-plane restarts.

A broker that goes away pauses the rollout: paho reconnects with backoff, a manifest waits for its
PUBACK (``publish_timeout_s``; published again after each reconnect), and statuses and telemetry resume
arriving on reconnect (a persistent session keeps the control plane's subscriptions and queued QoS 1
messages). With ``tls`` it connects over TLS (1.2+, the broker verified against the fleet CA); with
the control plane's client certificate (``rollout.broker_tls``) that certificate is its login.

Every status and summary is untrusted input (:mod:`tasks.rollout.messages`): a message that is too large,
not JSON, off its schema or about another device is dropped and counted per device and reason
(:meth:`MqttChannel.dropped_messages`), and nothing a device publishes, retained or not, can raise out
of paho's callbacks: an unexpected error is logged and counted too, and the network thread keeps serving
the other devices.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import threading
import time
from collections import defaultdict, deque
from typing import Any

from edge.errors import BundleRefused
from edge.rollout import model_topic, verify_rollout
from edge.tls import ClientTls
from tasks.errors import ServiceUnavailable
from tasks.rollout.messages import DropCounts, MessageRefused, parse_device_message

log = logging.getLogger(__name__)
KEEP_SUMMARIES = 20       # telemetry summaries kept per device: 10 min at the updater's default 30 s
SESSION_EXPIRY_S = 7 * 86400
RETAINED_WAIT_S = 2.0     # after SUBACK, how long the retained manifest may take to arrive


class MqttChannel:
    """Connected on construction; use as a context manager (or call :meth:`close`)."""

    def __init__(self, broker: str, group: str, username: str, password: str | None, public_keys: dict,
                 client_id: str = "edgeloop-control-plane", tls: ClientTls | None = None,
                 connect_timeout_s: float = 30.0, publish_timeout_s: float = 300.0) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.group, self.public_keys, self.publish_timeout_s = group, public_keys, publish_timeout_s
        self._lock = threading.Lock()
        self._statuses: dict[str, dict[str, Any]] = {}
        self._telemetry: dict[str, deque] = defaultdict(lambda: deque(maxlen=KEEP_SUMMARIES))
        self._retained_sequence = 0
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self.messages = 0
        self.drops = DropCounts()
        host, _, port = broker.rpartition(":")
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if password is not None:  # with a client certificate (tls.mutual) the certificate is the login
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set_context(tls.context())
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(0)
        client.suppress_exceptions = True  # a second line behind _on_message's own: paho goes on
        client.on_connect, client.on_message = self._on_connect, self._on_message
        client.on_subscribe, client.on_disconnect = self._on_subscribe, self._on_disconnect
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client = client
        try:
            client.connect(host, int(port), keepalive=30, clean_start=False, properties=properties)
        except ssl.SSLError as error:
            raise ServiceUnavailable(f"MQTT broker {broker} refused the TLS handshake ({error}): check that its "
                                     "certificate names that host and that the control plane's certificate is from "
                                     "the fleet CA (rollout.fleet_ca_dir)") from None
        except OSError as error:
            raise ServiceUnavailable(f"MQTT broker {broker} is unreachable ({error}); start it (Mosquitto) or set "
                                     "rollout.broker / EDGELOOP_BROKER") from None
        client.loop_start()
        if not self._connected.wait(connect_timeout_s):
            self.close()
            raise ServiceUnavailable(f"MQTT broker {broker} did not accept the control plane's login within "
                                     f"{connect_timeout_s:g} s (wrong credentials in rollout.credentials_dir?)")
        self._subscribed.wait(connect_timeout_s)
        time.sleep(RETAINED_WAIT_S)

    # ---- paho callbacks (network thread) --------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker refused the control plane: %s", reason_code)
            return
        self._connected.set()
        prefix = f"fleet/{self.group}"
        client.subscribe([(model_topic(self.group), 1), (f"{prefix}/status/+", 1), (f"{prefix}/telemetry/+", 1)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if reason_code != 0:
            log.warning("MQTT broker connection lost (%s): the rollout pauses until it is back", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        """Store one device message or drop it; never raises (paho would end its network thread)."""
        topic = "?"
        try:
            self.messages += 1
            topic = message.topic  # paho decodes it as UTF-8 (the broker checks that too)
            self._receive(topic, message.payload)
        except Exception as error:  # a bug here must not cost the rollout its channel
            with contextlib.suppress(Exception):  # nor may the reporting of it
                log.exception("handling a message on %s failed", topic[:200])
                parts = topic.split("/")
                self.drops.add(parts[3] if len(parts) == 4 else "", "error", f"{type(error).__name__}: {error}",
                               topic)

    def _receive(self, topic: str, payload: bytes) -> None:
        if topic == model_topic(self.group):
            self._note_manifest(payload)
            return
        parts = topic.split("/")
        if len(parts) != 4 or parts[:2] != ["fleet", self.group] or parts[2] not in ("status", "telemetry"):
            log.warning("ignored a message on unexpected topic %s", topic[:200])
            return
        kind, device = parts[2], parts[3]
        try:
            record = parse_device_message(kind, device, payload)
        except MessageRefused as refused:
            self.drops.add(device, refused.reason, str(refused), topic)
            return
        with self._lock:
            if kind == "status":
                self._statuses[device] = record
            else:
                self._telemetry[device].append({**record, "received_at": time.time()})

    def _note_manifest(self, payload: bytes) -> None:
        try:
            manifest = verify_rollout(payload, self.public_keys)
        except (BundleRefused, ValueError, RecursionError) as error:
            log.error("the retained manifest on %s does not verify (%s): was it published by someone else?",
                      model_topic(self.group), error)
            return
        with self._lock:
            self._retained_sequence = max(self._retained_sequence, manifest.sequence)

    # ---- the Channel interface (tasks.rollout.engine) -------------------------------------------------

    def current_sequence(self) -> int:
        with self._lock:
            return self._retained_sequence

    def publish_manifest(self, payload: bytes) -> None:
        """Publish retained, QoS 1, and return once the broker acknowledged it; while the broker is away, wait
        for the reconnect and publish again (devices ignore a sequence they have seen, so a repeat is harmless)."""
        deadline = time.monotonic() + self.publish_timeout_s
        while not self._published_once(payload, deadline):
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(f"the broker did not acknowledge the manifest within "
                                         f"{self.publish_timeout_s:g} s; the rollout stopped before this stage")
        sequence = json.loads(json.loads(payload)["manifest"])["sequence"]  # our own, just signed
        with self._lock:
            self._retained_sequence = max(self._retained_sequence, sequence)

    def _published_once(self, payload: bytes, deadline: float) -> bool:
        if not self._connected.wait(max(0.0, min(deadline - time.monotonic(), 5.0))):
            return False
        info = self.client.publish(model_topic(self.group), payload, qos=1, retain=True)
        try:
            info.wait_for_publish(timeout=max(0.1, min(deadline - time.monotonic(), 10.0)))
            return info.is_published()
        except (RuntimeError, ValueError):  # the connection went (paho's own copy is resent on reconnect too)
            time.sleep(0.5)
            return False

    def statuses(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._statuses)

    def telemetry_since(self, since: float) -> list[dict[str, Any]]:
        with self._lock:
            return [summary for summaries in self._telemetry.values() for summary in summaries
                    if summary["received_at"] >= since]

    def dropped_messages(self) -> dict[str, dict[str, int]]:
        """Device -> reason -> messages dropped since this channel connected."""
        return self.drops.as_dict()

    def network_alive(self) -> bool:
        """Whether paho's network thread still runs (it would end on an exception out of a callback)."""
        thread = getattr(self.client, "_thread", None)  # paho keeps no public handle on it
        return thread is not None and thread.is_alive()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> MqttChannel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
