"""The ``convert`` stage: build every enabled variant from the trained Keras models.

Each exporter is wrapped alike: timed, written atomically, reloaded in its device runtime to read
its tensor details, and given a metadata sidecar. A variant that fails is a row with its error,
never a crashed stage or a half-written file. The rows are the stage's :class:`ConversionResult` record.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge.files import atomic_write_bytes
from edge.runtime import EdgeModel
from edge.sidecar import sidecar_path, write_sidecar
from tasks.config import ConvertParams, Params
from tasks.contracts import (
    ConversionResult,
    PreparedData,
    TrainSummary,
    Workspace,
    clear_stage_outputs,
    read_prepared,
    read_train_summary,
    write_conversion,
)
from tasks.entrypoint import run_stage, stage_arguments
from tasks.lineage import directory_md5, git_commit, utc_now
from tasks.model import exporters, heads
from tasks.model.keras_io import kernel_sparsity, load_trained
from tasks.model.weight_structure import weight_structure
from tasks.variants import VARIANTS, Variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceModel:
    """A trained Keras model file a variant is built from, or why there is none."""

    path: Path | None
    method: str
    reason: str = ""


def resolve_sources(summary: TrainSummary, workspace: Workspace) -> dict[str, SourceModel]:
    """Map each variant ``source`` to the model file the train stage produced for it."""
    qat, pruning = summary.qat, summary.pruning
    sources = {"baseline": SourceModel(workspace.keras_dir / summary.baseline.file, "post-training")}
    sources["qat"] = (SourceModel(workspace.keras_dir / qat.file, f"qat ({qat.mode or 'full'})") if qat.file
                      else SourceModel(None, "", f"no QAT model: {qat.reason or 'not trained'}"))
    if pruning is None:
        sources["pruned_int8"] = SourceModel(None, "", "pruning disabled (prune.enabled: false)")
    elif pruning.int8 is None:
        sources["pruned_int8"] = SourceModel(None, "", f"pruning failed: {pruning.error}")
    else:
        sources["pruned_int8"] = SourceModel(workspace.keras_dir / pruning.int8.file,
                                             f"{pruning.int8.method} at {pruning.sparsity:.0%} sparsity")
    clustered = {summary.of: summary for summary in summary.clustering}
    for of, source in (("baseline", "clustered_int8"), ("pruned", "pruned_clustered_int8")):
        found = clustered.get(of)
        if found is None:
            sources[source] = SourceModel(None, "", "clustering not run (cluster.enabled: false, or the variant is "
                                                    "not in convert.variants)")
        elif found.int8 is None:
            sources[source] = SourceModel(None, "", f"clustering failed: {found.error}")
        else:
            sources[source] = SourceModel(workspace.keras_dir / found.int8.file,
                                          f"{found.int8.method} at {found.clusters} clusters"
                                          + (f", {found.sparsity:.0%} sparsity" if of == "pruned" else ""))
    return sources


def export_bytes(variant: Variant, model: Any, params: ConvertParams, prepared: PreparedData,
                 onnx_cache: dict[str, bytes]) -> bytes:
    if variant.runtime == "tflite":
        return exporters.tflite_bytes(model, variant.precision, prepared.representative)
    if "fp32" not in onnx_cache:
        onnx_cache["fp32"] = exporters.onnx_bytes(model, params.onnx_opset)
    if variant.precision == "fp32":
        return onnx_cache["fp32"]
    return exporters.onnx_int8_bytes(onnx_cache["fp32"], prepared.representative, variant.onnx_scheme)


def sidecar_metadata(variant: Variant, model_file: Path, source: SourceModel, lineage: dict[str, Any],
                     sparsity: float, trained_head: str) -> dict[str, Any]:
    loaded = EdgeModel.load(model_file)  # proves the file loads in its device runtime
    return {
        "variant": variant.name, "description": variant.description, "runtime": variant.runtime,
        "precision": variant.precision,
        "method": source.method, "source_model": source.path.name if source.path else None,
        "input": asdict(loaded.input), "output": asdict(loaded.output), "sparsity": sparsity,
        "weight_structure": weight_structure(model_file),  # read back from the file: pruning/clustering kept?
        # what the model file emits (always class probabilities) and what the trained head emitted
        "outputs": "probabilities",
        "trained_head": "logits, softmax appended for export" if trained_head == "logits" else "softmax",
        **lineage,
    }


def convert_variant(variant: Variant, source: SourceModel, params: ConvertParams, prepared: PreparedData,
                    workspace: Workspace, lineage: dict[str, Any], loaded: dict[Path, Any],
                    onnx_cache: dict[str, bytes], trained_head: heads.OutputKind = "probabilities") -> ConversionResult:
    """Build one variant; any failure becomes the row's error and leaves no file behind."""
    if source.path is None:
        return ConversionResult(variant=variant.name, status="skipped", error=source.reason)
    model_file = workspace.variant_file(variant.name)
    started = time.perf_counter()
    try:
        if source.path not in loaded:
            loaded[source.path] = load_trained(source.path)
        model = loaded[source.path]
        exported = heads.with_probabilities(model, trained_head)  # every variant emits probabilities
        atomic_write_bytes(model_file, export_bytes(variant, exported, params, prepared, onnx_cache))
        write_sidecar(model_file, sidecar_metadata(variant, model_file, source, lineage, kernel_sparsity(model),
                                                   trained_head))
    except Exception as error:  # converters raise anything; a failed variant is a row, not a crashed pipeline
        log.exception("variant %s failed", variant.name)
        model_file.unlink(missing_ok=True)
        sidecar_path(model_file).unlink(missing_ok=True)
        return ConversionResult(variant=variant.name, status="failed", method=source.method,
                                error=f"{type(error).__name__}: {error}"[:500], seconds=time.perf_counter() - started)
    return ConversionResult(variant=variant.name, status="ok", file=model_file.name, method=source.method,
                            seconds=time.perf_counter() - started)


def lineage_record(params_hash: str, zoo_model: str, workspace: Workspace, labels: list[str]) -> dict[str, Any]:
    """What every sidecar records of where its model came from: data, code, parameters and zoo entry."""
    return {"labels": labels, "data_version": directory_md5(workspace.prepared_dir),
            "git_commit": git_commit(), "params_hash": params_hash, "created_at": utc_now(),
            "zoo_model": zoo_model}


def convert_all(params: Params, prepared: PreparedData, summary: TrainSummary,
                workspace: Workspace) -> list[ConversionResult]:
    """Build every enabled variant and write the conversion record."""
    clear_stage_outputs(workspace, "convert")  # e.g. variants switched off since the last run
    workspace.variants_dir.mkdir(parents=True, exist_ok=True)
    sources = resolve_sources(summary, workspace)
    lineage = lineage_record(params.params_hash(), params.train.model, workspace, prepared.train.labels)
    loaded: dict[Path, Any] = {}
    onnx_cache: dict[str, bytes] = {}
    results = [convert_variant(VARIANTS[name], sources[VARIANTS[name].source], params.convert, prepared, workspace,
                               lineage, loaded, onnx_cache, summary.output) for name in params.convert.enabled_variants]
    write_conversion(workspace, results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = stage_arguments(argparse.ArgumentParser(
        prog="edgeloop convert", description="convert stage: build the variant matrix"))
    args = parser.parse_args(argv)

    def stage(params: Params, workspace: Workspace) -> None:
        for result in convert_all(params, read_prepared(workspace), read_train_summary(workspace), workspace):
            print(f"{result.variant:20s} {result.status:8s} {result.file or result.error}")

    return run_stage(args, stage)


if __name__ == "__main__":
    raise SystemExit(main())
