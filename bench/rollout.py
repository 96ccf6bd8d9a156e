"""Rollout benchmark: the real control plane rolling a release out to, and back from, N simulated devices.

For each N (default 100, 1,000 and 10,000) on a fresh Mosquitto 2 (``tasks.stack.mosquitto``, the fleet's
per-device passwords and ACL from :func:`tasks.rollout.fleet.simulated_fleet`, 1 PBKDF2 iteration):

- the control plane is its own process: :class:`tasks.rollout.channel.MqttChannel` (paho, MQTT v5) driving
  :class:`tasks.rollout.engine.Rollout`, as the rollout flow does; its peak RSS (VmHWM) is reported;
- the devices are light MQTT clients (``bench/_mqtt_swarm.py``) in worker processes of up to
  ``--clients-per-process`` each: every device verifies each manifest's Ed25519 signature itself, judges
  it (sequence, cohort, version) as ``edge.rollout.judge`` does, waits its jitter and acknowledges with a
  device's status record. No bundle is downloaded: the figures are the control plane's and the broker's.
  Connecting them is timed apart (``connect``), not part of the rollout;
- run 1 rolls ``v2`` out over ``--stages`` (canary first) with ``--jitter-s`` and ``--stage-window-s``
  shortened; ``rollout_s`` is approval (``Rollout.run`` called) to the last stage's acknowledgements
  complete (every device reported ``installed v2``);
- run 2 rolls ``v3`` to 100% in one stage; the reporters (``--reporter-share`` of the devices, which
  send telemetry every ``--telemetry-interval-s`` in both runs) report a mean confidence of 0.40 on it,
  the health watch rolls back, and ``rollback_s`` is the rollback manifest's publication to every device
  acknowledging ``v2`` again (``report.rollback.started_at`` to ``acked_at``): all N devices go back.

``msgs/s`` is the PUBLISH messages the broker received and sent during the two runs (manifests,
statuses, telemetry, each counted once in and once per subscriber out), counted at the clients (the ACL
keeps ``$SYS`` from the control plane), over the two runs' wall time (jitter and health windows included).

With ``--modes plain,tls`` (the default) every N runs twice: on the demo's password logins, and on mutual TLS
(``tls``): a fleet CA (:mod:`tasks.rollout.fleet_ca`), one client certificate per device (ECDSA P-256, issued
in one batch: ``certs_s``; no certificate is shared, since the certificate's name is the device's login and
client id), the broker's TLS listener (``use_identity_as_username``, CRL), the control plane on its own
certificate; every device's TLS handshake is part of ``connect_s``.

Per N and mode it prints ``devices=N mode=M: rollout_s=.. rollback_s=.. msgs_per_s=.. cp_peak_rss_mb=..
connect_s=..`` and a detail line: per stage when the control plane had every acknowledgement and when the
last device sent its status (the gap is delivery lag), CPU seconds of the broker, the control plane and the
device processes.

    .venv/bin/python bench/rollout.py [--devices 100,1000,10000] [--modes plain,tls] [--jitter-s 5]

Last line: ``... rollout_10k_s=<x> rollback_10k_s=<y> rollout_10k_tls_s=<x> rollback_10k_tls_s=<y>`` (``none``
when 10,000 was not run in that mode). Targets: 10,000 devices updated in under 120 s and rolled back in
under 120 s on the 2-core reference machine, in both modes.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from _mqtt_swarm import SwarmConfig, run_worker  # bench/_mqtt_swarm.py, beside this script

from edge.errors import EdgeError
from edge.signing import load_public_keys
from edge.tls import ClientTls
from tasks.config import DriftParams, RolloutParams
from tasks.errors import EdgeloopError
from tasks.registry.bundle import generate_keypair, load_private_key
from tasks.rollout import fleet_ca
from tasks.rollout.broker import TlsFiles
from tasks.rollout.channel import MqttChannel
from tasks.rollout.engine import Release, Rollout, StageRecord
from tasks.rollout.fleet import ACL_FILE, CONTROL_PLANE_USER, PASSWORD_FILE, ensure_control_plane, simulated_fleet
from tasks.stack.mosquitto import start_mosquitto, stop_mosquitto
from tasks.stack.services import ServiceError, free_port

GROUP, MODEL = "bench", "digits_cnn"
SPAWN = multiprocessing.get_context("spawn")  # the control plane's peak RSS must be its own, not a fork's


class BenchError(RuntimeError):
    """The benchmark could not measure what it set out to (a process died, a run ended otherwise)."""


def _memory_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s(pid: int | None = None) -> float:
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _release(version: str) -> Release:
    return Release(version, f"file:///bench/{MODEL}-{version}.tar.gz", hashlib.sha256(version.encode()).hexdigest())


def _step(record: StageRecord | None, statuses: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A stage's figures; ``last_status_at``: when the last of its statuses was sent (the device's ``at``),
    which tells device-side lateness from delivery lag (None once a later stage overwrote the statuses)."""
    if record is None:
        return None
    sent = [status["at"] for status in statuses.values() if status.get("sequence") == record.sequence]
    return {"name": record.name, "devices": len(record.devices), "installed": len(record.installed),
            "last_status_at": max(sent) if len(sent) == len(record.devices) else None, "failed": len(record.failed),
            "missing": len(record.missing), "started_at": record.started_at, "acked_at": record.acked_at,
            "ended_at": record.ended_at, "problems": record.problems}


