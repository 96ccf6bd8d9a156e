"""``edgeloop package``: container images of a registered model version, gated, pushed, recorded.

For each platform in ``package.platforms`` (the runtime follows the registered variant: LiteRT for
``.tflite``, ONNX Runtime for ``.onnx``), and for each other variant the version chose for a device class, on
the platforms of the classes that run it (:mod:`tasks.packaging.class_images`: one image per variant and
platform, shared by the classes on it; each class's image tagged ``device.<class>.image.<arch>``):

1. the version is exported as a signed bundle and installed into a model store on the host (signature,
   files and health check verified before anything is built);
2. a build context is assembled (:func:`build_context`) and built from ``docker/Dockerfile`` through the
   Engine API, with OCI and ``edgeloop.*`` labels, tagged
   ``<registry>/<repository>:model-v<semver>-<optimisation>-<runtime>-<arch>``; the version follows
   the rules in :mod:`tasks.packaging.image_version`, read from the registry's history;
3. gates on the built image: size at most ``package.max_image_mb``; a container started with the
   ``package.check_device``'s cpus and memory answers ``/readyz`` within ``package.max_start_s`` (an over-budget
   start is measured again, up to ``package.start_attempts`` starts; the fastest is gated)
   (amd64; arm64 runs under qemu: its timings are emulated and not gated); its ``/v1/predict`` answers
   the bundle's sample exactly as the host runtime does (amd64; arm64: the same labels);
4. only when every image of the run passed, all are pushed; the digests are tagged on the MLflow model
   version (``image.<arch>``), and a ``package`` run in MLflow records every figure, also for a run
   that failed a gate.

The build context and base image: :mod:`tasks.packaging.image_build`; the gates: :mod:`tasks.packaging.image_checks`;
the report, the MLflow run and the version's tags: :mod:`tasks.packaging.package_report`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge.store.health import load_and_check, read_sample
from edge.store.manifest import MANIFEST_FILE, Manifest
from tasks.config import PARAMS_FILE, PackageParams, Params, load_params
from tasks.devices import DEVICES_FILE, load_devices
from tasks.entrypoint import report_user_errors, setup_logging
from tasks.errors import ConfigError, PackagingError
from tasks.lineage import git_commit, utc_now
from tasks.packaging import docker_client as docker_engine
from tasks.packaging.base_images import enable_emulation, host_arch
from tasks.packaging.docker_client import CACHE_DIR, Engine
from tasks.packaging.image_build import REPO_ROOT, base_recipe, build_context, recipe_sha256, resolve_base_image
from tasks.packaging.image_checks import ImageRecord, check_image, host_outputs
from tasks.packaging.image_version import Release, SemVer, image_tag, next_version
from tasks.packaging.oci_registry import Registry
from tasks.packaging.package_report import PackageReport, describe, record_in_mlflow, write_report
from tasks.packaging.platforms import PLATFORMS, PlatformUnavailable
from tasks.registry.bundle import export_registered
from tasks.workspace import Workspace

log = logging.getLogger(__name__)

# ---- what a package run produces ------------------------------------------------------------------
ARCHES = {docker: platform.arch for docker, platform in PLATFORMS.items()}
@dataclass(frozen=True)
class Candidate:
    """A built-but-unchecked image of one platform."""

    record: ImageRecord
    release: Release
    context: Path


# ---- the stage ----------------------------------------------------------------------------------------
# The registry and the keys: package in params.yaml, with EDGELOOP_REGISTRY, EDGELOOP_SIGNING_KEY and
# EDGELOOP_TRUSTED_KEYS over it (applied by tasks.config.load_params).


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



def _candidate(engine: Engine, settings: PackageParams, registry: Registry, bundle: Path, platform: str,
               scratch: Path, classes: list[str] | None = None) -> tuple[Candidate, Manifest]:
    """Context, base image and release identity of ``bundle`` on ``platform`` (nothing built yet)."""
    arch = ARCHES[platform]
    if arch != host_arch():
        enable_emulation(arch)  # qemu user emulation runs the foreign build steps and the checked container
    context = scratch / arch
    context.mkdir(parents=True)
    manifest = build_context(bundle, [settings.public_keys], platform, CACHE_DIR, context)
    base, runtime_base = resolve_base_image(engine, settings.base_image, arch, registry)
    recipe = recipe_sha256(context, f"{base_recipe(engine, base)} {base_recipe(engine, runtime_base)}")
    release = Release(None, arch, _model_identity(manifest), recipe, "", manifest.data_version, manifest.params_hash)
    primary = next(entry for entry in manifest.models if entry.role == "primary")
    record = ImageRecord(platform=platform, arch=arch, runtime=primary.runtime, reference="", base_image=base,
                         runtime_base=runtime_base,
                         emulated=arch != host_arch(), variant=manifest.variant, classes=classes or [])
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


def _host_reference(context: Path, manifest: Manifest) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The bundle's sample and what the host runtime answers for it (the same for every platform)."""
    folder = context / "store" / "versions" / manifest.version
    sample = read_sample(folder, manifest)
    return sample, host_outputs(load_and_check(folder, manifest), sample)


