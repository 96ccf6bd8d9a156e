"""An MQTT v5 test client (paho-mqtt) that records what it received and the broker's answers, shared by the
broker-security tests on password logins and on mutual TLS."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable

TIMEOUT_S = 10.0


class Peer:
    """One MQTT v5 client on its own network thread, with what it received and the broker's answers."""

    def __init__(self, port: int, user: str | None, password: str | None, client_id: str = "",
                 clean_start: bool = True, session_expiry_s: int = 0, tls: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1") -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._changed = threading.Condition()
        self.connack = None
        self.session_present = False
        self.messages: list = []
        self.disconnects: list = []  # reason codes of every disconnection the client did not ask for
        self._acks: dict[int, object] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"peer-{user}",
                                  protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls is not None:  # with a client certificate the broker takes the login from it
            self.client.tls_set_context(tls)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda _c, _u, _flags, code, _p: self._record(self.disconnects, None, code)
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = lambda _c, _u, mid, codes, _p: self._record(self._acks, mid, codes)
        self.client.on_message = lambda _c, _u, message: self._record(self.messages, None, message)
        properties = None
        if session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry_s
        self.client.connect(host, port, clean_start=clean_start, properties=properties)
        self.client.loop_start()
        self.wait(lambda: self.connack is not None or bool(self.disconnects), "CONNACK")

    def _on_connect(self, _client, _userdata, flags, reason_code, _properties) -> None:
        with self._changed:
            self.connack, self.session_present = reason_code, flags.session_present
            self._changed.notify_all()

    def _on_ack(self, _client, _userdata, mid, reason_code, _properties) -> None:
        self._record(self._acks, mid, reason_code)

    def _record(self, into, key, value) -> None:
        with self._changed:
            if key is None:
                into.append(value)
            else:
                into[key] = value
            self._changed.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, timeout=TIMEOUT_S), f"no {what} within {TIMEOUT_S} s"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK reason code (0: accepted)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self.wait(lambda: info.mid in self._acks, f"PUBACK for {topic}")
        return self._acks.pop(info.mid).value

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1; the SUBACK reason code (1: granted QoS 1, >= 128: refused)."""
        _, mid = self.client.subscribe(topic, qos=1)
        self.wait(lambda: mid in self._acks, f"SUBACK for {topic}")
        return self._acks.pop(mid)[0].value

    def received(self, topic: str, payload: bytes, since: int = 0, retained: bool = False):
        """Wait for ``payload`` on ``topic`` (among the messages from index ``since`` on; ``retained``: a copy the
        broker sent as retained, not a late live copy through an overlapping subscription); the message."""
        def found():
            return next((m for m in self.messages[since:] if m.topic == topic and m.payload == payload
                         and (m.retain or not retained)), None)

        self.wait(lambda: found() is not None, f"{payload!r} on {topic}")
        return found()

    def topics(self) -> set[str]:
        with self._changed:
            return {message.topic for message in self.messages}

    def close(self) -> None:
        self.client.on_disconnect = None  # asked for: not one to record
        self.client.disconnect()
        self.client.loop_stop()


