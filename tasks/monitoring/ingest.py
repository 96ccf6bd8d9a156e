"""``edgeloop ingest``: the control-plane endpoint devices upload their closed sample files to (and, with
``--bundle-dir``, fetch the signed bundles of a rollout from).

    edgeloop ingest add-device DEVICE --tokens FILE     issue a device token (printed once; only its hash is kept)
    edgeloop ingest serve --tokens FILE [--collected-dir DIR] [--host H] [--port P] [--max-upload-mb MB]
    edgeloop ingest serve --ca-dir DIR [--bundle-dir DIR] ...    mutual TLS: devices prove themselves by certificate

With ``--ca-dir`` (the fleet CA, :mod:`tasks.rollout.fleet_ca`) the endpoint is HTTPS only, TLS 1.2+, and
requires a client certificate from the fleet CA (:mod:`tasks.monitoring.mutual_tls`): the certificate's
common name is the device, a revoked certificate is refused at its next request (the CRL is re-read
when it changes), and ``--tokens`` is optional. ``GET /v1/bundles/<file>`` serves ``--bundle-dir``'s
bundles (``rollout.bundle_base_url`` points there).

``POST /v1/ingest`` takes one ``.npz`` as the body (``edge.sampling.upload.HttpTarget`` sends it), authenticated
per device (its client certificate, or ``Authorization: Bearer <token>`` with ``X-Edgeloop-Device``), checks
it is a well-formed sample file of that device (:mod:`tasks.monitoring.sample_files`) and stores it atomically as
``<collected_dir>/<device>--<file name>`` (:func:`edge.identity.stored_upload_name`), the flat folder the
drift check (:mod:`tasks.monitoring.collected`) reads. Device ids and file names follow the rules of
:mod:`edge.identity` (neither can hold ``--``), so one device can never write a name read as another's;
a request that breaks them is answered 422 naming the rule.
Re-sending a stored file is answered 200 again, so a device whose confirmation got lost can retry
safely. The tokens file maps device ids to the sha256 of their tokens (JSON or YAML), re-read when it
changes: ``add-device`` needs no restart.

Every refusal is counted in ``GET /metrics`` (Prometheus) as ``edgeloop_ingest_refused_total{device,reason}``
and every stored file as ``edgeloop_ingest_stored_total{device}``. A request that has not proven its device
with a valid token is counted as device ``unauthenticated``: labels never take a value a client chose, so a
flood of made-up ids cannot grow the metrics without bound.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
from pathlib import Path

import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.concurrency import run_in_threadpool

from edge.files import atomic_write_bytes, atomic_write_text, sha256_file
from edge.identity import DEVICE_ID_RULE, UPLOAD_NAME_RULE, is_device_id, is_upload_name, stored_upload_name
from edge.serving.requests import BadRequest, read_body
from tasks.config import PARAMS_FILE, load_params
from tasks.entrypoint import report_user_errors, setup_logging
from tasks.errors import ConfigError, DataError
from tasks.monitoring.mutual_tls import SERVER_NAME, CertificateIdentity, RevocationList, server_context
from tasks.monitoring.sample_files import validate_sample_file

LOGGER = logging.getLogger(__name__)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
UNAUTHENTICATED = "unauthenticated"  # the device label of a request without a valid token


def hash_token(token: str) -> str:
    """What the tokens file keeps instead of the token: its sha256 hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, str]:
    """Device id -> sha256 hex of its token, validated; :class:`ConfigError` names each problem."""
    if not path.is_file():
        raise ConfigError(f"tokens file {path} not found; create it with `edgeloop ingest add-device DEVICE "
                          f"--tokens {path}`")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"tokens file {path} is not readable JSON/YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"tokens file {path} must map device ids to token sha256 hashes")
    for device, digest in raw.items():
        if not is_device_id(device):
            raise ConfigError(f"tokens file {path}: device id {device!r} is not allowed: {DEVICE_ID_RULE}")
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise ConfigError(f"tokens file {path}: device {device!r} needs a sha256 hex hash, not a token; "
                              "re-issue it with `edgeloop ingest add-device --replace`")
    return raw


