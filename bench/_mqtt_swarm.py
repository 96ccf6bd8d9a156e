"""Light simulated devices for ``bench/rollout.py``: thousands of MQTT 3.1.1 clients per process on asyncio.

paho's threaded loop tops out at a few hundred clients per process (select()), so this is a minimal
client over asyncio streams: CONNECT with the device's user name and password (or, with ``tls``, over
mutual TLS with the device's own certificate from the fleet CA: no password, the broker takes the login
from the certificate), SUBSCRIBE QoS 1 to the group's model topic, PUBLISH QoS 1 both ways with PUBACK,
PINGREQ as keepalive.

Each device does what ``edge.updater.apply.RolloutHandler`` does with a manifest, minus the download and
the model store: it verifies the signature itself (:func:`edge.rollout.verify_rollout`, once per device:
no result is shared between devices, so the fleet's verification cost is real), checks the group,
applies :func:`edge.rollout.judge` with its own last sequence and active version, waits a uniform jitter
in ``[0, manifest.jitter_s]`` when it applies, then publishes the status record a device publishes
(retained, QoS 1, on ``fleet/<group>/status/<device>``) and waits for the broker's PUBACK. Manifests
are handled one at a time per device, in arrival order, as the updater's worker thread does.

Reporters (a share of the devices) publish a telemetry summary every interval with the figures of
their active version, as the updater does: healthy figures, except on ``bad_version`` (mean confidence
0.40), which is what makes the control plane's health watch roll a release back.

:func:`run_worker` is a worker process's entry point; the parent drives it over a pipe: the worker
sends ``{"connected_s", "failures"}`` once every device is subscribed, then answers ``"counts"`` with
:meth:`Swarm.snapshot` and ``"stop"`` with a last snapshot before it disconnects and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import BundleRefused
from edge.rollout import RolloutManifest, judge, model_topic, status_topic, telemetry_topic, verify_rollout
from edge.signing import load_public_keys
from edge.tls import ClientTls
from edge.updater.apply import json_bytes

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 8, 9, 12, 13, 14
KEEPALIVE_S = 60
CONNECT_TIMEOUT_S = 60.0
HEALTHY = {"requests": 50, "errors": 0, "error_rate": 0.0, "p50_ms": 4.0, "p95_ms": 9.0, "mean_confidence": 0.95}
UNHEALTHY = {**HEALTHY, "mean_confidence": 0.40}


@dataclass(frozen=True)
class SwarmConfig:
    """What one worker process simulates."""

    port: int
    group: str
    devices: list[tuple[str, str]]          # (device id, broker password; unused with tls)
    public_keys: str                        # a .pub file or folder, as devices are configured
    initial_version: str                    # every device's active version at the start
    bad_version: str | None = None          # reporters running it report low confidence
    reporters: frozenset[str] = field(default_factory=frozenset)
    telemetry_interval_s: float = 0.5
    connect_concurrency: int = 50           # connections in progress at once (the broker's backlog is 100)
    seed: int = 0
    tls: tuple[str, str] | None = None      # (fleet CA file, folder of <device>.crt/.key): mutual TLS


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = value >> 7, value & 0x7F
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packet(first: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return bytes([first]) + _varint(len(body)) + body


def _text(value: str) -> bytes:
    raw = value.encode()
    return len(raw).to_bytes(2, "big") + raw


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    return header, (await reader.readexactly(length)) if length else b""


class LightDevice:
    """One simulated device: its own connection, last applied sequence and active version."""

    def __init__(self, swarm: Swarm, device: str, password: str) -> None:
        self.swarm, self.device, self.password = swarm, device, password
        self.last_sequence, self.active = 0, swarm.config.initial_version
        self.writer: asyncio.StreamWriter | None = None
        self.acks: dict[int, asyncio.Future[bytes]] = {}
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.packet_id = 0

    async def connect(self) -> None:
        tls = self.swarm.tls_context(self.device)
        reader, self.writer = await asyncio.open_connection("127.0.0.1", self.swarm.config.port, ssl=tls,
                                                            server_hostname="127.0.0.1" if tls else None)
        if tls is None:  # user name, password, clean session
            login = bytes([4, 0x80 | 0x40 | 0x02]), _text(self.device), _text(self.device), _text(self.password)
        else:  # clean session; the certificate is the login
            login = bytes([4, 0x02]), _text(self.device)
        self.writer.write(_packet(CONNECT << 4, _text("MQTT"), login[0], KEEPALIVE_S.to_bytes(2, "big"), *login[1:]))
        header, body = await _read_packet(reader)
        if header >> 4 != CONNACK or len(body) < 2 or body[1] != 0:
            raise ConnectionError(f"CONNACK {body.hex()}")
        self.tasks = [asyncio.create_task(self._read(reader)), asyncio.create_task(self._work())]
        topic = _text(model_topic(self.swarm.config.group))
        granted = await self._send(lambda pid: _packet(SUBSCRIBE << 4 | 2, pid, topic, b"\x01"))
        if not granted or granted[0] & 0x80:
            raise ConnectionError(f"SUBACK {granted.hex()}")

    def _next_id(self) -> bytes:
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id.to_bytes(2, "big")

    async def _send(self, make: Callable[[bytes], bytes]) -> bytes:
        """Write a packet that carries a packet id and wait for its acknowledgement's body."""
        assert self.writer is not None
        pid = self._next_id()
        future = asyncio.get_running_loop().create_future()
        self.acks[int.from_bytes(pid, "big")] = future
        self.writer.write(make(pid))
        return await future

    async def publish(self, topic: str, payload: bytes, retain: bool, wait: bool = True) -> None:
        """PUBLISH QoS 1; ``wait`` for the broker's PUBACK (statuses do, telemetry does not)."""
        first = PUBLISH << 4 | 0x02 | int(retain)
        self.swarm.counts["published"] += 1
        if wait:
            await self._send(lambda pid: _packet(first, _text(topic), pid, payload))
        elif self.writer is not None:
            self.writer.write(_packet(first, _text(topic), self._next_id(), payload))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header, body = await _read_packet(reader)
                kind = header >> 4
                if kind == PUBLISH:
                    offset = 2 + int.from_bytes(body[:2], "big")
                    if (header >> 1) & 3:
                        assert self.writer is not None
                        self.writer.write(bytes([PUBACK << 4, 2]) + body[offset:offset + 2])
                        offset += 2
                    self.swarm.counts["received"] += 1
                    self.inbox.put_nowait(body[offset:])
                elif kind in (PUBACK, SUBACK):
                    future = self.acks.pop(int.from_bytes(body[:2], "big"), None)
                    if future is not None and not future.done():
                        future.set_result(body[2:])
        except (asyncio.IncompleteReadError, ConnectionError):
            self.swarm.counts["disconnected"] += 1
            for future in self.acks.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"{self.device} lost its connection"))

    async def _work(self) -> None:
        while True:
            await self.handle(await self.inbox.get())

    async def handle(self, payload: bytes) -> None:
        """What the updater does with one model message (verify, judge, jitter, report), minus the install."""
        started = time.perf_counter()
        try:
            manifest: RolloutManifest | None = verify_rollout(payload, self.swarm.keys)
        except BundleRefused as error:
            manifest, refusal = None, error.reason
        self.swarm.counts["verified"] += 1
        self.swarm.counts["verify_s"] += time.perf_counter() - started
        if manifest is None:
            self.swarm.counts["refused"] += 1
            return await self._report(None, "refused", refusal)
        if manifest.group != self.swarm.config.group:
            return await self._report(manifest, "refused", "wrong_group")
        verdict, _ = judge(manifest, self.device, self.last_sequence, self.active)
        if verdict in ("stale", "not_in_cohort"):
            return None
        if verdict == "already_active":
            return await self._report(manifest, "installed", "already_active")
        if verdict == "downgrade":
            return await self._report(manifest, "refused", "downgrade")
        await asyncio.sleep(self.swarm.rng.uniform(0.0, manifest.jitter_s))  # spread the fleet's fetches
        self.active = manifest.version
        return await self._report(manifest, "installed", "")

    async def _report(self, manifest: RolloutManifest | None, state: str, reason: str) -> None:
        if manifest is not None:
            self.last_sequence = manifest.sequence
        status = {"device": self.device, "group": self.swarm.config.group,
                  "rollout_id": manifest.rollout_id if manifest else None,
                  "sequence": manifest.sequence if manifest else None, "state": state, "version": self.active,
                  "target": manifest.version if manifest else None, "reason": reason, "at": time.time()}
        await self.publish(status_topic(self.swarm.config.group, self.device), json_bytes(status), True)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.writer is not None:
            self.writer.write(bytes([DISCONNECT << 4, 0]))
            self.writer.close()


