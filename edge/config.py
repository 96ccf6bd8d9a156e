"""The edge service's settings: one typed model; every field is a flag and an environment variable.

``--sample-rate 0.05`` or ``EDGELOOP_SAMPLE_RATE=0.05``; a flag wins over the environment, which
wins over the default. List settings (``public_keys``) take several flag values, or one variable
with paths separated by ``:``. Secrets (``admin_token``, ``upload_token``) are best given as
``*_file`` paths or environment variables so they stay out of ``ps``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from edge.errors import ConfigError
from edge.identity import DeviceId
from edge.schema import Record, SchemaError, setting
from edge.serving.thermal import DEFAULT_SENSOR
from edge.tls import TlsSettings, require_https

ENV_PREFIX = "EDGELOOP_"
RecordT = TypeVar("RecordT", bound=Record)
DATA_ROOT = Path("/var/lib/edgeloop")


class ServeConfig(TlsSettings):
    host: str = setting("127.0.0.1", description="address to listen on (0.0.0.0 for every interface)")
    port: int = setting(8080, ge=1, le=65535, description="port to listen on")
    store: Path = setting(DATA_ROOT / "models", description="model store folder (signed versions, state.json)")
    public_keys: list[Path] = setting(default_factory=list, min_length=1,
                                      description="trusted Ed25519 public key files or folders")
    keep_versions: int = setting(3, ge=2, le=20, description="model versions kept in the store")
    admin_token: str | None = setting(None, description="bearer token for /v1/model/{reload,rollback,install}")
    admin_token_file: Path | None = setting(None, description="file holding the admin token")
    device_id: DeviceId = setting(os.uname().nodename,
                                  description="this device's id (sample files and uploads carry it)")
    num_threads: int | None = setting(None, ge=1, le=64, description="inference threads (default: the runtime's)")
    max_request_bytes: int = setting(1 << 20, ge=1024, description="largest accepted request body")
    max_batch: int = setting(256, ge=1, description="most samples in one request")
    max_bundle_mb: float = setting(256.0, gt=0.0, description="largest bundle an install accepts (unpacked)")
    cascade_threshold: float | None = setting(None, gt=0.0, le=1.0, description=(
        "confidence under which the version's large model answers (needs one in the bundle); unset: off"))
    shadow_version: str | None = setting(None, description="installed version to run in the shadow of the active one")
    shadow_fraction: float = setting(0.1, ge=0.0, le=1.0, description="share of requests mirrored to the shadow")
    samples_dir: Path = setting(DATA_ROOT / "samples", description="sample store folder")
    sample_rate: float = setting(0.02, ge=0.0, le=1.0, description="share of predictions kept for drift analysis")
    confidence_floor: float = setting(0.85, ge=0.0, le=1.0, description="predictions under this are always kept")
    sample_budget_mb: float = setting(50.0, gt=0.0, description="disk budget of the sample store")
    sample_file_records: int = setting(256, ge=1, description="records per sample file before it is closed")
    sample_file_age_s: float = setting(300.0, gt=0.0, description="seconds before an open sample file is closed")
    store_raw: bool = setting(False, description="keep raw inputs too (off: derived features only)")
    upload_to: str | None = setting(None, description=(
        "where closed sample files go: a folder (a mount or a sync agent's inbox: outside the sample budget, "
        "whatever collects them must remove them) or the http(s) ingest URL; unset: they stay in the sample "
        "store, within its budget, for a collector to fetch"))
    upload_token: str | None = setting(None, description="this device's ingest token (HTTP uploads)")
    upload_token_file: Path | None = setting(None, description="file holding the ingest token")
    thermal_sensor: Path = setting(DEFAULT_SENSOR, description="sysfs temperature file (millidegrees C)")
    thermal_limit_c: float = setting(85.0, ge=40.0, le=125.0, description="the device's throttle temperature")
    thermal_soft_margin_c: float = setting(10.0, ge=0.0, description="soft limit = limit - this")
    thermal_hard_margin_c: float = setting(2.0, ge=0.0, description="hard limit = limit - this")
    watch_interval_s: float = setting(2.0, gt=0.0, description="how often state.json is checked for a new version")
    log_level: str = setting("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="log level")

    def problems(self) -> Iterator[str]:
        yield from super().problems()
        if self.thermal_hard_margin_c > self.thermal_soft_margin_c:
            yield "thermal_hard_margin_c must not exceed thermal_soft_margin_c (hard is hotter)"
        if self.tls_ca is not None and self.upload_to and "://" in self.upload_to:
            try:
                require_https(self.upload_to, "upload_to")
            except ConfigError as error:
                yield str(error)

    def secret(self, name: str) -> str | None:
        """``admin_token`` / ``upload_token``, from the value or its ``*_file``."""
        value, path = getattr(self, name), getattr(self, f"{name}_file")
        if value is None and path is not None:
            try:
                value = path.read_text().strip()
            except OSError as error:
                raise ConfigError(f"{name}_file {path}: {error}") from error
        return value or None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


LIST_SETTINGS = ("public_keys", "runtimes")  # several flag values, or one variable with ':'-separated ones


def settings_parser(model: type[Record], parser: argparse.ArgumentParser,
                    flags: Mapping[str, tuple[str, ...]] | None = None) -> argparse.ArgumentParser:
    """``parser`` with a flag per field of ``model`` (``--<name-with-dashes>`` unless ``flags`` names others),
    its description and variable as the help, no default (unset flags fall through to the environment)."""
    for name, (kind, rule, _) in model.fields().items():
        kwargs: dict[str, Any] = {"dest": name, "default": None,
                                  "help": f"{rule.description} [{ENV_PREFIX}{name.upper()}]"}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name in LIST_SETTINGS:
            kwargs["nargs"] = "+"
        parser.add_argument(*(flags or {}).get(name, (_flag(name),)), **kwargs)
    return parser


def build_parser(prog: str = "edge.serving.serve") -> argparse.ArgumentParser:
    return settings_parser(ServeConfig, argparse.ArgumentParser(
        prog=prog, description="edgeloop edge inference service", epilog=(
            f"Every option can also be set as an environment variable: {ENV_PREFIX}<OPTION> (e.g. "
            f"{ENV_PREFIX}PUBLIC_KEYS=/etc/edgeloop/keys).")))


def flag_or_variable(name: str, args: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    """One setting's flag value, else its ``EDGELOOP_*`` variable, else None."""
    value = args.get(name)
    if value is None and f"{ENV_PREFIX}{name.upper()}" in environ:
        value = environ[f"{ENV_PREFIX}{name.upper()}"]
        if name in LIST_SETTINGS:
            value = [part for part in value.split(":") if part]
    return value


