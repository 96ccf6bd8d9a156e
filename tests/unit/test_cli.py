"""The `edgeloop` command: readable help, stage dispatch, user errors as one line and exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.cli import STAGES, build_parser
from tests.conftest import REPO_ROOT

EDGELOOP = str(Path(sys.executable).parent / "edgeloop")


def _edgeloop(*args: str, cwd: Path = REPO_ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EDGELOOP, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_help_lists_every_command():
    completed = _edgeloop("--help")
    assert completed.returncode == 0
    for command in [*STAGES, "devices", "waiting", "approve", "reject"]:
        assert command in completed.stdout


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_names_the_stage_and_its_options(stage):
    completed = _edgeloop(stage, "--help")
    assert completed.returncode == 0
    assert f"usage: edgeloop {stage}" in completed.stdout
    assert "--params" in completed.stdout and "--workspace" in completed.stdout


def test_a_stage_before_its_inputs_says_which_stage_to_run(tmp_path):
    completed = _edgeloop("train", "--workspace", str(tmp_path))
    assert completed.returncode == 2
    assert "run the prepare stage first" in completed.stderr and "Traceback" not in completed.stderr


def test_bad_params_are_one_clear_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("quantize:\n  strategy: all\n")
    completed = _edgeloop("prepare", "--params", str(bad), "--workspace", str(tmp_path))
    assert completed.returncode == 2
    assert "quantize.strategy: got 'all'" in completed.stderr and "Traceback" not in completed.stderr


def test_decisions_need_a_run_and_a_reviewer():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["approve", "crimson-otter"])  # --reviewer is required
    args = parser.parse_args(["reject", "crimson-otter", "--reviewer", "bob", "--comment", "worse"])
    assert (args.run, args.reviewer, args.comment) == ("crimson-otter", "bob", "worse")


def test_an_unreachable_prefect_server_is_named(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PREFECT_API_URL": "http://127.0.0.1:9/api", "HOME": str(tmp_path),
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_CLIENT_MAX_RETRIES": "0"}
    completed = _edgeloop("approve", "crimson-otter", "--reviewer", "alice", env=env)
    assert completed.returncode == 2
    assert "Prefect API http://127.0.0.1:9/api did not answer" in completed.stderr
    assert "Traceback" not in completed.stderr