def _run_rollout(channel: MqttChannel, key: Any, devices: list[str], job: dict[str, Any]) -> dict[str, Any]:
    params = RolloutParams.model_validate({"group": GROUP, "stages": job["stages"], "jitter_s": job["jitter_s"],
                                           "stage_window_s": job["stage_window_s"],
                                           "ack_timeout_s": job["ack_timeout_s"], "baseline_window_s": 60})
    received, cpu = channel.messages, _cpu_s()
    rollout = Rollout(channel, devices, key, params, DriftParams(), MODEL, _release(job["target"]),
                      _release(job["previous"]), poll_s=job["poll_s"])
    approved = time.time()
    report = rollout.run()
    statuses = channel.statuses()
    return {"target": job["target"], "outcome": report.outcome, "reason": report.reason, "approved": approved,
            "finished": time.time(),
            "stages": [_step(stage, statuses) for stage in report.stages],
            "rollback": _step(report.rollback, statuses),
            "received": channel.messages - received, "published": len(report.stages) + bool(report.rollback),
            "cpu_s": _cpu_s() - cpu, "peak_rss_mb": _memory_mb("VmHWM")}


def control_plane(conn: Any, setup: dict[str, Any]) -> None:
    """The control plane's process: connect, then run each rollout job the parent sends (None: stop)."""
    logging.basicConfig(level=logging.WARNING, format="control plane %(levelname)s %(name)s: %(message)s")
    key = load_private_key(Path(setup["key"]))
    keys = load_public_keys([Path(setup["public_key"])])
    tls = ClientTls(*map(Path, setup["tls"])) if setup.get("tls") else None
    with MqttChannel(setup["broker"], GROUP, CONTROL_PLANE_USER, setup["password"], keys, tls=tls) as channel:
        conn.send({"rss_mb": _memory_mb("VmRSS")})
        while (job := conn.recv()) is not None:
            conn.send(_run_rollout(channel, key, setup["devices"], job))
    conn.send({"peak_rss_mb": _memory_mb("VmHWM")})


def _receive(conn: Any, timeout_s: float, what: str) -> Any:
    try:
        if conn.poll(timeout_s):
            return conn.recv()
    except (EOFError, OSError):
        raise BenchError(f"{what} exited without answering (see its output above)") from None
    raise BenchError(f"{what} did not answer within {timeout_s:g} s")


def _swarm_counts(conns: list[Any]) -> dict[str, Any]:
    for conn in conns:
        conn.send("counts")
    total: dict[str, Any] = {"versions": {}}
    for conn in conns:
        counts = _receive(conn, 60, "a device worker")
        for name, value in counts.items():
            if isinstance(value, dict):
                for key, count in value.items():
                    total.setdefault(name, {})[key] = total.setdefault(name, {}).get(key, 0) + count
            else:
                total[name] = total.get(name, 0) + value
    return total


def _check(result: dict[str, Any], counts: dict[str, Any], n: int, what: str) -> None:
    """The rollout of v2 completes; the bad one rolls every device back. Either way all N end on v2."""
    outcome = "rolled_back" if result["target"] == "v3" else "completed"
    if result["outcome"] != outcome:
        raise BenchError(f"{what} ended {result['outcome']}, not {outcome}: {result['reason']}")
    if outcome == "rolled_back" and result["rollback"]["installed"] != n:
        raise BenchError(f"the rollback reached {result['rollback']['installed']} of {n} devices")
    if counts["versions"] != {"v2": n}:
        raise BenchError(f"after {what} the devices run {counts['versions']}, not v2 everywhere")