def settings_from(model: type[RecordT], args: dict[str, Any], environ: Mapping[str, str], what: str,
                  flags: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None) -> RecordT:
    """``model`` from parsed flags, then ``EDGELOOP_*`` variables, then ``defaults`` (an enrollment kit's),
    then the model's defaults; a bad value names its setting.

    List settings (``public_keys``) come from one variable with ':'-separated paths. ``flags`` names a
    setting's flag where it is not ``--<name-with-dashes>``.
    """
    flags, defaults = flags or {}, defaults or {}
    values: dict[str, Any] = {}
    for name in model.fields():
        value = flag_or_variable(name, args, environ)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            values[name] = value
    try:
        return model.from_text(values)
    except SchemaError as error:
        def where(location: tuple[str | int, ...]) -> str:
            if not location:
                return "settings"
            name = str(location[0])
            return f"{flags.get(name, _flag(name))} ({ENV_PREFIX}{name.upper()})"
        problems = "; ".join(f"{where(location)}: {message}" for location, message in error.problems)
        raise ConfigError(f"bad {what} settings: {problems}") from error


def settings_with_kit(model: type[RecordT], args: dict[str, Any], environ: Mapping[str, str], what: str,
                      flags: Mapping[str, str] | None = None) -> RecordT:
    """:func:`settings_from`, with the enrollment kit named by ``--kit`` / ``EDGELOOP_KIT`` (if any) filling
    what the flags and the environment leave unset."""
    from edge.tls import load_kit

    kit = flag_or_variable("kit", args, environ)
    return settings_from(model, args, environ, what, flags, load_kit(Path(kit)).settings() if kit else None)


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServeConfig:
    """Settings from flags, then ``EDGELOOP_*`` variables, then the kit, then defaults; a bad value names its
    setting."""
    environ = os.environ if environ is None else environ
    return settings_with_kit(ServeConfig, vars(build_parser().parse_args(argv)), environ, "edge service")