def _tag_conflict(reference: str, held: Release | None, release: Release) -> str:
    """Why ``reference`` cannot be (re)built, and the two ways out."""
    what = ("is not an edgeloop model image" if held is None else
            f"holds model {held.model_identity[:12]} built from recipe {held.recipe_sha256[:12]}, this build is "
            f"model {release.model_identity[:12]} from recipe {release.recipe_sha256[:12]}")
    return (f"{reference} already exists and {what}; tags are never overwritten. This happens when the registry "
            "outlived the MLflow store or the base images its releases came from (a reset MLflow database numbers "
            "versions from 1 again; a rebuilt base image changes the recipe): package into another repository "
            "(package.repository in params.yaml) or start from an empty registry (the local one: `make down`, "
            "remove .run/registry, `make demo`)")


def _build_and_check(engine: Engine, registry: Registry, settings: PackageParams, candidate: Candidate,
                     manifest: Manifest, semver: SemVer, labels: dict[str, str], device,
                     reference: tuple[np.ndarray, dict[str, np.ndarray]]) -> None:
    """Build ``candidate``'s image (unless the registry already holds it) and apply the gates."""
    record, release = candidate.record, candidate.release
    tag = image_tag(semver, manifest.variant, record.arch)
    record.reference = f"{registry.address}/{settings.repository}:{tag}"
    existing = registry.digest(settings.repository, tag)
    if existing is not None:
        held = Release.from_image(tag, registry.labels(settings.repository, tag))
        if held is None or (held.model_identity, held.recipe_sha256) != (release.model_identity, release.recipe_sha256):
            raise PackagingError(_tag_conflict(record.reference, held, release))
        record.digest, record.status = existing, "already_released"
        log.info("%s is already in the registry (%s): not rebuilt", record.reference, existing)
        return
    log.info("building %s on %s (built on %s)", record.reference, record.runtime_base, record.base_image)
    docker_engine.build(engine.client, candidate.context, record.reference, record.platform, record.base_image,
                        {**labels, **release.labels(), "edgeloop.platform": record.platform,
                         "edgeloop.runtime": record.runtime, "org.opencontainers.image.base.name": record.runtime_base},
                        runtime_base=record.runtime_base)
    check_image(engine, record, settings, device.runner.cpus, device.runner.memory_mb, *reference)


def _build_variant(engine: Engine, registry: Registry, settings: PackageParams, manifest: Manifest,
                   candidates: list[Candidate], semver: SemVer, source: tuple[str, str], device) -> list[ImageRecord]:
    """Build and gate one variant's images (every platform it needs); their records."""
    manifest_sha256 = hashlib.sha256((candidates[0].context / "store" / "versions" / manifest.version /
                                      MANIFEST_FILE).read_bytes()).hexdigest()
    labels = _common_labels(manifest, semver, *source, manifest_sha256)
    reference = _host_reference(candidates[0].context, manifest)
    for candidate in candidates:
        _build_and_check(engine, registry, settings, candidate, manifest, semver, labels, device, reference)
    return [candidate.record for candidate in candidates]