def _timed_run(cp: Any, workers: list[Any], broker_pid: int, job: dict[str, Any], timeout_s: float
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One rollout job; its result plus the swarm's and the broker's work during it."""
    before, broker_cpu = _swarm_counts(workers), _cpu_s(broker_pid)
    cp.send(job)
    result = _receive(cp, timeout_s, f"the control plane (rollout of {job['target']})")
    after = _swarm_counts(workers)
    work = {name: after[name] - before[name] for name in ("published", "received", "verified", "verify_s", "cpu_s")}
    return result, {**work, "versions": after["versions"], "broker_cpu_s": _cpu_s(broker_pid) - broker_cpu}


def _start_control_plane(setup: dict[str, Any], processes: list[Any]) -> tuple[Any, float]:
    """The control plane's process, connected; its pipe and its RSS after connecting (MB)."""
    cp, child = SPAWN.Pipe()
    processes.append(SPAWN.Process(target=control_plane, args=(child, setup), daemon=True))
    processes[-1].start()
    return cp, _receive(cp, 120, "the control plane")["rss_mb"]


def _start_swarm(devices: dict[str, tuple[str, str]], port: int, public_key: Path, args: argparse.Namespace,
                 processes: list[Any], tls: tuple[str, str] | None) -> tuple[list[Any], float]:
    """The devices, dealt round-robin to worker processes, all connected; their pipes and the connect time."""
    ordered = sorted(devices.items())
    reporters = frozenset(device for device, _ in ordered[::max(1, round(1 / args.reporter_share))])
    chunks, conns = math.ceil(len(ordered) / args.clients_per_process), []
    for index in range(chunks):
        mine, theirs = SPAWN.Pipe()
        config = SwarmConfig(port, GROUP, [(device, password) for device, (_, password) in ordered[index::chunks]],
                             str(public_key), "v1", "v3", reporters, args.telemetry_interval_s,
                             args.connect_concurrency, seed=index, tls=tls)
        processes.append(SPAWN.Process(target=run_worker, args=(theirs, config), daemon=True))
        processes[-1].start()
        conns.append(mine)
    connected = [_receive(conn, 600, "a device worker") for conn in conns]
    if failed := sum(worker["failed"] for worker in connected):
        examples = [failure for worker in connected for failure in worker["failures"]][:3]
        raise BenchError(f"{failed} device(s) could not connect to the broker, e.g. {examples}")
    return conns, max(worker["connected_s"] for worker in connected)


def _stop(processes: list[Any], gracefully: bool) -> None:
    for process in processes:  # after "stop" they exit on their own; after an error they are stopped
        process.join(timeout=10 if gracefully else 0)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()


def _tls_fleet(root: Path, devices: list[str]) -> tuple[TlsFiles, tuple[str, str, str], tuple[str, str], float]:
    """A fleet CA with the broker's certificate and one client certificate per device (timed); the broker's
    files, the control plane's (CA, certificate, key) and the devices' (CA, certificate folder)."""
    ca = fleet_ca.init_ca(root / "fleet-ca")
    broker = fleet_ca.issue_server(ca, "broker", ["127.0.0.1"])
    started = time.perf_counter()
    fleet_ca.issue_clients(ca, devices, root / "certs")
    issued_s = time.perf_counter() - started
    control_plane = ca.control_plane
    return (TlsFiles(ca.certificate_path, broker.certificate, broker.key, ca.crl_path),
            (str(ca.certificate_path), str(control_plane.certificate), str(control_plane.key)),
            (str(ca.certificate_path), str(root / "certs")), issued_s)


def measure(n: int, args: argparse.Namespace, root: Path, tls: bool = False) -> dict[str, Any]:
    """Both runs for ``n`` devices on a fresh broker in ``root`` (mutual TLS with ``tls``); the figures."""
    credentials = root / "mqtt"
    devices = simulated_fleet(n, [GROUP], credentials, iterations=1)  # the ACL (and passwords, unused with TLS)
    private, public = generate_keypair(root / "keys", "control-plane")
    run_dir, port = root / "run", free_port()
    setup = {"broker": f"127.0.0.1:{port}", "key": str(private), "public_key": str(public), "devices": sorted(devices)}
    certs_s, device_tls = None, None
    if tls:
        broker_tls, setup["tls"], device_tls, certs_s = _tls_fleet(root, sorted(devices))
        broker = start_mosquitto(run_dir, port, None, credentials / ACL_FILE, tls=broker_tls)
        setup["password"] = None
    else:
        broker = start_mosquitto(run_dir, port, credentials / PASSWORD_FILE, credentials / ACL_FILE)
        setup["password"] = ensure_control_plane(credentials)
    processes: list[Any] = []
    finished = False
    try:
        cp, base_rss = _start_control_plane(setup, processes)
        workers, connect_s = _start_swarm(devices, port, public, args, processes, device_tls)
        job = {"stages": args.stages, "jitter_s": args.jitter_s, "stage_window_s": args.stage_window_s,
               "ack_timeout_s": args.ack_timeout_s, "poll_s": args.poll_s, "target": "v2", "previous": "v1"}
        timeout = args.ack_timeout_s * (len(args.stages) + 2) + 120
        rollout = _timed_run(cp, workers, broker.pid, job, timeout)
        _check(*rollout, n, "the rollout of v2")
        rollback = _timed_run(cp, workers, broker.pid, {**job, "stages": [100.0], "target": "v3", "previous": "v2"},
                              timeout)
        _check(*rollback, n, "the bad rollout of v3")
        cp.send(None)
        peak = _receive(cp, 60, "the control plane")["peak_rss_mb"]
        for conn in workers:
            conn.send("stop")
        for conn in workers:
            _receive(conn, 60, "a device worker")
        finished = True
    finally:
        _stop(processes, finished)
        stop_mosquitto(run_dir)
    return {**_figures(n, connect_s, len(workers), base_rss, peak, rollout, rollback),
            "mode": "tls" if tls else "plain", "certs_s": certs_s}


def _figures(n: int, connect_s: float, workers: int, base_rss: float, peak: float, *runs: tuple) -> dict[str, Any]:
    (rollout, _), (rollback, _) = runs
    messages = sum(work["published"] + work["received"] + result["published"] + result["received"]
                   for result, work in runs)
    wall = sum(result["finished"] - result["approved"] for result, _ in runs)
    back = rollback["rollback"]
    return {"n": n, "connect_s": connect_s, "workers": workers, "cp_base_rss_mb": base_rss, "cp_peak_rss_mb": peak,
            "rollout_s": rollout["stages"][-1]["acked_at"] - rollout["approved"],
            "rollback_s": back["acked_at"] - back["started_at"], "rolled_back": back["installed"],
            "detect_s": back["started_at"] - rollback["stages"][-1]["acked_at"],
            "msgs_per_s": messages / wall, "messages": messages, "stages": rollout["stages"], "rollback": back,
            "cpu": {"broker": sum(work["broker_cpu_s"] for _, work in runs),
                    "control plane": sum(result["cpu_s"] for result, _ in runs),
                    "devices": sum(work["cpu_s"] for _, work in runs)},
            "verify_us": 1e6 * sum(w["verify_s"] for _, w in runs) / max(1, sum(w["verified"] for _, w in runs)),
            "wall_s": wall}


def _step_text(step: dict[str, Any]) -> str:
    text = f"{step['name']} {step['installed']}/{step['devices']} acked +{step['acked_at'] - step['started_at']:.1f} s"
    sent = step["last_status_at"]
    return text + (f" (last sent +{sent - step['started_at']:.1f} s)" if sent else "")


def describe(figures: dict[str, Any]) -> str:
    """A summary line for one N, then a detail line: per stage when the control plane had every status
    (acked) and when the last device sent its status (sent), CPU per process, the devices' verification."""
    steps = ", ".join(map(_step_text, [*figures["stages"], figures["rollback"]]))
    cpu = ", ".join(f"{name} {seconds:.1f}" for name, seconds in figures["cpu"].items())
    certs = f" certs_s={figures['certs_s']:.1f}" if figures["certs_s"] is not None else ""
    return (f"devices={figures['n']} mode={figures['mode']}: rollout_s={figures['rollout_s']:.1f} "
            f"rollback_s={figures['rollback_s']:.1f} msgs_per_s={figures['msgs_per_s']:.0f} "
            f"cp_peak_rss_mb={figures['cp_peak_rss_mb']:.0f} connect_s={figures['connect_s']:.1f}{certs}\n"
            f"  steps: {steps}; rollback detected {figures['detect_s']:.1f} s after the last ack; "
            f"{figures['messages']} PUBLISH in+out over {figures['wall_s']:.1f} s; control-plane RSS "
            f"{figures['cp_base_rss_mb']:.0f} MB after connect; {figures['workers']} device process(es); CPU s in "
            f"the two runs: {cpu}; verify+judge {figures['verify_us']:.0f} us (wall) per manifest per device")


def _label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="100,1000,10000", help="device counts, comma-separated")
    parser.add_argument("--modes", default="plain,tls", help="plain (password logins), tls (mutual TLS), or both")
    parser.add_argument("--stages", default="5,25,100", help="cohort %% per stage of the rollout run")
    parser.add_argument("--jitter-s", type=float, default=5.0, help="devices wait up to this before acting")
    parser.add_argument("--stage-window-s", type=float, default=2.0, help="health watched this long per stage")
    parser.add_argument("--ack-timeout-s", type=float, default=150.0)
    parser.add_argument("--poll-s", type=float, default=0.2, help="the engine's status poll interval")
    parser.add_argument("--clients-per-process", type=int, default=2500, help="devices per worker process")
    parser.add_argument("--connect-concurrency", type=int, default=50, help="connects in flight per worker")
    parser.add_argument("--reporter-share", type=float, default=0.01, help="share of devices sending telemetry")
    parser.add_argument("--telemetry-interval-s", type=float, default=0.5)
    args = parser.parse_args()
    args.stages = [float(stage) for stage in args.stages.split(",")]
    if not 0 < args.reporter_share <= 1:
        parser.error("--reporter-share must be in (0, 1]")
    counts = [int(count) for count in args.devices.split(",")]
    modes = [mode for mode in args.modes.split(",") if mode]
    if not modes or set(modes) - {"plain", "tls"}:
        parser.error("--modes takes plain, tls or both")
    started, results = time.perf_counter(), {}
    try:
        for mode in modes:
            for n in counts:
                with tempfile.TemporaryDirectory(prefix=f"edgeloop-bench-rollout-{mode}-{n}-") as root:
                    results[mode, n] = measure(n, args, Path(root), tls=mode == "tls")
                print(describe(results[mode, n]), flush=True)
    except (ServiceError, EdgeloopError, EdgeError, BenchError) as error:
        print(f"error: {error}")
        return 1
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    print(" ".join(_summary(results, counts, modes)))
    return 0


