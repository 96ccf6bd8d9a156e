from pathlib import Path

import numpy as np

from tasks.config import Params
from tasks.convert import SourceModel, convert_variant, resolve_sources
from tasks.data import Dataset, PreparedData
from tasks.variants import VARIANTS

LINEAGE = {"labels": ["0"], "data_version": "x.dir", "git_commit": "c", "params_hash": "h", "created_at": "t",
           "zoo_model": "digits_cnn"}


def _params(tmp_path: Path) -> Params:
    return Params.model_validate({"convert": {"output_dir": str(tmp_path)}})


def _prepared(digits) -> PreparedData:
    small = Dataset(digits.x[:20], digits.y[:20], digits.labels)
    return PreparedData(small, small, small, small.x[:10], small)


def test_variant_that_fails_is_a_row_and_leaves_no_file(tmp_path, digits):
    corrupt = tmp_path / "baseline.h5"
    corrupt.write_bytes(b"not hdf5")
    result = convert_variant(VARIANTS["tflite_fp32"], SourceModel(corrupt, "post-training"), _params(tmp_path),
                             _prepared(digits), LINEAGE, {}, {})
    assert result.status == "failed" and result.error
    assert not (tmp_path / "tflite_fp32.tflite").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_variant_without_source_is_skipped_with_reason(tmp_path, digits):
    result = convert_variant(VARIANTS["tflite_int8_qat"], SourceModel(None, "", "no QAT model: strategy ptq"),
                             _params(tmp_path), _prepared(digits), LINEAGE, {}, {})
    assert result.status == "skipped" and "strategy ptq" in result.error


def test_converted_variant_gets_a_complete_sidecar(tmp_path, digits, tiny_model):
    import json

    loaded = {tmp_path / "baseline.h5": tiny_model}
    result = convert_variant(VARIANTS["tflite_int8"], SourceModel(tmp_path / "baseline.h5", "post-training"),
                             _params(tmp_path), _prepared(digits), LINEAGE, loaded, {})
    assert result.status == "ok", result.error
    sidecar = json.loads((tmp_path / "tflite_int8.tflite.json").read_text())
    for key in ("variant", "input", "output", "labels", "data_version", "git_commit", "params_hash", "created_at",
                "sha256", "sparsity", "size_bytes"):
        assert key in sidecar, key
    assert sidecar["input"]["dtype"] == "int8" and sidecar["input"]["scale"] > 0
    assert np.isclose(sidecar["sparsity"], 0.0, atol=0.01)


def test_resolve_sources_follows_the_train_summary(tmp_path):
    summary = {"baseline": {"file": "baseline.h5"}, "qat": {"file": None, "reason": "strategy ptq"},
               "pruning": {"sparsity": 0.8, "int8": {"method": "pqat", "file": "pruned_qat.h5"}}}
    sources = resolve_sources(summary, tmp_path)
    assert sources["baseline"].path == tmp_path / "baseline.h5"
    assert sources["qat"].path is None and "strategy ptq" in sources["qat"].reason
    assert sources["pruned_int8"].path == tmp_path / "pruned_qat.h5" and "80%" in sources["pruned_int8"].method
    summary["pruning"] = None
    assert "pruning disabled" in resolve_sources(summary, tmp_path)["pruned_int8"].reason
