"""``edgeloop``: the one command for what a person runs by hand.

    edgeloop prepare|train|convert|evaluate|benchmark|register [--params P] [--workspace W]  one stage
    edgeloop bench MODEL... [--eval E.npz --iterations N ...]                      benchmark on this device
    edgeloop devices [--devices devices.yaml] [--out reports/devices.csv]          the hardware inventory
    edgeloop waiting                                                               retrain runs awaiting a decision
    edgeloop approve RUN --reviewer NAME [--comment TEXT]                          promote the challenger
    edgeloop reject RUN --reviewer NAME [--comment TEXT]                           keep the champion
    edgeloop keys generate --name NAME                                             a bundle signing key pair
    edgeloop bundle export --alias champion --key KEY                              a signed bundle for devices
    edgeloop serve [--store S --public-keys K ...]                                 the edge inference service
    edgeloop store install|rollback|status                                         a device's model store
    edgeloop ingest serve|add-device                                               the sample ingest endpoint
    edgeloop drift-check [--collected-dir D]                                       one drift check, now
    edgeloop simulate-drift --severity low|medium|high ...                         shifted device uploads
    edgeloop labels import LABELS.csv                                              labelled samples -> data version
    edgeloop fleet ca init | enroll ID --group G | revoke ID                       the fleet CA, device certificates
    edgeloop fleet add-device ID --group G                                         a device's password login (demo)
    edgeloop services up|down|status [--images] [--database postgres]              the local service stack
    edgeloop services backup --to DIR | restore --from DIR --database postgres     the team control plane's state
    edgeloop services automations --api-url URL                                    work pool, crash detection
    edgeloop engine up|down                                                        a Docker engine (dockerd)
    edgeloop base-images [--arch amd64 arm64]                                      the images' Python bases

The stages are the same functions ``dvc repro`` and the Prefect flows call. ``approve`` and
``reject`` do what the Resume form in the Prefect UI does (PREFECT_API_URL names the server).
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from tasks.entrypoint import report_user_errors, setup_logging

STAGES = {
    "prepare": ("tasks.data.prepare", "validate the data and write seeded stratified splits"),
    "train": ("tasks.model.train", "train the float32 baseline, then PTQ check, QAT, pruning, PQAT"),
    "convert": ("tasks.model.convert", "build every enabled TFLite / ONNX variant with its sidecar"),
    "evaluate": ("tasks.evaluation.evaluate", "measure every variant in its device runtime, apply the gates"),
    "benchmark": ("tasks.benchmark.stage", "measure every candidate on every device through its runner"),
    "register": ("tasks.registry.register", "log the run to MLflow and register the recommended variant"),
}


# commands that own their options: (module, what it does)
PASSTHROUGH = {
    "keys": ("tasks.registry.bundle", "generate an Ed25519 key pair for signing bundles"),
    "bundle": ("tasks.registry.bundle", "export a registered model version as a signed bundle"),
    "bench": ("edge.bench", "benchmark model files on this device (python -m edge.bench)"),
    "serve": ("edge.serving.serve", "run the edge inference service (python -m edge.serving.serve)"),
    "store": ("edge.store.storectl", "install, roll back or inspect a device's model store"),
    "ingest": ("tasks.monitoring.ingest", "run the control plane's sample ingest endpoint"),
    "package": ("tasks.packaging.package", "build, check and push the edge images of a registered model version"),
    "drift-check": ("tasks.monitoring.check", "run one drift check on the collected uploads now (no Prefect)"),
    "simulate-drift": ("tasks.monitoring.simulate_drift", "write realistically shifted device uploads (demos, tests)"),
    "labels": ("tasks.data.labels", "join arriving labels with collected samples into a new DVC data version"),
    "fleet": ("tasks.rollout.fleet_cli", "the fleet CA, device enrollment and revocation, broker logins and ACLs"),
    "services": ("tasks.stack.services", "start, stop or list the local services: Prefect, MLflow, worker, registry"),
    "engine": ("tasks.stack.dockerd", "start or stop the Docker engine packaging and the tests use"),
    "base-images": ("tasks.stack.base_images", "build the Debian-built Python base images (amd64, arm64)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop", description="edgeloop: data to edge devices and back.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `edgeloop COMMAND --help` for a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in STAGES.items():
        commands.add_parser(name, help=f"stage: {summary}", add_help=False)
    commands.add_parser("devices", help="print the device inventory and write it as CSV", add_help=False)
    for name, (_, summary) in PASSTHROUGH.items():
        commands.add_parser(name, help=summary, add_help=False)
    commands.add_parser("waiting", help="list retrain runs waiting for an approval decision")
    for verb, meaning in (("approve", "promote the run's challenger to champion"),
                          ("reject", "keep the champion; the challenger stays a candidate")):
        decision = commands.add_parser(verb, help=f"{meaning} (the Prefect UI's Resume form, from a terminal)")
        decision.add_argument("run", help="flow run name (e.g. crimson-otter) or id; see `edgeloop waiting`")
        decision.add_argument("--reviewer", required=True, help="who decides (recorded on the model version)")
        decision.add_argument("--comment", default="", help="why (recorded with the decision)")
    return parser


def _waiting() -> None:
    from tasks.approval import waiting_runs

    runs = waiting_runs()
    for run in runs:
        print(f"{run.name:24s} {run.id}  {run.state.name if run.state else '?':10s} since {run.state.timestamp}")
    if not runs:
        print("no retrain run is waiting for a decision")


def _decide(args: argparse.Namespace) -> None:
    from tasks.approval import decide

    run = decide(args.run, args.command == "approve", args.reviewer, args.comment)
    verdict = "approved" if args.command == "approve" else "rejected"
    print(f"{verdict} {run.name} ({run.id}) as {args.reviewer.strip()}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser().parse_known_args(argv)
    if args.command in STAGES:
        module = import_module(STAGES[args.command][0])
        return module.main(rest)
    if args.command in PASSTHROUGH:
        module = import_module(PASSTHROUGH[args.command][0])
        return module.main([args.command, *rest] if args.command in ("keys", "bundle") else rest)
    if args.command == "devices":
        from tasks.devices import main as devices_main

        return devices_main(rest)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging()
    return report_user_errors(_waiting if args.command == "waiting" else lambda: _decide(args))


if __name__ == "__main__":
    raise SystemExit(main())
