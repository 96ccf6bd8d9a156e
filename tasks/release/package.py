"""``edgeloop package``: container images of a registered model version, gated, pushed, recorded.

For each platform in ``package.platforms`` (the runtime follows the registered variant: LiteRT for
``.tflite``, ONNX Runtime for ``.onnx``):

1. the version is exported as a signed bundle and installed into a model store on the host (signature,
   files and health check verified before anything is built);
2. a build context is assembled (:func:`build_context`) and built from ``docker/Dockerfile`` through the
   Engine API, with OCI and ``edgeloop.*`` labels, tagged
   ``<registry>/<repository>:model-v<semver>-<optimisation>-<runtime>-<arch>``; the version follows
   the rules in :mod:`tasks.release.image_version`, read from the registry's history;
3. gates on the built image: size at most ``package.max_image_mb``; a container started with the
   ``package.check_device``'s cpus and memory answers ``/readyz`` within ``package.max_start_s``
   (amd64; arm64 runs under qemu: its timings are emulated and not gated); its ``/v1/predict`` answers
   the bundle's sample exactly as the host runtime does (amd64; arm64: the same labels);
4. only when every image of the run passed, all are pushed; the digests are tagged on the MLflow model
   version (``image.<arch>``), and a ``package`` run in MLflow records every figure, also for a run
   that failed a gate.

Build context (:func:`build_context`)::

    wheelhouse/   the edge stack's wheels for the target platform, resolved on the host with
                  ``pip download --only-binary=:all: --platform ...`` against requirements.lock,
                  plus ``pip.whl`` and ``requirements.txt`` (the build needs no network)
    edge/         the device package, as it is in the repository
    keys/         the trusted public keys (never a private key)
    store/        a model store with the signed bundle installed and verified on the host

Wheelhouses are cached per (platform, runtime, lock hash) in the cache folder (``EDGELOOP_CACHE``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import requests
from pydantic import BaseModel, ConfigDict, ValidationError

from edge.health import LoadedVersion, load_and_check, read_sample
from edge.manifest import MANIFEST_FILE, Manifest
from edge.sidecar import atomic_write_text
from edge.signing import load_public_keys
from edge.store import ModelStore
from tasks.config import PARAMS_FILE, PackageParams, Params, format_validation_error, load_params
from tasks.devices import DEVICES_FILE, load_devices
from tasks.entrypoint import report_user_errors, setup_logging
from tasks.errors import ConfigError, PackagingError
from tasks.lineage import git_commit, utc_now
from tasks.release import engine as docker_engine
from tasks.release.base_images import RECIPE_LABEL, enable_emulation, ensure_base_image
from tasks.release.bundle import export_registered
from tasks.release.engine import CACHE_DIR, Engine, cache_lock
from tasks.release.image_version import Release, SemVer, image_tag, next_version
from tasks.release.registry import Registry
from tasks.workspace import Workspace

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO_ROOT / "requirements.lock"
EDGE_PACKAGE = REPO_ROOT / "edge"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
# what edge/ imports at run time, besides the runtime itself; versions come from requirements.lock
EDGE_REQUIREMENTS = ("numpy", "fastapi", "uvicorn", "httptools", "uvloop", "prometheus-client", "cryptography",
                     "orjson", "httpx")
RUNTIME_REQUIREMENTS = {"tflite": "ai-edge-litert", "onnx": "onnxruntime"}
PIP_PLATFORMS = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}
MANYLINUX = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014")


def wheelhouse(platform: str, runtimes: list[str], cache_dir: Path) -> Path:
    """A folder of wheels for an edge image with ``runtimes`` on ``platform`` (cached; resolved offline-ready)."""
    if platform not in PIP_PLATFORMS:
        raise ConfigError(f"platform {platform!r} is not supported; use one of {sorted(PIP_PLATFORMS)}")
    unknown = sorted(set(runtimes) - set(RUNTIME_REQUIREMENTS))
    if unknown:
        raise ConfigError(f"runtime {unknown} is not supported; use one of {sorted(RUNTIME_REQUIREMENTS)}")
    lock_hash = hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()[:12]
    target = cache_dir / "wheelhouse" / f"{platform.replace('/', '-')}-{'-'.join(sorted(runtimes))}-{lock_hash}"
    with cache_lock(f"wheelhouse-{target.name}", cache_dir):  # one process downloads, the others reuse
        if not (target / "requirements.txt").is_file():
            _download_wheels(platform, runtimes, target)
    return target


def _download_wheels(platform: str, runtimes: list[str], target: Path) -> None:
    requirements = [*EDGE_REQUIREMENTS, *(RUNTIME_REQUIREMENTS[runtime] for runtime in sorted(runtimes))]
    machine = PIP_PLATFORMS[platform]
    platforms = [flag for tag in MANYLINUX for flag in ("--platform", f"{tag}_{machine}")]
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", *platforms,
                   "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
                   "--abi", "none", "--dest", str(scratch), "--constraint", str(LOCK_FILE), *requirements, "pip"]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise ConfigError(f"could not resolve the {'+'.join(runtimes)} wheels for {platform} (is the package index "
                              f"reachable?):\n{completed.stderr[-1500:]}")
        next(scratch.glob("pip-*.whl")).rename(scratch / "pip.whl")  # the Dockerfile runs pip from its wheel
        (scratch / "requirements.txt").write_text("\n".join(requirements) + "\n")
        scratch.rename(target)  # complete or absent: never half a wheelhouse in the cache
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def runtimes_of(manifest: Manifest) -> list[str]:
    """The runtimes ``manifest``'s models need (a cascade may mix LiteRT and ONNX Runtime)."""
    return sorted({entry.runtime for entry in manifest.models})