class TokenRegistry:
    """The tokens file, re-read when its mtime or size changes; a broken edit keeps the previous tokens."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._file_stamp()
        self._hashes = load_tokens(path)  # a broken file fails at start, not at the first upload
        self._lock = threading.Lock()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _current(self) -> dict[str, str]:
        stamp = self._file_stamp()
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._hashes = load_tokens(self.path)
                except ConfigError as error:
                    LOGGER.error("keeping the previous device tokens: %s", error)
            return self._hashes

    def device_for(self, token: str) -> str | None:
        """The device whose token this is, compared in constant time; None when no device has it."""
        presented = hash_token(token)
        owners = [device for device, digest in self._current().items() if hmac.compare_digest(digest, presented)]
        return owners[0] if token and owners else None


BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.tar\.gz")


class IngestService:
    """What the ingest routes share: where files go, how devices are authenticated (certificates and their
    revocation list, tokens, or both), the bundles served, the upload limit and the metrics."""

    def __init__(self, collected_dir: Path, tokens_file: Path | None, max_upload_bytes: int,
                 revocations: RevocationList | None = None, bundle_dir: Path | None = None) -> None:
        if tokens_file is None and revocations is None:
            raise ConfigError("the ingest service needs device tokens (--tokens) or the fleet CA (--ca-dir)")
        self.collected_dir = Path(collected_dir)
        self.tokens = TokenRegistry(Path(tokens_file)) if tokens_file is not None else None
        self.revocations, self.bundle_dir = revocations, bundle_dir
        self.max_upload_bytes = max_upload_bytes
        self.metrics = metrics = CollectorRegistry()  # per app: a test process may create several
        self.refused = Counter("edgeloop_ingest_refused", "uploads refused, per device (unauthenticated: no valid "
                               "token) and reason", ["device", "reason"], registry=metrics)
        self.stored = Counter("edgeloop_ingest_stored", "uploads stored, per device", ["device"], registry=metrics)

    def refuse(self, status: int, reason: str, detail: str, device: str = UNAUTHENTICATED,
               headers: dict[str, str] | None = None) -> HTTPException:
        """The refusal to raise, counted under ``device`` (a proven one, or ``unauthenticated``)."""
        self.refused.labels(device=device, reason=reason).inc()
        return HTTPException(status, detail=detail, headers=headers)

    def certified_device(self, request: Request) -> str | None:
        """The device named by the request's verified client certificate; None on a connection without one."""
        identity = request.scope.get("extensions", {}).get("tls") or {}
        device = identity.get("client_cert_name")
        if device is None:
            return None
        if not is_device_id(device):
            raise self.refuse(403, "bad_certificate", f"the client certificate's name {device[:80]!r} is not a "
                              "device id")
        if self.revocations is not None and self.revocations.is_revoked(identity["client_cert_serial"]):
            raise self.refuse(403, "revoked", f"the certificate of {device!r} is revoked; enroll the device again",
                              device=device)
        return device

    def authenticate(self, request: Request) -> str:
        """The device that sent ``request``: its client certificate's, or its claimed id proven by its token."""
        claimed = request.headers.get("x-edgeloop-device", "")
        certified = self.certified_device(request)
        if certified is not None:
            if claimed and claimed != certified:
                raise self.refuse(403, "device_mismatch", f"X-Edgeloop-Device {claimed[:80]!r} does not match the "
                                  "client certificate's device", device=certified)
            return certified
        if self.tokens is None:
            raise self.refuse(401, "unauthorized", "a client certificate from the fleet CA is required")
        if not is_device_id(claimed):
            raise self.refuse(422, "bad_device_id", f"X-Edgeloop-Device {claimed[:80]!r} is not a device id: "
                              f"{DEVICE_ID_RULE}")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        owner = self.tokens.device_for(token.strip()) if scheme.lower() == "bearer" else None
        if owner is None:
            raise self.refuse(401, "unauthorized", "missing or unknown device token; issue one with "
                              "`edgeloop ingest add-device`", headers={"WWW-Authenticate": "Bearer"})
        if claimed != owner:
            raise self.refuse(403, "device_mismatch", f"X-Edgeloop-Device {claimed!r} does not match the token's "
                              "device", device=owner)
        return owner

    async def read_upload(self, request: Request, device: str) -> bytes:
        try:
            return await read_body(request, self.max_upload_bytes)
        except BadRequest as error:
            reason = "too_large" if error.status == 413 else "bad_body"
            raise self.refuse(error.status, reason, f"upload refused: {error}", device) from None

    def save(self, content: bytes, device: str, file_name: str, claimed_digest: str) -> dict[str, object]:
        """Check the file and store it atomically; the same bytes again is a retry whose answer got lost."""
        digest = hashlib.sha256(content).hexdigest()
        if claimed_digest and claimed_digest.lower() != digest:
            raise self.refuse(400, "damaged", f"body sha256 {digest} differs from X-Content-SHA256: damaged in "
                              "transit, send it again", device)
        try:
            rows = validate_sample_file(content, device)
        except DataError as error:
            raise self.refuse(422, "invalid_samples", str(error), device) from None
        target = self.collected_dir / stored_upload_name(device, file_name)
        if not target.is_file():
            atomic_write_bytes(target, content)
            self.stored.labels(device=device).inc()
            LOGGER.info("stored %s (%d samples)", target.name, rows)
        elif sha256_file(target) != digest:  # same bytes again is a retry whose answer got lost: fine
            raise self.refuse(409, "conflict", f"a different file is already stored as {target.name}", device)
        return {"sha256": digest, "stored": target.name, "samples": rows}

    def bundle(self, request: Request, name: str) -> FileResponse:
        """``GET /v1/bundles/<name>``: a signed bundle of ``bundle_dir`` (to certified devices, under mutual TLS)."""
        if self.revocations is not None:
            self.authenticate(request)
        if self.bundle_dir is None or not BUNDLE_NAME.fullmatch(name) or not (self.bundle_dir / name).is_file():
            raise HTTPException(404, detail=f"no bundle {name[:140]!r} here")
        return FileResponse(self.bundle_dir / name, media_type="application/gzip")

    async def ingest(self, request: Request) -> dict[str, object]:
        """``POST /v1/ingest``: authenticate, check the name, read the body, save it (off the event loop)."""
        device = self.authenticate(request)
        file_name = request.headers.get("x-edgeloop-filename", "")
        if not is_upload_name(file_name):
            raise self.refuse(422, "bad_file_name", f"X-Edgeloop-Filename {file_name[:160]!r} is not allowed: "
                              f"{UPLOAD_NAME_RULE}", device)
        content = await self.read_upload(request, device)
        claimed_digest = request.headers.get("x-content-sha256", "")
        return await run_in_threadpool(self.save, content, device, file_name, claimed_digest)


