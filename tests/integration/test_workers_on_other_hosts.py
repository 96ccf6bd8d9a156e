"""A team control plane with workers on other hosts: the Prefect server on this machine, on PostgreSQL (the
session's, databases of its own), listening on its address on a test network; two process workers on two other
hosts (network namespaces, each with its own loopback) polling one work pool across that network.

- Many runs at once (the bench's drift- and training-shaped flows, ``bench/control_plane.py``, at a small N,
  plus probes that record which host ran them): all complete, no 5xx, none stuck.
- PostgreSQL restarted under running flows: every run still reaches a final state; none is left in Running.
- Data across hosts, and a host lost: host A pushes a data version to a DVC remote over SSH on the control host
  (Debian's sshd, key auth), then loses its network mid-run: that run is marked Crashed by the heartbeat
  automation (``tasks.stack.prefect_admin``) while the training flow on worker B (``data.sync: pull``) trains on
  the version A pushed, its MLflow lineage tags naming it and the remote. Wrong credentials on a host: one clear
  error naming the remote, no data.

Each worker also has a queue of its own (``host-a``, ``host-b``) beside the shared ``default`` one, so a test can
send a run to one host.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.netns_helpers import Network

pytestmark = pytest.mark.integration
POOL = "edgeloop-hosts"
CRASH_AFTER_S = 45  # the test's automation window (production: three missed 30-second heartbeats)

PROBE = textwrap.dedent('''
    import json, os, socket, time, urllib.parse
    from pathlib import Path

    from prefect import flow
    from prefect.runtime import flow_run

    def reach_server() -> tuple[str, str]:
        api = urllib.parse.urlsplit(os.environ["PREFECT_API_URL"])
        with socket.create_connection((api.hostname, api.port), timeout=5) as sock:
            return sock.getsockname()[0], api.hostname

    @flow(name="netns-probe")
    def probe(out_dir: str, hold_s: float = 1.0) -> None:
        local, server = reach_server()
        Path(out_dir, f"{flow_run.id}.json").write_text(json.dumps({"local": local, "server": server}))
        time.sleep(hold_s)  # a run takes a moment: the other worker may poll meanwhile
''')


@dataclass(frozen=True)
class ControlPlane:
    net: Network
    api_url: str
    mlflow_url: str
    run_dir: Path
    flow_dir: Path
    out_dir: Path


@pytest.fixture(scope="module")
def control_plane(shared_postgres, tmp_path_factory):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.stack import prefect_admin, services
    from tasks.stack.processes import stop

    root = tmp_path_factory.mktemp("hosts")
    run_dir, flow_dir, out_dir = root / "run", root / "flow", root / "out"
    flow_dir.mkdir()
    out_dir.mkdir()
    (flow_dir / "probe.py").write_text(PROBE)
    with Network(["worker-a", "worker-b"]) as net:
        address, port = net.bridge_address, services.free_port()
        api_url, database = f"http://{address}:{port}/api", shared_postgres.fresh()
        try:
            services.start_prefect(run_dir, port, schedules=False, database=database, host=address)
            mlflow = services.start_mlflow(run_dir, services.free_port(), database, host=address)
            services.ensure_work_pool(run_dir, port, POOL, address)
            prefect_admin.ensure_crash_detection(api_url, within_s=CRASH_AFTER_S)
            with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                for name in ("worker-a", "worker-b"):
                    client.create_work_queue(f"host-{name[-1]}", work_pool_name=POOL)
                    services.start_worker(run_dir, port, mlflow.url, POOL, address, net.hosts[name].namespace,
                                          name=name, limit=2, queues=["default", f"host-{name[-1]}"])  # small hosts
                flow_id = client.create_flow_from_name("netns-probe")
                for deployment, queue in (("hosts", None), ("on-host-a", "host-a")):
                    client.create_deployment(flow_id, deployment, work_pool_name=POOL, work_queue_name=queue,
                                             entrypoint="probe.py:probe", path=str(flow_dir), pull_steps=[
                                                 {"prefect.deployments.steps.set_working_directory":
                                                  {"directory": str(flow_dir)}}])
                yield ControlPlane(net, api_url, mlflow.url, run_dir, flow_dir, out_dir)
        finally:
            for name in ("worker-a", "worker-b", "sshd", "mlflow-server", "prefect-server", "prefect-services",
                         "redis"):
                stop(name, run_dir)


def _probe(out_dir: Path, hold_s: float = 1.0, deployment: str = "hosts"):
    from prefect.deployments import run_deployment

    return run_deployment(f"netns-probe/{deployment}", parameters={"out_dir": str(out_dir), "hold_s": hold_s},
                          timeout=0).id


def _host_of(run_id, out_dir: Path, net: Network, timeout_s: float = 120.0) -> str:
    record = out_dir / f"{run_id}.json"
    deadline = time.monotonic() + timeout_s
    while not record.exists():
        assert time.monotonic() < deadline, f"run {run_id} never started on a worker host"
        time.sleep(0.5)
    local = json.loads(record.read_text())["local"]
    return next(host.name for host in net.hosts.values() if host.address == local)


def test_many_runs_at_once_from_workers_on_two_other_hosts(control_plane, tmp_path):
    sys.path.insert(0, str(REPO_ROOT))
    from bench.control_plane import deploy_and_start, server_errors, wait_final

    out_dir = tmp_path / "probes"
    out_dir.mkdir()
    probes = [_probe(out_dir) for _ in range(4)]
    shaped = deploy_and_start({"drift": 2, "training": 1}, tasks=5, pool=POOL)  # the bench's case, small N
    states = wait_final([*probes, *shaped], timeout_s=300)

    assert set(states.values()) == {"COMPLETED"}, states  # none crashed, none stuck
    assert server_errors(control_plane.run_dir) == 0  # no 5xx retried by any client, in any log
    seen = [json.loads(path.read_text()) for path in out_dir.glob("*.json")]
    assert len(seen) == 4 and {record["server"] for record in seen} == {control_plane.net.bridge_address}
    hosts = {host.name: host.address for host in control_plane.net.hosts.values()}
    by_host = {name: sum(record["local"] == address for record in seen) for name, address in hosts.items()}
    assert sum(by_host.values()) == 4, seen  # every run came from a worker host, none from loopback
    assert min(by_host.values()) >= 1, by_host  # both hosts took runs (two at a time each)
    print(f"\n{len(states)} runs at once over {control_plane.api_url}; probes by host: {by_host}")


def test_postgres_restarted_under_running_flows_leaves_no_run_in_running(control_plane, shared_postgres):
    sys.path.insert(0, str(REPO_ROOT))
    from prefect.client.orchestration import get_client

    from bench.control_plane import deploy_and_start, wait_final

    ids = deploy_and_start({"drift": 0, "training": 3}, tasks=0, pool=POOL)  # 4 epochs of 2 s each
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while sum(client.read_flow_run(run_id).state.is_running() for run_id in ids) < 2:
            assert time.monotonic() < deadline, "the runs never started"
            time.sleep(0.5)
    shared_postgres.restart()  # the database goes away for a moment under running flows
    states = wait_final(ids, timeout_s=240)
    assert all(state in ("COMPLETED", "FAILED", "CRASHED") for state in states.values()), states  # none stuck
    print(f"\nruns across a PostgreSQL restart: {states}")
    assert list(states.values()).count("COMPLETED") >= 1, states


def _git(*args: str, cwd: Path) -> str:
    import subprocess

    env = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"git {args}: {done.stderr}"
    return done.stdout


def _on_host(namespace: str, code: str, cwd: Path, env: dict[str, str]):
    """Python ``code`` run on a host of the test network (its namespace), in ``cwd``."""
    import subprocess

    return subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", code], cwd=cwd,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def _project_checkout(target: Path) -> None:
    """Host A's checkout: the project's files (tracked and new, not ignored) in a git repository of its own."""
    import shutil
    import subprocess

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO_ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, target / name)
    _git("init", "-q", "-b", "main", cwd=target)
    _git("config", "user.name", "host-a", cwd=target)
    _git("config", "user.email", "host-a@example.invalid", cwd=target)
    _git("add", "-A", cwd=target)
    _git("commit", "-q", "-m", "the project", cwd=target)


def _configure_remote(checkout: Path, remote: str | None, keyfile: Path) -> None:
    import subprocess

    dvc = str(Path(sys.executable).with_name("dvc"))
    if remote is not None:
        subprocess.run([dvc, "remote", "add", "-d", "-f", "team", remote], cwd=checkout, check=True,
                       capture_output=True)
    subprocess.run([dvc, "remote", "modify", "--local", "team", "keyfile", str(keyfile)], cwd=checkout, check=True,
                   capture_output=True)  # this host's own credentials, never committed


def _push_from_host_a(control_plane: ControlPlane, host_a: Path, remote: str, keyfile: Path) -> str:
    """Host A: new data in its checkout, pushed to the DVC remote over SSH and committed (track_version)."""
    import numpy as np
    import yaml
    from sklearn.datasets import load_digits

    _project_checkout(host_a)
    _configure_remote(host_a, remote, keyfile)
    digits = load_digits()
    rows = np.random.default_rng(7).permutation(len(digits.target))[:1200]  # a version of our own, not the bundled
    (host_a / "data").mkdir(exist_ok=True)
    np.savez(host_a / "data" / "team.npz", x=digits.images[rows].astype(np.float32), y=digits.target[rows])
    params = yaml.safe_load((host_a / "params.yaml").read_text())
    params["data"].update({"source": "npz", "path": "data/team.npz"})
    (host_a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git("commit", "-q", "-am", "train on the team's data", cwd=host_a)
    pushed = _on_host(control_plane.net.hosts["worker-a"].namespace, "from pathlib import Path; from "
                      "tasks.data.versioning import track_version; print(track_version(Path('data/team.npz'), "
                      "Path('.'), 'data').md5)", host_a, {"HOME": str(host_a.parent)})
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    return pushed.stdout.strip().splitlines()[-1]


def test_host_a_pushes_data_then_drops_off_while_worker_b_trains_on_that_version(control_plane, tmp_path):
    """A's run is Crashed by the heartbeat automation once A's cable is cut; B, unaffected, trains on the data
    version A pushed over SSH (the data never travels through git); a host with a wrong key gets one error."""
    import subprocess

    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from tasks.stack import services
    from tests.conftest import fast_parameters
    from tests.sshd_helpers import start_sshd

    net, out_dir = control_plane.net, tmp_path / "probes"
    out_dir.mkdir()
    sshd = start_sshd(control_plane.run_dir, services.free_port(), address=net.bridge_address)
    storage = tmp_path / "dvc-remote"  # on the control host, reached only through sshd
    storage.mkdir()
    remote = f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{storage}"
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    version = _push_from_host_a(control_plane, host_a, remote, sshd.client_key)
    assert any(storage.rglob("*")), "nothing reached the DVC remote on the control host"
    _git("clone", "-q", str(host_a), str(host_b), cwd=tmp_path)  # the code through git, the data not
    assert not (host_b / "data" / "team.npz").exists()
    _configure_remote(host_b, None, sshd.client_key)
    with get_client(sync_client=True) as client:
        client.create_deployment(client.create_flow_from_name("training"), "host-b", work_pool_name=POOL,
                                 work_queue_name="host-b", path=str(host_b), entrypoint="flows/training.py:training",
                                 job_variables={"env": {"EDGELOOP_DATA_SYNC": "pull"}},
                                 pull_steps=[{"prefect.deployments.steps.set_working_directory":
                                              {"directory": str(host_b)}}])

    stranded = _probe(out_dir, hold_s=600, deployment="on-host-a")
    assert _host_of(stranded, out_dir, net) == "worker-a"
    time.sleep(3)  # its first heartbeat reaches the server
    net.set_link("worker-a", up=False)
    cut = time.monotonic()
    try:
        training = run_deployment("training/host-b", timeout=0, parameters={
            "params": fast_parameters(epochs=1, benchmark=False), "workspace": str(tmp_path / "workspace")}).id
        crashed_after, final = None, None
        with get_client(sync_client=True) as client:
            while crashed_after is None or final is None:
                assert time.monotonic() - cut < 600, f"crashed after {crashed_after}, training {final}"
                if crashed_after is None and (lost := client.read_flow_run(stranded).state).type.value == "CRASHED":
                    crashed_after = time.monotonic() - cut
                if final is None and (state := client.read_flow_run(training).state).is_final():
                    final = state
                time.sleep(1)
    finally:
        net.set_link("worker-a", up=True)
    assert "heartbeat" in (lost.message or ""), lost.message
    assert crashed_after < CRASH_AFTER_S + 60, crashed_after
    assert final.is_completed(), final.message

    pulled = host_b / "data" / "team.npz"
    assert pulled.is_file() and pulled.read_bytes() == (host_a / "data" / "team.npz").read_bytes()
    mlflow.set_tracking_uri(control_plane.mlflow_url)
    [logged] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.`prefect.flow_run_id` = '{training}'")
    tags = logged.data.tags
    assert tags["edgeloop.data.version"] == version and tags["edgeloop.data.path"] == "data/team.npz"
    assert tags["edgeloop.data.source"] == f"pulled from team ({remote})", tags["edgeloop.data.source"]
    print(f"\nworker-a cut off: its run Crashed {crashed_after:.0f} s later; worker-b trained on data version "
          f"{version} pulled from {remote}")

    host_c = tmp_path / "host-c"  # a host whose key the control host does not know
    _git("clone", "-q", str(host_a), str(host_c), cwd=tmp_path)
    stranger = tmp_path / "stranger_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    _configure_remote(host_c, None, stranger)
    refused = _on_host(net.hosts["worker-b"].namespace, "from tasks.config import load_params; from "
                       "tasks.data.versioning import check_data_version; check_data_version(load_params().data)",
                       host_c, {"HOME": str(tmp_path), "EDGELOOP_DATA_SYNC": "pull"})
    assert refused.returncode != 0
    assert f"from DVC remote team ({remote}): failed to connect to ssh" in refused.stderr, refused.stderr[-2000:]
    assert "Permission denied" in refused.stderr and "nothing was checked out" in refused.stderr
    assert not (host_c / "data" / "team.npz").exists()  # nothing half-pulled
    print("wrong key: " + " ".join(refused.stderr.strip().splitlines()[-2:]))