class Swarm:
    """The devices of one worker process, their shared keys and counters."""

    def __init__(self, config: SwarmConfig) -> None:
        self.config = config
        self.keys = load_public_keys([Path(config.public_keys)])
        self.rng = random.Random(config.seed)
        self.counts: Counter = Counter(published=0, received=0, verified=0, verify_s=0.0, refused=0,
                                       disconnected=0)
        self.devices = [LightDevice(self, device, password) for device, password in config.devices]

    def tls_context(self, device: str) -> ssl.SSLContext | None:
        """The device's own client context (TLS 1.2+, the broker verified), or None without TLS."""
        if self.config.tls is None:
            return None
        ca, folder = self.config.tls
        return ClientTls(Path(ca), Path(folder) / f"{device}.crt", Path(folder) / f"{device}.key").context()

    async def connect_all(self) -> list[str]:
        """Connect and subscribe every device, a few at a time; the failures, by device."""
        gate = asyncio.Semaphore(self.config.connect_concurrency)

        async def one(device: LightDevice) -> str | None:
            async with gate:
                try:
                    await asyncio.wait_for(device.connect(), CONNECT_TIMEOUT_S)
                    return None
                except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError) as error:
                    return f"{device.device}: {error!r}"

        return [failure for failure in await asyncio.gather(*map(one, self.devices)) if failure]

    async def report_telemetry(self) -> None:
        reporters = [device for device in self.devices if device.device in self.config.reporters]
        while True:
            await asyncio.sleep(self.config.telemetry_interval_s)
            for device in reporters:
                figures = UNHEALTHY if device.active == self.config.bad_version else HEALTHY
                summary = {"device": device.device, "version": device.active, "window_s":
                           self.config.telemetry_interval_s, **figures, "at": time.time()}
                await device.publish(telemetry_topic(self.config.group, device.device), json_bytes(summary),
                                     False, wait=False)

    async def keep_alive(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S / 2)
            for device in self.devices:
                if device.writer is not None and not device.writer.is_closing():
                    device.writer.write(bytes([PINGREQ << 4, 0]))

    def snapshot(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {**self.counts, "cpu_s": usage.ru_utime + usage.ru_stime,
                "versions": dict(Counter(device.active for device in self.devices)),
                "sequences": dict(Counter(device.last_sequence for device in self.devices))}


async def _serve(conn: Any, config: SwarmConfig) -> None:
    swarm = Swarm(config)
    started = time.perf_counter()
    failures = await swarm.connect_all()
    conn.send({"connected_s": time.perf_counter() - started, "failures": failures[:5], "failed": len(failures)})
    commands: asyncio.Queue[str] = asyncio.Queue()

    def receive() -> None:
        try:
            commands.put_nowait(conn.recv())
        except (EOFError, OSError):  # the parent went away
            asyncio.get_running_loop().remove_reader(conn.fileno())
            commands.put_nowait("stop")

    asyncio.get_running_loop().add_reader(conn.fileno(), receive)
    background = [asyncio.create_task(swarm.report_telemetry()), asyncio.create_task(swarm.keep_alive())]
    while await commands.get() != "stop":  # "counts"
        conn.send(swarm.snapshot())
    for task in background:
        task.cancel()
    last = swarm.snapshot()
    for device in swarm.devices:
        await device.close()
    with contextlib.suppress(OSError):  # the bench process already went away: nobody to report to
        conn.send(last)


def run_worker(conn: Any, config: SwarmConfig) -> None:
    """A worker process: lift the open-files limit (one socket per device), then serve until told to stop."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_serve(conn, config))
