"""The ``convert`` stage: build every enabled variant from the trained Keras models.

Each exporter is wrapped alike: timed, written atomically, reloaded in its device runtime to read
its tensor details, and given a metadata sidecar. A variant that fails is a row with its error,
never a crashed stage or a half-written file. Results go to ``<output_dir>/conversion.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge.runtime import EdgeModel
from edge.sidecar import sidecar_path, write_sidecar
from tasks import exporters
from tasks.config import Params
from tasks.data import PreparedData, load_prepared
from tasks.lineage import directory_md5, git_commit, utc_now
from tasks.train import read_summary
from tasks.variants import VARIANTS, Variant

log = logging.getLogger(__name__)
RESULTS_FILE = "conversion.json"


@dataclass
class ConversionResult:
    variant: str
    status: str  # ok | failed | skipped
    file: str | None = None
    method: str = ""
    error: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class SourceModel:
    """A trained Keras model file a variant is built from, or why there is none."""

    path: Path | None
    method: str
    reason: str = ""


def resolve_sources(summary: dict[str, Any], model_dir: Path) -> dict[str, SourceModel]:
    """Map each variant ``source`` to the model file the train stage produced for it."""
    qat = summary.get("qat") or {}
    pruning = summary.get("pruning")
    sources = {"baseline": SourceModel(model_dir / summary["baseline"]["file"], "post-training")}
    sources["qat"] = (SourceModel(model_dir / qat["file"], f"qat ({qat.get('mode', 'full')})") if qat.get("file")
                      else SourceModel(None, "", f"no QAT model: {qat.get('reason', 'not trained')}"))
    if pruning and pruning.get("error"):
        sources["pruned_int8"] = SourceModel(None, "", f"pruning failed: {pruning['error']}")
    elif pruning:
        int8 = pruning["int8"]
        sources["pruned_int8"] = SourceModel(model_dir / int8["file"],
                                             f"{int8['method']} at {pruning['sparsity']:.0%} sparsity")
    else:
        sources["pruned_int8"] = SourceModel(None, "", "pruning disabled (prune.enabled: false)")
    return sources


def export_bytes(variant: Variant, model: Any, params: Params, prepared: PreparedData,
                 onnx_cache: dict[str, bytes]) -> bytes:
    if variant.runtime == "tflite":
        return exporters.tflite_bytes(model, variant.precision, prepared.representative)
    if "fp32" not in onnx_cache:
        onnx_cache["fp32"] = exporters.onnx_bytes(model, params.convert.onnx_opset)
    if variant.precision == "fp32":
        return onnx_cache["fp32"]
    return exporters.onnx_int8_bytes(onnx_cache["fp32"], prepared.representative)


def write_model_file(path: Path, content: bytes) -> None:
    """Atomic write: a crash leaves the old file or none, never a truncated model."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(content)
    os.replace(partial, path)


def sidecar_metadata(variant: Variant, model_file: Path, source: SourceModel, lineage: dict[str, Any],
                     sparsity: float) -> dict[str, Any]:
    loaded = EdgeModel.load(model_file)  # proves the file loads in its device runtime
    return {
        "variant": variant.name, "runtime": variant.runtime, "precision": variant.precision,
        "method": source.method, "source_model": source.path.name if source.path else None,
        "input": asdict(loaded.input), "output": asdict(loaded.output), "sparsity": sparsity, **lineage,
    }


def convert_variant(variant: Variant, source: SourceModel, params: Params, prepared: PreparedData,
                    lineage: dict[str, Any], loaded: dict[Path, Any], onnx_cache: dict[str, bytes]) -> ConversionResult:
    """Build one variant; any failure becomes the row's error and leaves no file behind."""
    if source.path is None:
        return ConversionResult(variant.name, "skipped", error=source.reason)
    out_dir = Path(params.convert.output_dir)
    model_file = out_dir / variant.filename()
    started = time.perf_counter()
    try:
        from tasks.optimize import kernel_sparsity, load_trained

        if source.path not in loaded:
            loaded[source.path] = load_trained(source.path)
        model = loaded[source.path]
        write_model_file(model_file, export_bytes(variant, model, params, prepared, onnx_cache))
        write_sidecar(model_file, sidecar_metadata(variant, model_file, source, lineage, kernel_sparsity(model)))
    except Exception as error:  # a failed variant is a row, not a crashed pipeline
        log.exception("variant %s failed", variant.name)
        model_file.unlink(missing_ok=True)
        sidecar_path(model_file).unlink(missing_ok=True)
        return ConversionResult(variant.name, "failed", method=source.method,
                                error=f"{type(error).__name__}: {error}"[:500],
                                seconds=time.perf_counter() - started)
    return ConversionResult(variant.name, "ok", model_file.name, source.method, seconds=time.perf_counter() - started)


def stage_outputs(out_dir: Path) -> list[Path]:
    """Every file this stage may have written in ``out_dir`` (and nothing else there)."""
    names = [RESULTS_FILE]
    for variant in VARIANTS.values():
        names += [variant.filename(), sidecar_path(Path(variant.filename())).name, f".{variant.filename()}.partial"]
    return [out_dir / name for name in names]


def lineage_record(params: Params, labels: list[str]) -> dict[str, Any]:
    return {"labels": labels, "data_version": directory_md5(Path(params.data.output_dir)),
            "git_commit": git_commit(), "params_hash": params.params_hash(), "created_at": utc_now(),
            "zoo_model": params.train.model}


def convert_all(params: Params, prepared: PreparedData) -> list[ConversionResult]:
    """Build every enabled variant and write ``conversion.json``."""
    out_dir = Path(params.convert.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in stage_outputs(out_dir):  # e.g. variants switched off since the last run
        stale.unlink(missing_ok=True)
    model_dir = Path(params.train.output_dir)
    sources = resolve_sources(read_summary(model_dir), model_dir)
    lineage = lineage_record(params, prepared.train.labels)
    loaded: dict[Path, Any] = {}
    onnx_cache: dict[str, bytes] = {}
    results = [convert_variant(VARIANTS[name], sources[VARIANTS[name].source], params, prepared, lineage, loaded,
                               onnx_cache) for name in params.convert.enabled_variants]
    (out_dir / RESULTS_FILE).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return results


def read_results(out_dir: Path) -> list[ConversionResult]:
    from tasks.cli import read_stage_output

    return [ConversionResult(**row) for row in read_stage_output(out_dir / RESULTS_FILE, "convert")]


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_stage

    parser = argparse.ArgumentParser(description="convert stage: build the variant matrix")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    def stage(params: Params) -> None:
        for result in convert_all(params, load_prepared(Path(params.data.output_dir))):
            print(f"{result.variant:20s} {result.status:8s} {result.file or result.error}")

    return run_stage(args.params, stage)


if __name__ == "__main__":
    # run the importable module, not __main__, so the error classes raised are the ones tasks.cli catches
    from tasks.convert import main as stage_main

    raise SystemExit(stage_main())
