"""Control-plane side of the model store: signing keys and signed bundles that devices install.

    edgeloop keys generate --dir DIR --name NAME         an Ed25519 key pair (private key 0600, never shipped)
    edgeloop bundle export --alias champion --key K      a signed bundle of a registered model version

A bundle is a ``.tar.gz`` with ``manifest.json``, ``manifest.sig`` and the payload (model file(s),
their sidecars and a real sample input with the labels the model gives it here): see
:mod:`edge.store.manifest`. The device side (:mod:`edge.store.model_store`) verifies and installs it.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.files import atomic_writer, sha256_file
from edge.runtime import RUNTIME_BY_SUFFIX, EdgeModel
from edge.schema import SchemaError
from edge.sidecar import read_sidecar, sidecar_path
from edge.signing import key_id, sign_manifest
from edge.store.health import runtime_options
from edge.store.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Manifest,
    ModelEntry,
    PayloadFile,
    RuntimeSettings,
    SampleCheck,
)
from tasks.config import PARAMS_FILE, MlflowParams, load_params
from tasks.entrypoint import report_user_errors, setup_logging
from tasks.errors import ConfigError
from tasks.registry.tracking import configure

log = logging.getLogger(__name__)
SAMPLE_FILE = "sample.npy"


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (private, PEM, mode 0600) and ``<name>.pub`` into ``directory``; never overwrite."""
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists; keys are never overwritten (pick another --name to rotate)")
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    log.info("generated signing key %s: private %s, public %s", key_id(key.public_key()), private_path, public_path)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 signing key at ``path``; a clear error for a missing, wrong or world-readable file."""
    if not Path(path).is_file():
        raise ConfigError(f"signing key {path} does not exist: create one with `edgeloop keys generate --name "
                          f"control-plane` (or point package.signing_key / EDGELOOP_SIGNING_KEY at yours)")
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"signing key {path} is unreadable or not an unencrypted PEM key ({error})") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an Ed25519 key ({type(key).__name__})")
    if Path(path).stat().st_mode & 0o077:
        log.warning("signing key %s is readable by other users: chmod 600 it", path)
    return key


def _payload(path: Path) -> PayloadFile:
    return PayloadFile(name=path.name, sha256=sha256_file(path), size_bytes=path.stat().st_size)


def build_manifest(version: str, model_name: str, mlflow_version: str, alias: str | None,
                   model_files: dict[str, Path], sample_path: Path, options: RuntimeSettings | None = None) -> Manifest:
    """Describe a bundle: ``model_files`` by role (``primary``, optional ``large``) with sidecars beside them, to
    be run in the runtime configuration ``options`` (None: the runtime's default)."""
    primary = read_sidecar(model_files["primary"])
    models, files = [], []
    for role, path in model_files.items():
        if path.suffix not in RUNTIME_BY_SUFFIX:
            raise ConfigError(f"{path}: not a model file ({sorted(RUNTIME_BY_SUFFIX)})")
        models.append(ModelEntry(file=path.name, role=role, runtime=RUNTIME_BY_SUFFIX[path.suffix],
                                 sidecar=read_sidecar(path)))
        files += [_payload(path), _payload(sidecar_path(path))]
    sample = np.load(sample_path, allow_pickle=False)
    outputs = EdgeModel.load(model_files["primary"], num_threads=1, options=runtime_options(options)).predict(sample)
    check = SampleCheck(file=sample_path.name, output_shape=list(outputs.shape), output_dtype=outputs.dtype.name,
                        expected_labels=[int(label) for label in outputs.argmax(axis=1)])
    return Manifest(version=version, model_name=model_name, mlflow_version=mlflow_version, alias=alias,
                    variant=primary["variant"], created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    labels=[str(label) for label in primary["labels"]],
                    input_shape=[int(d) for d in primary["input"]["shape"][1:]],
                    data_version=primary["data_version"], git_commit=primary["git_commit"],
                    params_hash=primary["params_hash"], models=models, sample=check,
                    files=files + [_payload(sample_path)], runtime_options=options)


def write_bundle(out: Path, manifest: Manifest, payload_dir: Path, private_key: Ed25519PrivateKey) -> Path:
    """Sign ``manifest`` and write the bundle ``out`` (.tar.gz) atomically: a reader never sees half of it."""
    manifest_bytes = manifest.to_bytes()
    members = [(MANIFEST_FILE, manifest_bytes), (SIGNATURE_FILE, sign_manifest(manifest_bytes, private_key))]
    members += [(entry.name, (payload_dir / entry.name).read_bytes()) for entry in manifest.files]
    with atomic_writer(out) as handle, tarfile.open(fileobj=handle, mode="w:gz") as archive:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o444, 0
            archive.addfile(info, io.BytesIO(content))
    return out


def bundle_from_files(out: Path, version: str, model_name: str, mlflow_version: str, alias: str | None,
                      model_files: dict[str, Path], sample: np.ndarray, private_key: Ed25519PrivateKey,
                      options: RuntimeSettings | None = None) -> Path:
    """A signed bundle from model files on disk (sidecars beside them) and a sample input batch."""
    with tempfile.TemporaryDirectory(prefix="edgeloop-bundle-") as scratch:
        payload_dir = Path(scratch)
        staged = {}
        for role, path in model_files.items():
            for source in (path, sidecar_path(path)):
                (payload_dir / source.name).write_bytes(source.read_bytes())
            staged[role] = payload_dir / path.name
        np.save(payload_dir / SAMPLE_FILE, np.asarray(sample, np.float32))
        manifest = build_manifest(version, model_name, mlflow_version, alias, staged, payload_dir / SAMPLE_FILE,
                                  options)
        return write_bundle(out, manifest, payload_dir, private_key)


def _model_file(folder: Path) -> Path:
    files = [path for path in folder.iterdir() if path.suffix in RUNTIME_BY_SUFFIX]
    if len(files) != 1:
        raise ConfigError(f"{folder} holds {len(files)} model files; expected exactly one")
    return files[0]


def chosen_variants(tags: dict[str, str]) -> dict[str, str]:
    """Device class -> the variant a registered version chose for it, from its ``device.<class>.variant`` tags
    (written by :func:`tasks.registry.device_choice.choice_tags`; ``none``: nothing for that class)."""
    return {key.removeprefix("device.").removesuffix(".variant"): value for key, value in tags.items()
            if key.startswith("device.") and key.endswith(".variant")}


def class_variant(tags: dict[str, str], device_class: str, name: str, version: str) -> str:
    """The variant a registered version chose for ``device_class`` (its ``device.<class>.variant`` tag)."""
    variants = chosen_variants(tags)
    chosen = variants.get(device_class)
    if chosen is None:
        raise ConfigError(f"{name} version {version} chose no variant for device class {device_class!r} (it knows "
                          f"{', '.join(sorted(variants)) or 'no classes: registered before per-class releases'})")
    if chosen == "none":
        raise ConfigError(f"{name} version {version} has no variant for device class {device_class!r}: "
                          f"{tags.get(f'device.{device_class}.rule', 'none')} rule; the class stays on its version")
    return chosen


def class_runtime_settings(tags: dict[str, str], device_class: str) -> RuntimeSettings | None:
    """The runtime configuration a registered version's bundle asks ``device_class`` to run its variant in (its
    ``device.<class>.runtime_options`` tag, written when the class was measured best in a non-default one)."""
    raw = tags.get(f"device.{device_class}.runtime_options")
    if raw is None:
        return None
    try:
        return RuntimeSettings.from_json(raw)
    except SchemaError as error:
        raise ConfigError(f"tag device.{device_class}.runtime_options is not a runtime configuration "
                          f"({error.problems[0][1]}): re-run the register stage") from error


def bundle_file_name(name: str, version: str, tags: dict[str, str], device_class: str | None = None) -> str:
    """The file a registered version's bundle for ``device_class`` is exported as: ``<model>-v<version>.tar.gz``
    when the class runs the registered variant in its runtime's default configuration (the version's own
    bundle), ``<model>-v<version>-<variant>[-<config>].tar.gz`` otherwise; classes that chose the same share it."""
    if device_class is None:
        return f"{name}-v{version}.tar.gz"
    variant = class_variant(tags, device_class, name, version)
    options = class_runtime_settings(tags, device_class)
    if variant == tags.get("variant") and options is None:
        return f"{name}-v{version}.tar.gz"
    return f"{name}-v{version}-{variant}{f'-{options.config}' if options else ''}.tar.gz"


def export_registered(settings: MlflowParams, out_dir: Path, private_key_path: Path, alias: str | None = "champion",
                      version: str | None = None, large_variant: str | None = None,
                      device_class: str | None = None) -> Path:
    """A signed bundle of a registered model version (by ``alias``, or by ``version`` number) in ``out_dir``.

    ``large_variant`` adds that variant of the same MLflow run as the cascade's second stage (for
    example ``tflite_fp32`` behind an int8 primary). The health-check sample is the version's input example.
    ``device_class``: the bundle of the variant the version chose for that class (``device.<class>.variant``), in
    the runtime configuration measured best on it (``device.<class>.runtime_options``), named by
    :func:`bundle_file_name`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    private_key = load_private_key(private_key_path)
    configure(settings)
    client, name = mlflow.MlflowClient(), settings.registered_model
    try:
        model_version = (client.get_model_version(name, version) if version is not None
                         else client.get_model_version_by_alias(name, alias))
    except MlflowException as error:
        wanted = f"version {version}" if version is not None else f"alias {alias!r}"
        raise ConfigError(f"registered model {name!r} has no {wanted} at {mlflow.get_tracking_uri()} "
                          f"({error.message.splitlines()[0]})") from error
    with tempfile.TemporaryDirectory(prefix="edgeloop-export-") as scratch:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{model_version.version}",
                                                         dst_path=str(Path(scratch) / "model")))
        sample = Model.load(str(local)).load_input_example(str(local))
        if sample is None:
            raise ConfigError(f"{name} version {model_version.version} has no input example (registered before "
                              "bundles existed): re-run the register stage")
        model_files = {"primary": _model_file(local / "artifacts" / next((local / "artifacts").iterdir()).name)}
        tags, options = model_version.tags, None
        if device_class is not None:
            variant = class_variant(tags, device_class, name, str(model_version.version))
            options = class_runtime_settings(tags, device_class)
            if variant != tags.get("variant"):
                chosen = mlflow.artifacts.download_artifacts(run_id=model_version.run_id,
                                                             artifact_path=f"models/{variant}",
                                                             dst_path=str(Path(scratch) / variant))
                model_files["primary"] = _model_file(Path(chosen))
        if large_variant is not None:
            large = Path(mlflow.artifacts.download_artifacts(run_id=model_version.run_id,
                                                             artifact_path=f"models/{large_variant}",
                                                             dst_path=str(Path(scratch) / "large")))
            model_files["large"] = _model_file(large)
        out = out_dir / bundle_file_name(name, str(model_version.version), tags, device_class)
        bundle_from_files(out, f"v{model_version.version}", name, str(model_version.version),
                          alias if version is None else None, model_files, np.asarray(sample), private_key, options)
    log.info("exported %s version %s as %s", name, model_version.version, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``edgeloop keys generate`` and ``edgeloop bundle export``."""
    parser = argparse.ArgumentParser(prog="edgeloop", description="signing keys and signed model bundles")
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", help="signing keys").add_subparsers(dest="action", required=True)
    generate = keys.add_parser("generate", help="generate an Ed25519 key pair")
    generate.add_argument("--dir", type=Path, default=Path("keys"), help="where to write it (default: %(default)s)")
    generate.add_argument("--name", required=True, help="key name, e.g. control-plane-2026-11")
    bundle = commands.add_parser("bundle", help="signed bundles").add_subparsers(dest="action", required=True)
    export = bundle.add_parser("export", help="export a registered model version as a signed bundle")
    chosen = export.add_mutually_exclusive_group()
    chosen.add_argument("--alias", default="champion", help="registered model alias (default: %(default)s)")
    chosen.add_argument("--version", help="registered model version number instead of an alias")
    export.add_argument("--key", type=Path, required=True, help="private signing key (PEM)")
    export.add_argument("--out", type=Path, default=Path("bundles"), help="output folder (default: %(default)s)")
    export.add_argument("--large-variant", help="add this variant of the same run as the cascade's second stage")
    export.add_argument("--device-class", help="the variant the version chose for this device class (devices.yaml "
                        "name) instead of the registered one")
    export.add_argument("--params", type=Path, default=PARAMS_FILE, help="parameter file (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()

    def action() -> None:
        if args.command == "keys":
            private_path, public_path = generate_keypair(args.dir, args.name)
            print(f"private key: {private_path} (keep it on the control plane only)\npublic key:  {public_path}")
        else:
            alias = None if args.version else args.alias
            print(export_registered(load_params(args.params).mlflow, args.out, args.key, alias, args.version,
                                    args.large_variant, args.device_class))

    return report_user_errors(action)
