"""Prefect workers on other hosts: the server on one network namespace, two process workers on two others, one
work pool, and flow runs that reach the server over real non-loopback addresses (no shared loopback: each
namespace has its own). The test process talks to the server through the bridge, as an operator's laptop
would. Each run records the address it reached the server from, so the test sees which host ran it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.netns_helpers import Network

pytestmark = pytest.mark.integration
POOL = "edgeloop-hosts"
RUNS = 4

PROBE = textwrap.dedent('''
    import json, os, socket, time, urllib.parse
    from pathlib import Path

    from prefect import flow
    from prefect.runtime import flow_run

    @flow(name="netns-probe")
    def probe(out_dir: str) -> None:
        api = urllib.parse.urlsplit(os.environ["PREFECT_API_URL"])
        with socket.create_connection((api.hostname, api.port), timeout=5) as sock:
            local = sock.getsockname()[0]
        time.sleep(1)  # a run takes a moment: the other worker may poll meanwhile
        Path(out_dir, f"{flow_run.id}.json").write_text(json.dumps({"local": local, "server": api.hostname}))
''')

DRIVER = textwrap.dedent('''
    import json, sys, time
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    flow_dir, out_dir, runs, pool = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("netns-probe")
        client.create_deployment(flow_id, "hosts", work_pool_name=pool, entrypoint="probe.py:probe", path=flow_dir,
                                 pull_steps=[{"prefect.deployments.steps.set_working_directory":
                                              {"directory": flow_dir}}])
        ids = [run_deployment("netns-probe/hosts", parameters={"out_dir": out_dir}, timeout=0).id
               for _ in range(runs)]
        deadline = time.monotonic() + 240
        while True:
            states = {str(i): client.read_flow_run(i).state.type.value for i in ids}
            if all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states.values()) \\
                    or time.monotonic() > deadline:
                break
            time.sleep(1)
        workers = {w.name: w.status.value if w.status else None for w in client.read_workers_for_work_pool(pool)}
    print(json.dumps({"states": states, "workers": workers}))
''')


def test_flow_runs_reach_the_server_from_workers_on_two_other_hosts(tmp_path):
    from tasks.stack import services
    from tasks.stack.processes import stop

    with Network(["control", "worker-a", "worker-b"]) as net:
        control, workers = net.hosts["control"], [net.hosts["worker-a"], net.hosts["worker-b"]]
        run_dir, port = tmp_path / "run", services.free_port()
        flow_dir, out_dir = tmp_path / "flow", tmp_path / "out"
        flow_dir.mkdir()
        out_dir.mkdir()
        (flow_dir / "probe.py").write_text(PROBE)
        try:
            services.start_prefect(run_dir, port, schedules=False, host=control.address, netns=control.namespace)
            services.ensure_work_pool(run_dir, port, POOL, control.address)
            for host in workers:
                services.start_worker(run_dir, port, "http://mlflow.invalid", POOL, control.address, host.namespace,
                                      name=host.name)
            env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "client"),
                   "PREFECT_API_URL": f"http://{control.address}:{port}/api"}
            done = subprocess.run([sys.executable, "-c", DRIVER, str(flow_dir), str(out_dir), str(RUNS), POOL],
                                  env=env, capture_output=True, text=True, timeout=330)
            assert done.returncode == 0, done.stderr[-3000:]
            report = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            for name in ("worker-a", "worker-b", "prefect-server"):
                stop(name, run_dir)

    assert set(report["states"].values()) == {"COMPLETED"}, report
    assert {name: status for name, status in report["workers"].items() if name in ("worker-a", "worker-b")} == {
        "worker-a": "ONLINE", "worker-b": "ONLINE"}, report["workers"]
    seen = [json.loads(path.read_text()) for path in out_dir.glob("*.json")]
    assert len(seen) == RUNS and {record["server"] for record in seen} == {control.address}
    by_host = {host.name: sum(record["local"] == host.address for record in seen) for host in workers}
    assert sum(by_host.values()) == RUNS, seen  # every run came from a worker host, none from loopback or the bridge
    print(f"\n{RUNS} flow runs over {control.address}:{port} from two worker hosts: {by_host}")