def _summary(results: dict[tuple[str, int], dict[str, Any]], counts: list[int], modes: list[str]) -> list[str]:
    """The last line's figures: per mode and N (``_tls`` after the name in TLS mode), the 10k ones last."""
    figures, last = [], []
    for mode in modes:
        tag = "_tls" if mode == "tls" else ""
        for n in counts:
            if n == 10_000:
                continue
            result = results[mode, n]
            figures += [f"rollout_{_label(n)}{tag}_s={result['rollout_s']:.1f}",
                        f"rollback_{_label(n)}{tag}_s={result['rollback_s']:.1f}",
                        f"msgs_per_s_{_label(n)}{tag}={result['msgs_per_s']:.0f}",
                        f"cp_peak_rss_{_label(n)}{tag}_mb={result['cp_peak_rss_mb']:.0f}"]
        ten_k = results.get((mode, 10_000))
        if ten_k:
            figures += [f"msgs_per_s_10k{tag}={ten_k['msgs_per_s']:.0f}",
                        f"cp_peak_rss_10k{tag}_mb={ten_k['cp_peak_rss_mb']:.0f}",
                        f"connect_10k{tag}_s={ten_k['connect_s']:.1f}"]
            last += [f"rollout_10k{tag}_s={ten_k['rollout_s']:.1f}", f"rollback_10k{tag}_s={ten_k['rollback_s']:.1f}"]
        else:
            last += [f"rollout_10k{tag}_s=none", f"rollback_10k{tag}_s=none"]
    return [*figures, *last]


if __name__ == "__main__":
    raise SystemExit(main())