def build_context(bundle: Path, public_keys: list[Path], platform: str, cache_dir: Path,
                  destination: Path) -> Manifest:
    """Assemble the image build context for ``bundle`` in the empty folder ``destination``; its manifest."""
    keys = load_public_keys(public_keys)
    manifest = ModelStore(destination / "store", keys).install(bundle)  # verified and health-checked first
    shutil.copytree(wheelhouse(platform, runtimes_of(manifest), cache_dir), destination / "wheelhouse")
    shutil.copytree(EDGE_PACKAGE, destination / "edge", ignore=shutil.ignore_patterns("__pycache__", "openapi.json"))
    (destination / "keys").mkdir()
    for path in public_keys:
        sources = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        for source in sources:
            shutil.copy(source, destination / "keys" / source.name)
    shutil.copy(DOCKERFILE, destination / "Dockerfile")
    (destination / ".dockerignore").write_text("**/__pycache__\n")
    return manifest


# ---- what a package run produces ------------------------------------------------------------------
ARCHES = {"linux/amd64": "amd64", "linux/arm64": "arm64"}
OFFICIAL_BASE = "python:3.11-slim"
PULL_TIMEOUT_S = 60
EXACT_ATOL = 1e-5           # amd64: the container's scores equal the host runtime's to this tolerance
EMULATED_MIN_AGREEMENT = 0.9  # arm64 under qemu: other kernels, so labels (not scores) must agree
REPORT_SCHEMA = "edgeloop.package/1"


class ImageRecord(BaseModel):
    """One built image: where it is, what it measured, whether it passed."""

    model_config = ConfigDict(extra="forbid")
    platform: str
    arch: str
    runtime: str
    reference: str                 # registry/repository:tag
    digest: str | None = None      # after the push
    status: Literal["pushed", "already_released", "failed_gate", "not_pushed"] = "not_pushed"
    base_image: str = ""
    image_mb: float | None = None
    ready_s: float | None = None   # docker run to the first 200 from /readyz
    emulated: bool = False         # run under qemu user emulation: timings are not device timings
    max_abs_score_diff: float | None = None
    label_agreement: float | None = None
    user: str | None = None        # the uid the service runs as
    failures: list[str] = []

    @property
    def pinned(self) -> str | None:
        return f"{self.reference.rsplit(':', 1)[0]}@{self.digest}" if self.digest else None


