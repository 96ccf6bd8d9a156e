"""Lineage facts recorded with every model: data version, git commit, creation time."""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def directory_md5(directory: Path) -> str:
    """The md5 DVC 3 gives a directory output (``<md5>.dir``), so the version matches ``dvc.lock``.

    DVC hashes the JSON list of ``{"md5", "relpath"}`` entries sorted by path.
    """
    entries = [
        {"md5": file_md5(path), "relpath": path.relative_to(directory).as_posix()}
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]
    entries.sort(key=lambda entry: entry["relpath"])
    payload = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(payload).hexdigest() + ".dir"


def git_commit(repo_dir: Path = Path(".")) -> str:
    """HEAD's commit, suffixed ``-dirty`` with uncommitted changes; ``unknown`` outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if status else commit


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