def create_app(collected_dir: Path, tokens_file: Path | None, max_upload_bytes: int,
               revocations: RevocationList | None = None, bundle_dir: Path | None = None) -> FastAPI:
    """The ingest service: ``POST /v1/ingest``, ``GET /v1/bundles/<file>`` (see the module docstring),
    ``GET /healthz`` and ``GET /metrics``."""
    service = IngestService(collected_dir, tokens_file, max_upload_bytes, revocations, bundle_dir)
    app = FastAPI(title="edgeloop ingest", version="1")

    @app.post("/v1/ingest")
    async def ingest(request: Request) -> dict[str, object]:
        return await service.ingest(request)

    @app.get("/v1/bundles/{name}")
    def bundle(request: Request, name: str) -> FileResponse:
        return service.bundle(request, name)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(service.metrics), media_type=CONTENT_TYPE_LATEST)

    return app


def add_device(tokens_file: Path, device: str, replace: bool = False) -> str:
    """Issue a token for ``device`` and store only its hash (file mode 0600); returns the token."""
    if not is_device_id(device):
        raise ConfigError(f"device id {device!r} is not allowed: {DEVICE_ID_RULE}")
    hashes = load_tokens(tokens_file) if tokens_file.is_file() else {}
    if device in hashes and not replace:
        raise ConfigError(f"device {device!r} already has a token in {tokens_file}; pass --replace to issue a "
                          "new one (the old one stops working)")
    token = secrets.token_urlsafe(32)
    hashes[device] = hash_token(token)
    # atomic_write_* create the file through mkstemp: mode 0600 from the first byte, kept by the rename
    atomic_write_text(tokens_file, json.dumps(hashes, indent=2, sort_keys=True) + "\n")
    return token


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop ingest", description="receive sample files from devices")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = actions.add_parser("serve", help="run the ingest endpoint (uvicorn)")
    serve.add_argument("--tokens", type=Path, help="device token hashes (from add-device); optional with --ca-dir")
    serve.add_argument("--ca-dir", type=Path, help="the fleet CA folder: HTTPS with client certificates only, "
                       "using its servers/ingest certificate (`edgeloop fleet server-cert ingest --host ...`)")
    serve.add_argument("--bundle-dir", type=Path, help="serve these signed bundles at /v1/bundles/<file> "
                       "(default: none)")
    serve.add_argument("--collected-dir", type=Path, help="where files go (default: drift.collected_dir)")
    serve.add_argument("--params", type=Path, default=PARAMS_FILE, help="parameter file (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8100, help="port (default: %(default)s)")
    serve.add_argument("--max-upload-mb", type=float, default=16.0, help="largest file accepted (default: 16)")
    add = actions.add_parser("add-device", help="issue a token for a device; prints it once")
    add.add_argument("device", help=f"device id: {DEVICE_ID_RULE}")
    add.add_argument("--tokens", type=Path, required=True, help="token hashes file (created if missing)")
    add.add_argument("--replace", action="store_true", help="issue a new token for a known device")
    return parser


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    collected_dir = args.collected_dir or load_params(args.params).drift.collected_dir
    collected_dir.mkdir(parents=True, exist_ok=True)
    if args.tokens is None and args.ca_dir is None:
        raise ConfigError("give --tokens (device tokens) or --ca-dir (client certificates over mutual TLS), or both")
    revocations = RevocationList(args.ca_dir) if args.ca_dir else None
    app = create_app(collected_dir, args.tokens, int(args.max_upload_mb * 2**20), revocations, args.bundle_dir)
    tls: dict = {}
    if revocations is not None:
        context = server_context(revocations.ca)
        tls = {"http": CertificateIdentity, "ssl_certfile": str(revocations.ca.server(SERVER_NAME).certificate),
               "ssl_context_factory": lambda _config, _default: context}
    LOGGER.info("ingest: storing uploads in %s%s", collected_dir, " (mutual TLS)" if tls else "")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", **tls)


def _add_device(args: argparse.Namespace) -> None:
    token = add_device(args.tokens, args.device, args.replace)
    print(token)
    LOGGER.info("device %s: token printed above, shown only once; %s keeps its sha256", args.device, args.tokens)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return report_user_errors(lambda: _serve(args) if args.action == "serve" else _add_device(args))


if __name__ == "__main__":
    raise SystemExit(main())