def _common_labels(manifest: Manifest, semver: SemVer, run_id: str, zoo_model: str,
                   manifest_sha256: str) -> dict[str, str]:
    return {
        "org.opencontainers.image.title": f"{manifest.model_name} edge service",
        "org.opencontainers.image.description": f"{manifest.model_name} version {manifest.mlflow_version} "
                                                f"({manifest.variant}) served by edge.serving.serve",
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


def _buildable(engine: Engine, settings: PackageParams, registry: Registry, bundle: Path,
               platforms: dict[str, list[str]], scratch: Path, unbuilt: list[ImageRecord],
               variant: str = "") -> list[tuple[Candidate, Manifest]]:
    """:func:`_candidate` on each of ``platforms`` (platform -> the classes its image serves); a platform that lacks
    a package the image needs is recorded in ``unbuilt`` (naming the package) and the others still build."""
    built = []
    for platform, classes in platforms.items():
        try:
            built.append(_candidate(engine, settings, registry, bundle, platform, scratch, classes))
        except PlatformUnavailable as error:
            log.error("no %s image for %s: %s", variant or "registered", platform, error)
            unbuilt.append(ImageRecord(platform=platform, arch=ARCHES[platform], runtime="", reference="",
                                       variant=variant, classes=classes, status="not_built", failures=[str(error)]))
    if not built and not variant:
        raise PackagingError(f"no image can be built: {'; '.join(record.failures[0] for record in unbuilt)}")
    return built


def _variant_groups(params: Params, engine: Engine, registry: Registry, inventory, bundle: Path,
                    scratch: Path, unbuilt: list[ImageRecord]) -> list[tuple[Manifest, list[Candidate]]]:
    """The images to build, by variant (the registered one first, on every platform; then each other variant a
    device class chose, on its classes' platforms), each variant's bundle exported once; a platform that cannot
    be built goes to ``unbuilt``."""
    import mlflow

    from tasks.packaging.class_images import image_targets

    settings = params.package
    registered = _buildable(engine, settings, registry, bundle, {platform: [] for platform in settings.platforms},
                            scratch / "registered", unbuilt)
    manifest = registered[0][1]
    tags = mlflow.MlflowClient().get_model_version(manifest.model_name, manifest.mlflow_version).tags
    targets = image_targets(tags, inventory, settings.platforms, manifest.variant)
    for candidate, _ in registered:
        candidate.record.classes = targets[manifest.variant].get(candidate.record.platform, [])
    groups = [(manifest, [candidate for candidate, _ in registered])]
    for variant, by_platform in targets.items():
        if variant == manifest.variant:
            continue
        folder = scratch / variant
        folder.mkdir()
        classes = sorted(name for names in by_platform.values() for name in names)
        variant_bundle = export_registered(params.mlflow, folder, settings.signing_key, alias=None,
                                           version=manifest.mlflow_version, device_class=classes[0])
        built = _buildable(engine, settings, registry, variant_bundle, by_platform, folder, unbuilt, variant)
        if built:
            groups.append((built[0][1], [candidate for candidate, _ in built]))
        log.info("device classes %s run %s: its image for %s too", ", ".join(classes), variant,
                 ", ".join(by_platform))
    return groups


def _push_passed(engine: Engine, records: list[ImageRecord]) -> None:
    for record in records:
        if record.status == "not_pushed" and not record.failures:
            repository, tag = record.reference.rsplit(":", 1)
            record.digest = docker_engine.push(engine.client, repository, tag)
            record.status = "pushed"


def package(params: Params, workspace: Workspace, version: str | None = None, alias: str | None = None,
            devices_path: Path = DEVICES_FILE) -> PackageReport:
    """Build, check, push and record the images of a registered model version (see the module doc).

    Raises :class:`PackagingError` when an image fails a gate (nothing pushed; the figures are recorded
    in a failed MLflow run and the report) and ``ServiceUnavailable`` when the registry, the engine or
    MLflow does not answer.
    """
    from tasks.registry.tracking import configure

    settings = params.package
    registry = Registry(settings.registry)
    registry.check()  # before a long build, not after it
    inventory = load_devices(devices_path)
    try:
        device = inventory.get(settings.check_device)
    except KeyError as error:
        raise ConfigError(f"package.check_device: {error.args[0]} (in {devices_path})") from None
    configure(params.mlflow)
    version, alias = _which_version(workspace, version, alias)
    engine = docker_engine.connect()
    try:
        with tempfile.TemporaryDirectory(prefix="edgeloop-package-") as scratch:
            (Path(scratch) / "registered").mkdir()
            bundle = export_registered(params.mlflow, Path(scratch) / "registered", settings.signing_key, alias=alias,
                                       version=version, large_variant=settings.large_variant)
            unbuilt: list[ImageRecord] = []
            groups = _variant_groups(params, engine, registry, inventory, bundle, Path(scratch), unbuilt)
            manifest = groups[0][0]
            run_id, zoo_model = _source_run(manifest)
            groups = [(variant_manifest, [replace(candidate, release=replace(
                candidate.release, architecture=_architecture(zoo_model, variant_manifest))) for candidate in group])
                for variant_manifest, group in groups]
            semver, reason = next_version(registry.releases(settings.repository),  # the registered variant's
                                          [candidate.release for candidate in groups[0][1]])
            log.info("packaging %s version %s (%s) as %s: %s", manifest.model_name, manifest.mlflow_version,
                     manifest.variant, semver, reason)
            records = [record for variant_manifest, candidates in groups
                       for record in _build_variant(engine, registry, settings, variant_manifest, candidates, semver,
                                                    (run_id, zoo_model), device)] + unbuilt
            failed = [record for record in records if record.failures]
            if not failed or settings.partial_release:  # else all or nothing: no release with an architecture missing
                _push_passed(engine, records)
    finally:
        engine.close()
    report = PackageReport(model_name=manifest.model_name, mlflow_version=manifest.mlflow_version,
                           variant=manifest.variant, version=str(semver), version_reason=reason,
                           created_at=utc_now(), images=records)
    record_in_mlflow(params.mlflow, settings, report, run_id)
    write_report(workspace, report)
    problems = "; ".join(f"{record.arch}: {' / '.join(record.failures)}" for record in failed)
    if failed and not settings.partial_release:
        raise PackagingError(f"{manifest.model_name} version {manifest.mlflow_version} was not shipped, nothing "
                             f"was pushed (package.partial_release is false): {problems}")
    if failed:
        log.warning("partial release (package.partial_release): %s version %s shipped without %s", manifest.model_name,
                    manifest.mlflow_version, problems)
    return report


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
        print(describe(package(params, Workspace(args.workspace), args.version, args.alias)))

    return report_user_errors(action)


if __name__ == "__main__":
    sys.exit(main())
