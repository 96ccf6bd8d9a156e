"""Load a verified model version and prove it works before it serves: the health check.

A version is healthy when every model file loads in its runtime and the primary model turns the
manifest's sample input into outputs of the right shape and dtype, finite, and with the labels the
control plane saw (up to the manifest's agreement floor: int8 numerics differ a little between CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import BundleRefused
from edge.runtime import EdgeModel, RuntimeOptions
from edge.store.manifest import Manifest, RuntimeSettings


@dataclass(frozen=True)
class LoadedVersion:
    """A model version ready to serve: its manifest and its loaded model(s)."""

    version: str
    manifest: Manifest
    folder: Path
    primary: EdgeModel
    large: EdgeModel | None = None


def read_sample(folder: Path, manifest: Manifest) -> np.ndarray:
    """The manifest's sample input batch (float32, batch first)."""
    try:
        sample = np.load(folder / manifest.sample.file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise BundleRefused("health_check", f"sample input {manifest.sample.file} is unreadable ({error})") from error
    return np.asarray(sample, np.float32)


def check_outputs(outputs: np.ndarray, manifest: Manifest) -> None:
    """Raise ``BundleRefused('health_check')`` when the sample's outputs are not what the manifest says."""
    check = manifest.sample
    if list(outputs.shape) != check.output_shape or outputs.dtype.name != check.output_dtype:
        raise BundleRefused("health_check", f"sample output is {outputs.dtype.name}{list(outputs.shape)}, "
                                            f"the manifest expects {check.output_dtype}{check.output_shape}")
    if not np.all(np.isfinite(outputs)):
        raise BundleRefused("health_check", "sample output holds NaN or Inf")
    agreement = float(np.mean(outputs.argmax(axis=1) == np.asarray(check.expected_labels)))
    if agreement < check.min_label_agreement:
        raise BundleRefused("health_check", f"sample labels agree {agreement:.0%} with the control plane's, "
                                            f"below the manifest's {check.min_label_agreement:.0%}")


def runtime_options(chosen: RuntimeSettings | None) -> RuntimeOptions:
    """The delegates and providers a manifest's ``runtime_options`` ask for (None: the runtime's defaults)."""
    if chosen is None:
        return RuntimeOptions()
    return RuntimeOptions(xnnpack=chosen.xnnpack, onnx_providers=tuple(chosen.onnx_providers))


def load_and_check(folder: Path, manifest: Manifest, num_threads: int | None = None) -> LoadedVersion:
    """Load every model of ``manifest`` from ``folder`` (files already verified), in the runtime configuration
    the manifest names for its class, and health-check it."""
    options = runtime_options(manifest.runtime_options)
    try:
        models = {entry.role: EdgeModel.load(folder / entry.file, num_threads=num_threads, options=options)
                  for entry in manifest.models}
        outputs = models["primary"].predict(read_sample(folder, manifest))
    except BundleRefused:
        raise
    except Exception as error:  # EdgeError, or whatever a runtime raises when invoking a model that loaded
        raise BundleRefused("health_check", f"version {manifest.version} does not run: "
                                            f"{type(error).__name__}: {error}") from error
    check_outputs(outputs, manifest)
    return LoadedVersion(manifest.version, manifest, folder, models["primary"], models.get("large"))