class PackageReport(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    schema_id: str = REPORT_SCHEMA
    model_name: str
    mlflow_version: str
    variant: str
    version: str
    version_reason: str
    created_at: str
    images: list[ImageRecord]


@dataclass(frozen=True)
class Candidate:
    """A built-but-unchecked image of one platform."""

    record: ImageRecord
    release: Release
    context: Path


def _recipe(context: Path, base: str) -> str:
    """sha256 over what decides an image besides the model, the same for every platform of one build:
    Dockerfile, edge code, the pinned requirements and the base image's recipe."""
    digest = hashlib.sha256(f"{base}\n".encode())
    for path in sorted((context / "edge").rglob("*")):
        if path.is_file():
            digest.update(f"{path.relative_to(context)}\n".encode() + hashlib.sha256(path.read_bytes()).digest())
    digest.update((context / "wheelhouse" / "requirements.txt").read_bytes())
    digest.update(LOCK_FILE.read_bytes())
    digest.update((context / "Dockerfile").read_bytes())
    return digest.hexdigest()


def _base_recipe(engine: Engine, base: str) -> str:
    """What the base image is, independent of its platform: its recipe label, else its repo digest, else its id."""
    import docker

    try:
        image = engine.client.images.get(base)
    except docker.errors.ImageNotFound:
        return base  # pulled by BuildKit at build time: its reference is all that is known here
    return image.labels.get(RECIPE_LABEL) or next(iter(image.attrs.get("RepoDigests") or []), image.id)


def resolve_base_image(engine: Engine, configured: str | None, arch: str, registry: Registry) -> str:
    """The base image reference for ``arch``: the configured one, else the official slim Python when the
    engine has or can pull it, else the Debian-built one (pushed to ``registry``, where BuildKit finds it)."""
    import docker

    platform = f"linux/{arch}"
    for reference in [configured] if configured else [OFFICIAL_BASE]:
        with contextlib.suppress(docker.errors.ImageNotFound):
            if engine.client.images.get(reference).attrs.get("Architecture") == arch:
                return reference
        puller = docker.DockerClient(base_url=engine.host, timeout=PULL_TIMEOUT_S)  # a silent network fails fast
        try:
            puller.images.pull(reference, platform=platform)
            return reference
        except requests.exceptions.RequestException as error:
            if configured:
                raise ConfigError(f"pulling package.base_image {configured!r} timed out ({error})") from error
            log.info("%s cannot be pulled (%s): using the Debian-built base", reference, error)
        except docker.errors.APIError as error:
            if configured:
                raise ConfigError(f"package.base_image {configured!r} for {platform} is neither in the engine nor "
                                  f"pullable ({error.explanation}); set package.base_image: null to build one "
                                  "from Debian packages") from error
            log.info("%s cannot be pulled (%s): using the Debian-built base", reference, error.explanation)
        finally:
            puller.close()
    local = ensure_base_image(arch, engine)
    repository, tag = local.rsplit(":", 1)
    held = registry.labels(repository, tag) if registry.digest(repository, tag) else {}
    if held.get(RECIPE_LABEL) != engine.client.images.get(local).labels.get(RECIPE_LABEL):
        engine.client.images.get(local).tag(f"{registry.address}/{repository}", tag)
        docker_engine.push(engine.client, f"{registry.address}/{repository}", tag)
    return f"{registry.address}/{local}"


def _host_outputs(loaded: LoadedVersion, sample: np.ndarray) -> dict[str, np.ndarray]:
    outputs = {"primary": loaded.primary.predict(sample)}
    if loaded.large is not None:
        outputs["large"] = loaded.large.predict(sample)
    return outputs


def _compare(record: ImageRecord, answer: dict, host: dict[str, np.ndarray]) -> None:
    """Fill the record's prediction figures: the container's answer against the host runtime's outputs."""
    rows = answer["predictions"]
    scores = np.asarray([row["scores"] for row in rows], np.float32)
    expected = np.stack([host[row["stage"]][index] for index, row in enumerate(rows)])
    record.max_abs_score_diff = float(np.max(np.abs(scores - expected)))
    record.label_agreement = float(np.mean(scores.argmax(axis=1) == expected.argmax(axis=1)))


def check_image(engine: Engine, record: ImageRecord, params: PackageParams, cpus: float | None,
                memory_mb: int | None, sample: np.ndarray, host: dict[str, np.ndarray]) -> None:
    """Measure ``record``'s image and apply the gates; failures go into ``record.failures``."""
    record.image_mb = round(docker_engine.image_mb(engine.client, record.reference), 1)
    if record.image_mb > params.max_image_mb:
        record.failures.append(f"image is {record.image_mb:.1f} MB, above package.max_image_mb {params.max_image_mb:g}")
    timeout_s = params.emulated_start_timeout_s if record.emulated else max(params.max_start_s * 6, 30.0)
    try:
        with docker_engine.running(engine.client, record.reference, record.platform, cpus, memory_mb,
                                   timeout_s, emulated=record.emulated) as container:
            record.ready_s = round(container.ready_s, 3)
            record.user = container.exec("id", "-u")
            _compare(record, container.predict(sample), host)
    except PackagingError as error:
        record.failures.append(str(error))
        return
    if not record.emulated and record.ready_s > params.max_start_s:
        record.failures.append(f"cold start took {record.ready_s:.2f} s, above package.max_start_s "
                               f"{params.max_start_s:g}")
    if record.user == "0":
        record.failures.append("the service runs as root")
    if record.emulated:
        if record.label_agreement < EMULATED_MIN_AGREEMENT:
            record.failures.append(f"under emulation the container's labels agree {record.label_agreement:.0%} with "
                                   f"the host's, below {EMULATED_MIN_AGREEMENT:.0%}")
    elif record.label_agreement < 1.0 or record.max_abs_score_diff > EXACT_ATOL:
        record.failures.append(f"the container's predictions differ from the host runtime's (labels agree "
                               f"{record.label_agreement:.0%}, max score difference {record.max_abs_score_diff:.2g})")
    if record.failures:
        record.status = "failed_gate"


# ---- the stage ----------------------------------------------------------------------------------------
ENVIRONMENT = {"EDGELOOP_REGISTRY": "registry", "EDGELOOP_SIGNING_KEY": "signing_key",
               "EDGELOOP_TRUSTED_KEYS": "public_keys"}


def with_environment(settings: PackageParams) -> PackageParams:
    """``settings`` with the deployment-specific values the environment overrides (registry, keys)."""
    updates = {field: os.environ[variable] for variable, field in ENVIRONMENT.items() if os.environ.get(variable)}
    if not updates:
        return settings
    try:
        return PackageParams.model_validate({**settings.model_dump(), **updates})
    except ValidationError as error:
        names = ", ".join(variable for variable in ENVIRONMENT if os.environ.get(variable))
        raise ConfigError(format_validation_error(error, f"the environment ({names})")) from None


def _which_version(workspace: Workspace, version: str | None, alias: str | None) -> tuple[str | None, str | None]:
    """The version asked for (number or alias), else the one the register stage registered."""
    if version is not None or alias is not None:
        return version, alias
    from tasks.contracts import read_registration

    return read_registration(workspace).version, None


def _source_run(manifest: Manifest) -> tuple[str, str]:
    """The MLflow run id of the registered version and its zoo model (part of the architecture)."""
    import mlflow

    client = mlflow.MlflowClient()
    run_id = client.get_model_version(manifest.model_name, manifest.mlflow_version).run_id
    return run_id, client.get_run(run_id).data.params.get("train.model", "unknown")


def _host_arch() -> str:
    import platform

    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _candidate(engine: Engine, settings: PackageParams, registry: Registry, bundle: Path, platform: str,
               scratch: Path) -> tuple[Candidate, Manifest]:
    """Context, base image and release identity of ``bundle`` on ``platform`` (nothing built yet)."""
    arch = ARCHES[platform]
    if arch != _host_arch():
        enable_emulation(arch)  # qemu user emulation runs the foreign build steps and the checked container
    context = scratch / arch
    context.mkdir()
    manifest = build_context(bundle, [settings.public_keys], platform, CACHE_DIR, context)
    base = resolve_base_image(engine, settings.base_image, arch, registry)
    recipe = _recipe(context, _base_recipe(engine, base))
    release = Release(None, arch, _model_identity(manifest), recipe, "", manifest.data_version, manifest.params_hash)
    primary = next(entry for entry in manifest.models if entry.role == "primary")
    record = ImageRecord(platform=platform, arch=arch, runtime=primary.runtime, reference="", base_image=base,
                         emulated=arch != _host_arch())
    return Candidate(record, release, context), manifest


def _architecture(zoo_model: str, manifest: Manifest) -> str:
    """What a major version follows: the zoo model, the input shape and the class labels."""
    labels_digest = hashlib.sha256(json.dumps(manifest.labels).encode()).hexdigest()[:12]
    return f"{zoo_model}:{'x'.join(map(str, manifest.input_shape))}:{labels_digest}"


def _model_identity(manifest: Manifest) -> str:
    """sha256 over the registered version and every model file's sha256, by role.

    Two registered versions with byte-identical models (a seeded retrain on the same data) are two
    releases: each image's labels and store must name the version MLflow records it under.
    """
    by_name = {entry.name: entry.sha256 for entry in manifest.files}
    text = f"{manifest.model_name}\n{manifest.mlflow_version}\n" + "".join(
        f"{entry.role}:{by_name[entry.file]}\n" for entry in sorted(manifest.models, key=lambda e: e.role))
    return hashlib.sha256(text.encode()).hexdigest()


def _build_and_check(engine: Engine, registry: Registry, settings: PackageParams, candidate: Candidate,
                     manifest: Manifest, semver: SemVer, labels: dict[str, str], device) -> None:
    """Build ``candidate``'s image (unless the registry already holds it) and apply the gates."""
    record, release = candidate.record, candidate.release
    tag = image_tag(semver, manifest.variant, record.arch)
    record.reference = f"{registry.address}/{settings.repository}:{tag}"
    existing = registry.digest(settings.repository, tag)
    if existing is not None:
        held = Release.from_image(tag, registry.labels(settings.repository, tag))
        if held is None or (held.model_identity, held.recipe_sha256) != (release.model_identity, release.recipe_sha256):
            raise PackagingError(f"{record.reference} already exists with another image; tags are never "
                                 "overwritten: check the registry's history (edgeloop.* labels)")
        record.digest, record.status = existing, "already_released"
        log.info("%s is already in the registry (%s): not rebuilt", record.reference, existing)
        return
    log.info("building %s on %s", record.reference, record.base_image)
    docker_engine.build(engine.client, candidate.context, record.reference, record.platform, record.base_image,
                        {**labels, **release.labels(), "edgeloop.platform": record.platform,
                         "edgeloop.runtime": record.runtime, "org.opencontainers.image.base.name": record.base_image})
    sample = read_sample(candidate.context / "store" / "versions" / manifest.version, manifest)
    loaded = load_and_check(candidate.context / "store" / "versions" / manifest.version, manifest)
    check_image(engine, record, settings, device.runner.cpus, device.runner.memory_mb, sample,
                _host_outputs(loaded, sample))


def _common_labels(manifest: Manifest, semver: SemVer, run_id: str, zoo_model: str,
                   manifest_sha256: str) -> dict[str, str]:
    return {
        "org.opencontainers.image.title": f"{manifest.model_name} edge service",
        "org.opencontainers.image.description": f"{manifest.model_name} version {manifest.mlflow_version} "
                                                f"({manifest.variant}) served by edge.serve",
        "org.opencontainers.image.version": str(semver),
        "org.opencontainers.image.created": utc_now(),
        "org.opencontainers.image.revision": manifest.git_commit,
        "edgeloop.model-name": manifest.model_name,
        "edgeloop.mlflow-version": manifest.mlflow_version,
        "edgeloop.mlflow-run-id": run_id,
        "edgeloop.variant": manifest.variant,
        "edgeloop.zoo-model": zoo_model,
        "edgeloop.manifest-sha256": manifest_sha256,
        "edgeloop.package-commit": git_commit(REPO_ROOT),
    }


def package(params: Params, workspace: Workspace, version: str | None = None, alias: str | None = None,
            devices_path: Path = DEVICES_FILE) -> PackageReport:
    """Build, check, push and record the images of a registered model version (see the module doc).

    Raises :class:`PackagingError` when an image fails a gate (nothing pushed; the figures are recorded
    in a failed MLflow run and the report) and ``ServiceUnavailable`` when the registry, the engine or
    MLflow does not answer.
    """
    from tasks.release.tracking import configure

    settings = with_environment(params.package)
    registry = Registry(settings.registry)
    registry.check()  # before a long build, not after it
    try:
        device = load_devices(devices_path).get(settings.check_device)
    except KeyError as error:
        raise ConfigError(f"package.check_device: {error.args[0]} (in {devices_path})") from None
    configure(params.mlflow)
    version, alias = _which_version(workspace, version, alias)
    engine = docker_engine.connect()
    try:
        with tempfile.TemporaryDirectory(prefix="edgeloop-package-") as scratch:
            bundle = export_registered(params, Path(scratch), settings.signing_key, alias=alias, version=version,
                                       large_variant=settings.large_variant)
            prepared = [_candidate(engine, settings, registry, bundle, platform, Path(scratch))
                        for platform in settings.platforms]
            manifest = prepared[0][1]
            run_id, zoo_model = _source_run(manifest)
            candidates = [replace(candidate, release=replace(candidate.release,
                                                             architecture=_architecture(zoo_model, manifest)))
                          for candidate, _ in prepared]
            semver, reason = next_version(registry.releases(settings.repository), [c.release for c in candidates])
            log.info("packaging %s version %s (%s) as %s: %s", manifest.model_name, manifest.mlflow_version,
                     manifest.variant, semver, reason)
            manifest_sha256 = hashlib.sha256((candidates[0].context / "store" / "versions" / manifest.version /
                                              MANIFEST_FILE).read_bytes()).hexdigest()
            labels = _common_labels(manifest, semver, run_id, zoo_model, manifest_sha256)
            for candidate in candidates:
                _build_and_check(engine, registry, settings, candidate, manifest, semver, labels, device)
            records = [candidate.record for candidate in candidates]
            failed = [record for record in records if record.failures]
            if not failed:  # all or nothing: no release with one architecture missing
                for record in records:
                    if record.status == "not_pushed":
                        repository, tag = record.reference.rsplit(":", 1)
                        record.digest = docker_engine.push(engine.client, repository, tag)
                        record.status = "pushed"
    finally:
        engine.close()
    report = PackageReport(model_name=manifest.model_name, mlflow_version=manifest.mlflow_version,
                           variant=manifest.variant, version=str(semver), version_reason=reason,
                           created_at=utc_now(), images=records)
    record_in_mlflow(params, report, run_id)
    write_report(workspace, report)
    if failed:
        problems = "; ".join(f"{record.arch}: {' / '.join(record.failures)}" for record in failed)
        raise PackagingError(f"{manifest.model_name} version {manifest.mlflow_version} was not shipped, nothing "
                             f"was pushed: {problems}")
    return report


def record_in_mlflow(params: Params, report: PackageReport, source_run_id: str) -> None:
    """A ``package`` run with every figure (FAILED when a gate failed); image tags on the model version if shipped."""
    import mlflow

    from tasks.release.tracking import ensure_experiment

    shipped = all(record.digest for record in report.images)
    experiment_id = ensure_experiment(params.mlflow)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"package-v{report.version}") as run:
        mlflow.set_tags({"edgeloop.stage": "package", "source_run_id": source_run_id,
                         "registered_model": report.model_name, "model_version": report.mlflow_version,
                         "image.version": report.version, "image.version_reason": report.version_reason})
        mlflow.log_params({"package.max_image_mb": params.package.max_image_mb,
                           "package.max_start_s": params.package.max_start_s,
                           "package.check_device": params.package.check_device,
                           "package.platforms": ",".join(params.package.platforms)})
        for record in report.images:
            figures = {"mb": record.image_mb, "ready_s": record.ready_s,
                       "max_abs_score_diff": record.max_abs_score_diff, "label_agreement": record.label_agreement}
            mlflow.log_metrics({f"image.{record.arch}.{name}": value for name, value in figures.items()
                                if value is not None})
            mlflow.set_tag(f"image.{record.arch}", record.pinned or f"{record.reference} ({record.status})")
            mlflow.set_tag(f"image.{record.arch}.emulated", str(record.emulated).lower())
        mlflow.log_dict(report.model_dump(mode="json"), "package.json")
        if not shipped:
            mlflow.end_run(status="FAILED")
            return
        client = mlflow.MlflowClient()
        client.set_model_version_tag(report.model_name, report.mlflow_version, "image.version", report.version)
        client.set_model_version_tag(report.model_name, report.mlflow_version, "image.package_run_id",
                                     run.info.run_id)
        for record in report.images:
            client.set_model_version_tag(report.model_name, report.mlflow_version, f"image.{record.arch}",
                                         record.pinned)


