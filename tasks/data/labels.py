"""``edgeloop labels import``: labels for collected device samples become a new data version.

    edgeloop labels import LABELS_FILE [--params P] [--repo .] [--workspace .] [--classes A,B,...] [--no-commit]

Labels files: CSV with a ``sample_id,label`` header, JSON ``{sample_id: label}`` (or a list of
``{"sample_id": ..., "label": ...}`` records) or JSON Lines of such records. A label is a class name
(from the prepare stage's ``dataset.json`` in ``--workspace``, or ``--classes``), else a class index.
Ids are joined with the raw inputs of the drift check's window files (:mod:`tasks.monitoring.collected`:
``x`` rows named by ``x_sample_id``) into ONE new labelled file (:mod:`tasks.data.labelled`); ids labelled before are
skipped, so importing a file twice adds nothing. The folder is then versioned like raw data
(:func:`tasks.data.versioning.track_version`). Nothing is dropped silently: every skipped id and
rejected row is counted and listed; an id given two different labels refuses the whole file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from tasks.config import PARAMS_FILE, load_params
from tasks.contracts import DatasetInfo, Workspace
from tasks.data.labelled import labelled_so_far, write_labelled
from tasks.data.versioning import DataVersion, track_version
from tasks.entrypoint import report_user_errors, setup_logging
from tasks.errors import ConfigError, DataError, StageError
from tasks.monitoring.collected import window_files

SHOWN_IDS = 5  # ids listed per category in the report (the counts are always complete)


@dataclass
class LabelImport:
    """What one import did with every sample id of the labels file."""

    labels_file: Path
    sample_ids: int  # distinct ids in the file
    written: Path | None = None
    imported: list[str] = field(default_factory=list)
    already_labelled: list[str] = field(default_factory=list)  # same class as before: nothing to do
    relabelled: list[str] = field(default_factory=list)  # another class than before: the earlier label is kept
    unknown: list[str] = field(default_factory=list)  # in no window file
    without_raw: list[str] = field(default_factory=list)  # in a window, but the device kept no raw input
    rejected: list[str] = field(default_factory=list)  # rows naming no known class, each with its reason
    no_windows: bool = False

    def report(self) -> str:
        lines = [f"{self.labels_file}: {self.sample_ids} sample id(s)",
                 f"  imported: {len(self.imported)}" + (f" -> {self.written}" if self.written else "")]
        for title, ids in (("already labelled, skipped", self.already_labelled),
                           ("already labelled with another class, earlier label kept", self.relabelled),
                           ("in no window file, skipped", self.unknown),
                           ("no raw input kept by the device, skipped", self.without_raw)):
            if ids:
                shown = ", ".join(ids[:SHOWN_IDS]) + (", ..." if len(ids) > SHOWN_IDS else "")
                lines.append(f"  {title}: {len(ids)} ({shown})")
        if self.no_windows and self.unknown:
            lines.append("  (there are no window files yet: run the drift check first, e.g. `edgeloop drift-check`)")
        if self.rejected:
            lines.append(f"  rejected rows: {len(self.rejected)}")
            lines += [f"    {reason}" for reason in self.rejected[:2 * SHOWN_IDS]]
        return "\n".join(lines)


class _Pairs(list):
    """A JSON object as its (key, value) pairs, so a key given twice is seen, not silently overwritten."""


def _json_rows(text: str, path: Path) -> list[tuple[str, object, str]]:
    try:
        document = json.loads(text, object_pairs_hook=_Pairs)
    except ValueError as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    if isinstance(document, _Pairs):
        return [(str(key), label, f"key {key!r}") for key, label in document]
    if isinstance(document, list):
        return [_record(item, f"item {index}", path) for index, item in enumerate(document)]
    raise DataError(f"{path} must hold an object {{sample_id: label}} or a list of sample_id/label records")


def _record(item: object, where: str, path: Path) -> tuple[str, object, str]:
    fields = dict(item) if isinstance(item, _Pairs) else {}
    if "sample_id" in fields and "label" in fields:
        return "" if fields["sample_id"] is None else str(fields["sample_id"]), fields["label"], where
    if len(fields) == 1:  # {"<sample id>": label}
        (sample_id, label), = fields.items()
        return str(sample_id), label, where
    raise DataError(f"{path} {where}: expected {{\"sample_id\": ..., \"label\": ...}}, got {item!r}")


def _jsonl_rows(text: str, path: Path) -> list[tuple[str, object, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            item = json.loads(line, object_pairs_hook=_Pairs) if line.strip() else None
        except ValueError as error:
            raise DataError(f"{path} line {number} is not valid JSON ({error})") from None
        if item is not None:
            rows.append(_record(item, f"line {number}", path))
    return rows


def _csv_rows(text: str, path: Path) -> list[tuple[str, object, str]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    if not {"sample_id", "label"} <= set(header):
        raise DataError(f"{path} needs a header with columns sample_id and label, got {header}")
    reader.fieldnames = header
    return [((row["sample_id"] or "").strip(), (row["label"] or "").strip(), f"line {reader.line_num}")
            for row in reader]


def read_labels_file(path: Path) -> tuple[dict[str, tuple[object, str]], list[str]]:
    """Sample id -> (label as given, where in the file), and where rows lack an id; conflicts are refused."""
    readers = {".csv": _csv_rows, ".json": _json_rows, ".jsonl": _jsonl_rows, ".ndjson": _jsonl_rows}
    if path.suffix.lower() not in readers:
        raise DataError(f"{path}: labels files are .csv (sample_id,label), .json or .jsonl")
    if not path.is_file():
        raise DataError(f"labels file {path} not found")
    text = path.read_text(encoding="utf-8-sig")
    labels: dict[str, tuple[object, str]] = {}
    conflicts, without_id = [], []
    for sample_id, label, where in readers[path.suffix.lower()](text, path):
        if not sample_id:
            without_id.append(where)
        elif sample_id in labels and str(labels[sample_id][0]) != str(label):
            conflicts.append(f"{sample_id!r}: {labels[sample_id][0]!r} ({labels[sample_id][1]}) and {label!r} "
                             f"({where})")
        else:
            labels[sample_id] = (label, where)
    if conflicts:
        raise DataError(f"{path} gives {len(conflicts)} sample id(s) two different labels, e.g. "
                        f"{'; '.join(conflicts[:SHOWN_IDS])}; settle them and import again (nothing was written)")
    return labels, without_id


def class_index(label: object, classes: list[str]) -> int | None:
    """The class ``label`` means: a class name first, else a whole-number index; None when neither."""
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label if 0 <= label < len(classes) else None
    if isinstance(label, str):
        if label in classes:
            return classes.index(label)
        if re.fullmatch(r"[0-9]+", label) and int(label) < len(classes):
            return int(label)
    return None


def find_raw_inputs(collected_dir: Path, wanted: set[str]) -> tuple[dict[str, np.ndarray], set[str]]:
    """Raw input rows of the ``wanted`` ids from the window files, and the wanted ids seen without one."""
    found: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for path in window_files(collected_dir):
        try:
            with np.load(path, allow_pickle=False) as archive:
                hits = wanted & set(archive["sample_id"].tolist())
                seen |= hits
                if not hits - found.keys() or "x_sample_id" not in archive.files:
                    continue
                x_ids, x = archive["x_sample_id"].tolist(), archive["x"]
                if len(x_ids) != len(x):
                    raise ValueError(f"x_sample_id names {len(x_ids)} rows, x has {len(x)}")
                for row, sample_id in enumerate(x_ids):
                    if sample_id in hits and sample_id not in found:
                        found[sample_id] = x[row]
        except (OSError, ValueError, KeyError, EOFError) as error:
            raise DataError(f"window file {path} cannot be read ({error}); move it out of {path.parent} and "
                            "import again") from None
    return found, seen - found.keys()


def _check_shapes(rows: list[np.ndarray], expected: tuple[int, ...] | None, source: str) -> None:
    shapes = sorted({row.shape for row in rows})
    if len(shapes) > 1 or (expected is not None and shapes[0] != tuple(expected)):
        raise DataError(f"the samples' raw inputs have shape(s) {shapes}, but {source} has {expected}; import the "
                        "labels of one model's samples at a time (nothing was written)")


def _sort_rows(result: LabelImport, labels: dict[str, tuple[object, str]], classes: list[str],
               earlier: dict[str, int]) -> dict[str, int]:
    """The rows to join (id -> class index); the others go to ``result`` as rejected or already labelled."""
    new: dict[str, int] = {}
    for sample_id, (label, where) in labels.items():
        index = class_index(label, classes)
        if index is None:
            shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
            result.rejected.append(f"{where}: sample {sample_id!r}: label {label!r} is not a class name or index "
                                   f"0..{len(classes) - 1} (classes: {shown})")
        elif sample_id in earlier:
            (result.already_labelled if earlier[sample_id] == index else result.relabelled).append(sample_id)
        else:
            new[sample_id] = index
    return new


def import_labels(labels_file: Path, collected_dir: Path, labelled_dir: Path, classes: list[str],
                  input_shape: tuple[int, ...] | None = None, now: datetime | None = None) -> LabelImport:
    """Join the labels with the windows' raw inputs and write the new samples as one labelled file.

    Args:
        labels_file: CSV / JSON / JSONL labels (see the module docstring).
        collected_dir: ``drift.collected_dir``, whose ``windows/`` the drift check fills.
        labelled_dir: ``retrain.labelled_dir``; earlier files there are never changed.
        classes: class names in index order (what ``y`` indexes).
        input_shape: the model input shape the raw inputs must have (None: not checked).
        now: the file's time stamp (default: the current UTC time).
    """
    labels, without_id = read_labels_file(labels_file)
    result = LabelImport(labels_file, len(labels), rejected=[f"{where}: no sample id" for where in without_id])
    earlier, earlier_shape = labelled_so_far(labelled_dir, classes)
    new = _sort_rows(result, labels, classes, earlier)
    raw, without_raw = find_raw_inputs(collected_dir, set(new))
    result.no_windows = not window_files(collected_dir)
    result.unknown = [sample_id for sample_id in new if sample_id not in raw and sample_id not in without_raw]
    result.without_raw = [sample_id for sample_id in new if sample_id in without_raw]
    result.imported = [sample_id for sample_id in new if sample_id in raw]
    if not result.imported:
        return result
    joined = [raw[sample_id] for sample_id in result.imported]
    _check_shapes(joined, earlier_shape, f"the earlier labelled files in {labelled_dir}")
    _check_shapes(joined, input_shape, "the prepared dataset (dataset.json)")
    result.written = write_labelled(labelled_dir, np.stack(joined), np.array([new[i] for i in result.imported]),
                                    result.imported, classes, now or datetime.now(UTC))
    return result


def dataset_classes(workspace: Workspace, classes_option: str | None) -> tuple[list[str], tuple[int, ...] | None]:
    """Class names (and the input shape to check) from ``--classes`` or the prepared ``dataset.json``."""
    if classes_option:
        classes = [name.strip() for name in classes_option.split(",")]
        if "" in classes or len(set(classes)) != len(classes):
            raise ConfigError(f"--classes {classes_option!r} must list distinct, non-empty class names")
        return classes, None
    path = workspace.dataset_file
    if not path.is_file():
        raise DataError(f"class names unknown: {path} not found; run the prepare stage (`edgeloop prepare`) or "
                        "pass --classes NAME,NAME,... in index order")
    try:
        info = DatasetInfo.model_validate_json(path.read_text())
    except (OSError, ValidationError) as error:
        raise DataError(f"{path} cannot be read ({str(error).splitlines()[0]}); re-run the prepare stage or pass "
                        "--classes") from None
    return info.labels, tuple(info.input_shape)


def version_labelled(result: LabelImport, labelled_dir: Path, repo: Path) -> DataVersion | None:
    """Commit the labelled folder as a data version (also after an earlier failed attempt); None: no files."""
    if not any(labelled_dir.glob("*.npz")):
        return None
    try:
        return track_version(labelled_dir.resolve(), repo,
                             f"labels: {len(result.imported)} sample(s) from {result.labels_file.name}")
    except StageError as error:
        kept = f"{result.written} is written" if result.written else f"the files in {labelled_dir} are kept"
        raise StageError(f"{error}\n{kept}, but {labelled_dir} is not a committed data version yet; once fixed, run "
                         f"`edgeloop labels import {result.labels_file}` again: it adds no sample twice and commits "
                         "the folder (--no-commit only writes files)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop labels", description="labelled device samples")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = actions.add_parser("import", help="join a labels file with the collected samples; commit a data version")
    run.add_argument("labels_file", type=Path, help="CSV (sample_id,label), JSON or JSONL")
    run.add_argument("--params", type=Path, default=PARAMS_FILE, help="parameter file (default: %(default)s)")
    run.add_argument("--repo", type=Path, default=Path("."), help="git + DVC repository (default: %(default)s)")
    run.add_argument("--workspace", type=Path, default=Path("."),
                     help="where the prepare stage wrote dataset.json (class names; default: %(default)s)")
    run.add_argument("--classes", help="class names in index order, comma-separated (default: dataset.json's)")
    run.add_argument("--no-commit", action="store_true",
                     help="write the labelled file only (no dvc add/push, no commit)")
    return parser


def _import(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    classes, input_shape = dataset_classes(Workspace(args.workspace), args.classes)
    labelled_dir = params.retrain.labelled_dir
    result = import_labels(args.labels_file, params.drift.collected_dir, labelled_dir, classes,
                           input_shape)
    print(result.report())
    version = None if args.no_commit else version_labelled(result, labelled_dir, args.repo)
    if version is not None:
        print(version.message)
    if result.rejected:
        raise DataError(f"{len(result.rejected)} row(s) of {args.labels_file} were rejected (listed above); "
                        "the other rows are imported. Fix those rows and import the file again: samples already "
                        "imported are skipped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return report_user_errors(lambda: _import(args))


if __name__ == "__main__":
    raise SystemExit(main())
