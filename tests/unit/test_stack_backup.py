"""The control plane's backup folder is checked whole before a restore touches anything (no server needed)."""

from __future__ import annotations

import json

import pytest

from tasks.stack.backup import FORMAT, _sha256, verify
from tasks.stack.processes import ServiceError


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "backup"
    folder.mkdir()
    for name in ("prefect.dump", "mlflow.dump", "artifacts.tar.gz"):
        (folder / name).write_bytes(name.encode() * 100)
    files = {path.name: {"sha256": _sha256(path), "bytes": path.stat().st_size} for path in folder.iterdir()}
    (folder / "manifest.json").write_text(json.dumps({"format": FORMAT, "created": "now", "files": files}))
    return folder


def test_a_whole_backup_verifies(saved):
    assert set(verify(saved)["files"]) == {"prefect.dump", "mlflow.dump", "artifacts.tar.gz"}


def test_a_changed_missing_or_unlisted_file_is_refused_by_name(saved):
    (saved / "prefect.dump").write_bytes(b"tampered")
    with pytest.raises(ServiceError, match="prefect.dump does not match its checksum"):
        verify(saved)
    (saved / "prefect.dump").unlink()
    with pytest.raises(ServiceError, match="prefect.dump is missing"):
        verify(saved)


def test_a_folder_that_is_not_a_backup_says_so(tmp_path, saved):
    with pytest.raises(ServiceError, match="not an edgeloop backup"):
        verify(tmp_path)
    (saved / "manifest.json").write_text("{half")
    with pytest.raises(ServiceError, match="not valid JSON"):
        verify(saved)
    (saved / "manifest.json").write_text(json.dumps({"format": 99, "files": {}}))
    with pytest.raises(ServiceError, match="format 99"):
        verify(saved)
    (saved / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": {}}))
    with pytest.raises(ServiceError, match="lacks prefect.dump, mlflow.dump"):
        verify(saved)


def test_the_crash_automation_waits_for_a_heartbeat_or_a_final_state():
    from tasks.stack.prefect_admin import CRASH_AFTER_S, HEARTBEAT_S, crash_automation

    automation = crash_automation()
    assert automation.trigger.within.total_seconds() == CRASH_AFTER_S == 3 * HEARTBEAT_S
    assert automation.trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= \
        automation.trigger.expect
    assert automation.actions[0].state.value == "CRASHED"