def write_report(workspace: Workspace, report: PackageReport) -> Path:
    path = workspace.package_file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    return path


def _describe(report: PackageReport) -> str:
    lines = [f"{report.model_name} version {report.mlflow_version} ({report.variant}) -> {report.version} "
             f"({report.version_reason})"]
    for record in report.images:
        timing = f"ready {record.ready_s:.2f} s" if record.ready_s is not None else "not started"
        emulated = " (emulated)" if record.emulated else ""
        size = f"{record.image_mb:.1f} MB" if record.image_mb is not None else "size n/a"
        lines.append(f"  {record.status:16s} {record.pinned or record.reference}  {size}, {timing}{emulated}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``edgeloop package``: build, check and push the images of a registered model version."""
    parser = argparse.ArgumentParser(prog="edgeloop package", description=main.__doc__.split(": ", 1)[1])
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--version", help="registered model version number (default: the register stage's)")
    chosen.add_argument("--alias", help="registered model alias, e.g. champion")
    parser.add_argument("--platform", action="append", choices=sorted(ARCHES),
                        help="build only this platform (repeatable; default: package.platforms)")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="parameter file (default: %(default)s)")
    parser.add_argument("--workspace", type=Path, default=Path("."), help="where reports/package.json goes")
    args = parser.parse_args(argv)
    setup_logging()

    def action() -> None:
        params = load_params(args.params)
        if args.platform:
            params = params.model_copy(update={"package": params.package.model_copy(
                update={"platforms": args.platform})})
        print(_describe(package(params, Workspace(args.workspace), args.version, args.alias)))

    return report_user_errors(action)


if __name__ == "__main__":
    sys.exit(main())
