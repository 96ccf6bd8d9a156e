"""``python -m edge.updater``: the device updater, a separate process beside ``edgeloop serve``.

    python -m edge.updater --kit DIR --store DIR [--service-url URL] [--telemetry-interval-s 30]
    python -m edge.updater --broker HOST:PORT --device ID --group G --password-file F \\
        --store DIR --public-keys K [--tls-ca CA]

It holds an MQTT v5 session with the broker under its own identity: with an enrollment kit (``--kit``,
``edgeloop fleet enroll``) or ``--tls-ca --tls-cert --tls-key``, mutual TLS, the device id being the
certificate's common name (the broker takes the login from it, no password); otherwise a login whose
username and client id are the device id, the password from ``--password-file`` or
``EDGELOOP_MQTT_PASSWORD`` (``--tls-ca`` alone: over TLS, the broker verified). The session is a
persistent one (``clean_start`` off, a week's session expiry) so QoS 1 manifests published while the
device was offline still arrive, and reconnects with exponential backoff and full jitter while the
broker is away. Manifests on ``fleet/<group>/model`` are applied one at a time by a worker thread
(:mod:`edge.updater.apply`), outcomes go to ``fleet/<group>/status/<device>``. With ``--service-url``,
summaries of the local service's ``/metrics`` go to ``fleet/<group>/telemetry/<device>`` every
``--telemetry-interval-s`` (:mod:`edge.updater.telemetry`).

The service notices a version the updater activated by itself: it watches the store's ``state.json``
(``--watch-interval-s``) and loads the new active version. Every option is also an ``EDGELOOP_*``
variable; a bad setting is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge.config import settings_parser, settings_with_kit
from edge.errors import EXIT_USER_ERROR, ConfigError, EdgeError
from edge.identity import DeviceId
from edge.retry import backoff_delay
from edge.rollout import ARCH, DEVICE_CLASS, DIGEST_REFERENCE, GROUP, model_topic, telemetry_topic
from edge.schema import setting
from edge.signing import PublicKey, load_public_keys
from edge.store.model_store import ModelStore
from edge.tls import TlsSettings
from edge.updater.apply import RolloutHandler, json_bytes

if TYPE_CHECKING:
    from edge.agent.service import ServiceContainer
from edge.updater.fetch import fetch_bundle
from edge.updater.state import hold_lock
from edge.updater.telemetry import ServiceMetrics, TelemetrySource

log = logging.getLogger(__name__)
PASSWORD_ENV = "EDGELOOP_MQTT_PASSWORD"
CONTAINER_STORE = "/var/lib/edgeloop/models"  # where the packaged image's service reads its store (docker/Dockerfile)
CONTAINER_SAMPLES = "/var/lib/edgeloop/samples"  # ... and keeps its drift samples
# as edgeloop's image tags and a rollout's ``images`` name architectures (tasks/packaging/platforms.py)
MACHINE_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "armv7"}


def store_owner(store: Path) -> str:
    """``uid:gid`` the service container runs as: the store's owner, who writes it (the updater), so the service
    can take the store's lock and roll back. Run the updater as an unprivileged user in the docker group (the
    image's ``edgeloop``, uid 10001, as in compose.edge.yml): as root, the service would run as root too."""
    status = store.stat()
    return f"{status.st_uid}:{status.st_gid}"


def host_arch() -> str:
    """This machine's architecture as edgeloop's images name it (amd64, arm64, armv7)."""
    import platform

    machine = platform.machine().lower()
    return MACHINE_ARCH.get(machine, machine)


def _pinned(image: str) -> str:
    if not DIGEST_REFERENCE.fullmatch(image):
        raise ValueError(f"{image!r} is not pinned by digest: give registry/repository@sha256:<64 hex> (`edgeloop "
                         "package` prints it; MLflow has it as the version's image.<arch> tag)")
    return image


def _port_in_range(broker: str) -> str:
    port = broker.partition(":")[2]
    if port and not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} is not in 1..65535")
    return broker


class UpdaterConfig(TlsSettings):
    broker: str = setting(pattern=r"^[^\s:/]+(:\d{1,5})?$", check=_port_in_range,
                          description="the MQTT broker, HOST[:PORT]")
    device_id: DeviceId = setting(description="this device's id: MQTT username, client id, topic level")
    group: str = setting(pattern=f"^{GROUP.pattern}$", description="the fleet group whose manifests apply")
    password_file: Path | None = setting(None, description=f"file holding the MQTT password (or {PASSWORD_ENV})")
    store: Path = setting(description="the model store folder, the one the edge service serves from")
    public_keys: list[Path] = setting(min_length=1, description="trusted Ed25519 public key files or folders")
    keep_versions: int = setting(3, ge=2, le=20, description="model versions kept in the store")
    service_url: str | None = setting(None, pattern=r"^https?://",
                                      description="the local edge service, for telemetry")
    telemetry_interval_s: float = setting(30.0, ge=1.0, le=86400.0,
                                          description="seconds between telemetry summaries")
    keepalive_s: int = setting(30, ge=5, le=3600, description="MQTT keepalive")
    session_expiry_s: int = setting(7 * 86400, ge=0, description="how long the broker keeps this device's session")
    max_backoff_s: float = setting(60.0, ge=1.0, description="longest wait between reconnect or fetch attempts")
    fetch_timeout_s: float = setting(30.0, gt=0.0, description="timeout of each bundle download request")
    fetch_attempts: int = setting(4, ge=1, le=20, description="bundle download attempts before the rollout fails")
    max_bundle_mb: float = setting(256.0, gt=0.0, description="largest bundle accepted")
    log_level: str = setting("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="log level")
    device_class: str | None = setting(None, pattern=f"^{DEVICE_CLASS.pattern}$", max_length=64,
                                       description="this device's class (its devices.yaml name): a per-class "
                                       "release installs that class's variant")
    runtimes: list[Literal["tflite", "onnx"]] | None = setting(None, description="the runtimes this device serves "
                                                               "(default: those installed here; a container device: "
                                                               "not checked, its image carries them)")
    # A container device (the packaged image): the updater runs the service container and applies the image part
    # of manifests (edge.agent.service); the store is bind-mounted into it, the service running as its owner.
    engine: str | None = setting(None, pattern=r"^unix:///", description="container device: the local Docker "
                                 "engine's socket (unix:///var/run/docker.sock)")
    service_image: str | None = setting(None, check=_pinned, description="container device: the image served until "
                                        "a rollout names another, pinned by digest")
    service_listen: str = setting("0.0.0.0:8080", pattern=r"^[^\s:]+:\d{1,5}$", description="container device: "
                                  "HOST:PORT the service is reached on (the agent's front)")
    arch: str = setting(default_factory=host_arch, pattern=f"^{ARCH.pattern}$",
                        description="container device: the architecture whose image it runs (amd64, arm64, arm)")
    samples_dir: Path | None = setting(None, description="container device: the host folder of the service's drift "
                                       "samples (default: 'samples' beside the store)")
    container_memory_mb: int = setting(256, ge=64, le=65536,
                                       description="container device: the service's memory limit")
    container_cpus: float = setting(1.0, gt=0.0, le=256.0, description="container device: the service's CPU limit")
    ready_timeout_s: float = setting(120.0, gt=0.0,
                                     description="container device: a new container's time to /readyz")

    def problems(self) -> Iterator[str]:
        yield from super().problems()
        if self.engine and not self.service_image:
            yield "--engine needs --service-image: the image (pinned by digest) served until a rollout names another"

    def served_runtimes(self) -> tuple[str, ...] | None:
        """What a per-class manifest's runtime is checked against (None: a container device, not checked)."""
        if self.engine is not None:
            return None
        from edge.runtime import installed_runtimes

        return tuple(self.runtimes) if self.runtimes is not None else installed_runtimes()

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.broker.partition(":")
        return host, int(port) if port else (8883 if self.tls_ca else 1883)

    def password(self) -> str | None:
        """The broker password; None when the client certificate is the login."""
        if self.tls_cert is not None:
            return None
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as error:
                raise ConfigError(f"--password-file {self.password_file}: {error}") from error
        if os.environ.get(PASSWORD_ENV):
            return os.environ[PASSWORD_ENV]
        raise ConfigError(f"no MQTT password: give --password-file (or {PASSWORD_ENV})")


FLAGS = {"device_id": ("--device", "--device-id")}  # the rest: --<name-with-dashes>


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> UpdaterConfig:
    """Settings from flags, then ``EDGELOOP_*`` variables (``EDGELOOP_PUBLIC_KEYS`` ':'-separated)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="edge.updater", description="edgeloop device updater (fleet rollouts)")
    settings_parser(UpdaterConfig, parser, FLAGS)
    return settings_with_kit(UpdaterConfig, vars(parser.parse_args(argv)), environ, "updater",
                             {name: names[0] for name, names in FLAGS.items()})


class Updater:
    """The MQTT session, the manifest worker and the telemetry loop of one device."""

    def __init__(self, config: UpdaterConfig, store: ModelStore, keys: dict[str, PublicKey],
                 password: str | None, telemetry: TelemetrySource | None = None,
                 service: ServiceContainer | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.config, self.telemetry = config, telemetry
        self._store_lock = hold_lock(store.root)  # before the state is read: one updater per store
        self.service = service
        self.handler = RolloutHandler(config.device_id, config.group, store, keys, self.publish, self._fetch,
                                      service=service, arch=config.arch, device_class=config.device_class,
                                      runtimes=config.served_runtimes())
        self.stopping = self.handler.stopping
        self._messages: queue.Queue[bytes] = queue.Queue(maxsize=64)
        self._rng = random.Random()
        self._failures = 0
        self._threads: list[threading.Thread] = []
        self.client = client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.device_id,
                                           protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        if password is not None:
            client.username_pw_set(config.device_id, password)
        self.tls = config.client_tls()
        if self.tls is not None:
            client.tls_set_context(self.tls.context())  # TLS 1.2+, broker verified and its host name checked
        client.on_connect, client.on_disconnect, client.on_message = self._connected, self._lost, self._received
        self._connect_properties = Properties(PacketTypes.CONNECT)
        self._connect_properties.SessionExpiryInterval = config.session_expiry_s
        self._subscribe_options = mqtt.SubscribeOptions(qos=1)

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        """QoS 1; while disconnected paho keeps the message and sends it after the reconnect."""
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _fetch(self, url: str, destination: Path, max_bytes: int) -> str:
        return fetch_bundle(url, destination, max_bytes, self.config.fetch_timeout_s, self.config.fetch_attempts,
                            max_backoff_s=self.config.max_backoff_s, sleep=self.stopping.wait, tls=self.tls)

    def start(self) -> None:
        if self.service is not None:  # the service container serves, then the front listens, before any rollout
            running = self.service.start(self.config.service_image or "")
            self.service.proxy.start()
            log.info("service container %s (%s) behind %s", running.name, running.image, self.config.service_listen)
        for target, name in ((self._network, "mqtt"), (self._work, "rollouts"), (self._report_telemetry, "telemetry")):
            if name != "telemetry" or self.telemetry is not None:
                thread = threading.Thread(target=target, name=f"updater-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stopping.set()
        self.client.disconnect()
        for thread in self._threads:
            thread.join(timeout_s)
        if self.service is not None:  # the container runs on: a restarted updater takes it over
            self.service.proxy.stop()
            self.service.engine.close()

    # ---- the MQTT session (network thread) ---------------------------------------------------------

    def _network(self) -> None:
        """Connect, run the session until it drops, wait a jittered backoff, again, until stopped."""
        host, port = self.config.host_port
        while not self.stopping.is_set():
            try:
                self.client.connect(host, port, keepalive=self.config.keepalive_s, clean_start=False,
                                    properties=self._connect_properties)
                self.client.loop_forever()
            except (OSError, ValueError) as error:  # refused, unreachable, TLS failure
                if not self._failures:
                    log.warning("broker %s:%d unreachable (%s); retrying with backoff", host, port, error)
            if self.stopping.is_set():
                break
            self._failures += 1
            self.stopping.wait(backoff_delay(self._failures, 1.0, self.config.max_backoff_s, self._rng))

    def _connected(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s (check this device's credentials)", reason_code)
            return
        log.info("connected to the broker (session %s)", "resumed" if flags.session_present else "new")
        self._failures = 0
        client.subscribe(model_topic(self.config.group), options=self._subscribe_options)  # retained copy arrives
        if (status := self.handler.last_status()) is not None:  # in case the last one was lost with the process
            self.publish(self.handler.topic, json_bytes(status), True)

    def _lost(self, client, userdata, flags, reason_code, properties) -> None:
        if not self.stopping.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _received(self, client, userdata, message) -> None:
        try:
            self._messages.put_nowait(message.payload)
        except queue.Full:  # a flood: the retained manifest arrives again on the next subscribe
            log.warning("manifest queue full; dropped a message on %s", message.topic)

    # ---- the worker threads ------------------------------------------------------------------------

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                payload = self._messages.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.handler.handle(payload)
            except Exception:  # a bug or a full disk must not end the updater; the next message may succeed
                log.exception("handling a rollout message failed")

    def _report_telemetry(self) -> None:
        topic = telemetry_topic(self.config.group, self.config.device_id)
        self._read_telemetry()  # the baseline
        while not self.stopping.wait(self.config.telemetry_interval_s):
            if not self.client.is_connected():
                continue  # not read: the next summary covers the outage, nothing queues up in memory
            figures = self._read_telemetry()
            if figures is not None:
                version = figures.pop("version", None) or self.handler.active_version()
                self.publish(topic, json_bytes({"device": self.config.device_id, "version": version, **figures,
                                                "at": time.time()}), False)

    def _read_telemetry(self) -> dict[str, Any] | None:
        assert self.telemetry is not None
        try:
            return self.telemetry()
        except Exception:  # a pluggable source: its bug must not end the reports
            log.exception("telemetry source failed")
            return None


def build(config: UpdaterConfig) -> Updater:
    """The updater for ``config``, its store opened and its state loaded; :class:`EdgeError` when unusable."""
    keys = load_public_keys(config.public_keys)
    password = config.password()
    store = ModelStore(config.store, keys, config.keep_versions, int(config.max_bundle_mb * 2**20))
    telemetry = ServiceMetrics(config.service_url) if config.service_url else None
    return Updater(config, store, keys, password, telemetry, service_container(config, store))


def service_container(config: UpdaterConfig, store: ModelStore) -> ServiceContainer | None:
    """A container device's service container and front (None for a device that runs the service itself)."""
    if config.engine is None:
        return None
    from edge.agent.engine import ContainerSpec, Engine
    from edge.agent.proxy import SwitchableProxy
    from edge.agent.service import ServiceContainer

    samples = config.samples_dir or config.store.resolve().parent / "samples"
    try:
        samples.mkdir(parents=True, exist_ok=True)
        owner = config.store.stat()
        if os.geteuid() == 0:  # the service runs as the store's owner: its samples are that user's too
            os.chown(samples, owner.st_uid, owner.st_gid)
    except OSError as error:
        raise ConfigError(f"samples folder {samples}: {error}") from error
    host, _, port = config.service_listen.rpartition(":")
    template = ContainerSpec("", f"edgeloop-{config.device_id}", env={"EDGELOOP_DEVICE_ID": config.device_id},
                             binds=[f"{config.store.resolve()}:{CONTAINER_STORE}",
                                    f"{samples.resolve()}:{CONTAINER_SAMPLES}"], user=store_owner(config.store),
                             memory_mb=config.container_memory_mb, cpus=config.container_cpus)
    return ServiceContainer(Engine(config.engine), SwitchableProxy(host, int(port), 0), template, store,
                            config.store / "service-container.json", ready_timeout_s=config.ready_timeout_s)


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per /metrics read
        updater = build(config)
    except EdgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    try:
        updater.start()  # a container device first starts its service (pull, /readyz) and its front
    except EdgeError as error:  # the image cannot be pulled or run, the front's port is taken, ...
        print(f"error: the service could not start: {error}", file=sys.stderr)
        updater.stop()
        return 1
    log.info("updater for %s in group %s on %s", config.device_id, config.group, config.broker)
    while not stop.is_set():  # woken each second so the signal handlers run promptly
        stop.wait(1.0)
    updater.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
