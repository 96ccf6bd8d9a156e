"""``edgeloop fleet``: the fleet's devices, their broker logins, and the fleet CA that certifies them.

    edgeloop fleet ca init                                  the fleet CA, its CRL and the control plane's certificate
    edgeloop fleet server-cert broker|ingest --host H ...   a TLS server's certificate (again: rotation)
    edgeloop fleet enroll DEVICE --group G [--class C] [--out DIR]   a device's kit: certificate, key, CA, keys, URLs
    edgeloop fleet revoke DEVICE [--superseded]             revoke its certificate(s); out of the fleet and ACL
    edgeloop fleet ca crl                                   sign the revocation list again (a fresh year)

    edgeloop fleet add-device DEVICE --group G [--class C] [--replace]   password login (the demo): printed once
    edgeloop fleet remove-device DEVICE
    edgeloop fleet list
    edgeloop fleet broker-files                             write the password file (not with TLS) and ACL

Each takes ``--params`` and, where it matters, ``--fleet FILE``, ``--credentials DIR`` and ``--ca-dir DIR``
(defaults: ``rollout.fleet_file``, ``rollout.credentials_dir``, ``rollout.fleet_ca_dir``). After a change
the broker must apply its files (``tasks.stack.mosquitto.reload_mosquitto``): a password broker re-reads
them on SIGHUP; a mutual-TLS broker is restarted (its sessions and queued messages persist), since
Mosquitto 2.0.11 does not re-check open TLS sessions on SIGHUP. The ingest service re-reads the CRL itself.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edge.identity import DEVICE_ID_RULE
from tasks.config import PARAMS_FILE, Params, load_params
from tasks.entrypoint import report_user_errors, setup_logging
from tasks.rollout import fleet, fleet_ca

LOGGER = logging.getLogger(__name__)
RELOAD = "apply it to the broker: restart a mutual-TLS broker (compose: `docker compose ... run --rm " \
         "mosquitto-credentials` then `restart mosquitto`), or SIGHUP a password broker"
CLASS_HELP = ("the device's class, its devices.yaml name: a per-class release sends it that class's variant "
              "(its updater needs the same --device-class; an enrollment kit carries it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop fleet", description="the device fleet, its broker logins "
                                     "(certificates from the fleet CA, or passwords) and its ACL")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ca = actions.add_parser("ca", help="the fleet certificate authority")
    ca.add_argument("ca_action", choices=["init", "crl"], help="init: create it; crl: sign the CRL again")
    server = actions.add_parser("server-cert", help="issue (or rotate) a TLS server's certificate")
    server.add_argument("name", help="broker or ingest (the name the servers look the files up by)")
    server.add_argument("--host", action="append", required=True,
                        help="a DNS name or IP address devices reach the server by (repeat for several)")
    server.add_argument("--days", type=int, default=fleet_ca.SERVER_DAYS, help="validity (default: %(default)s)")
    enroll = actions.add_parser("enroll", help="enroll a device: writes its kit (certificate, key, CA, keys, URLs)")
    enroll.add_argument("device", help=f"device id: {DEVICE_ID_RULE}")
    enroll.add_argument("--group", required=True, help="the device's rollout group")
    enroll.add_argument("--out", type=Path, help="kit folder (default: kits/<device>)")
    enroll.add_argument("--class", dest="device_class", help=CLASS_HELP)
    enroll.add_argument("--broker", help="broker HOST:PORT of the TLS listener (default: rollout.broker)")
    enroll.add_argument("--ingest-url", help="https ingest URL (default: rollout.ingest_url)")
    enroll.add_argument("--days", type=int, default=fleet_ca.DEVICE_DAYS, help="validity (default: %(default)s)")
    revoke = actions.add_parser("revoke", help="revoke a device's certificates and take it out of the fleet")
    revoke.add_argument("device")
    revoke.add_argument("--superseded", action="store_true",
                        help="after a re-enrollment: revoke all but the newest certificate, keep the device")
    add = actions.add_parser("add-device", help="add a device with a password login; prints the password once")
    add.add_argument("device", help=f"device id: {DEVICE_ID_RULE}")
    add.add_argument("--group", required=True, help="the device's rollout group")
    add.add_argument("--replace", action="store_true", help="re-issue the password of a known device")
    add.add_argument("--class", dest="device_class", help=CLASS_HELP)
    remove = actions.add_parser("remove-device", help="take a device out of the fleet and the broker files")
    remove.add_argument("device")
    listing = actions.add_parser("list", help="print each device, its group and its class")
    files = actions.add_parser("broker-files", help="write the Mosquitto password file and ACL; print their paths")
    for sub in (ca, server, enroll, revoke, add, remove, listing, files):
        sub.add_argument("--params", type=Path, default=PARAMS_FILE, help="parameter file (default: %(default)s)")
        sub.add_argument("--fleet", type=Path, help="fleet file (default: rollout.fleet_file)")
        sub.add_argument("--credentials", type=Path, help="folder of the broker password file, ACL and "
                         "control-plane password, kept 0600 (default: rollout.credentials_dir)")
        sub.add_argument("--ca-dir", type=Path, help="the fleet CA folder (default: rollout.fleet_ca_dir)")
    return parser


def _certificates(args: argparse.Namespace, params: Params | None) -> None:
    if args.action == "ca":
        if args.ca_action == "init":
            ca = fleet_ca.init_ca(args.ca_dir)
            print(ca.certificate_path)
            LOGGER.info("fleet CA created in %s (keep ca.key 0600, back the folder up); the control plane's "
                        "certificate is %s", ca.root, ca.control_plane.certificate)
        else:
            print(fleet_ca.resign_crl(fleet_ca.open_ca(args.ca_dir)))
            LOGGER.info("CRL signed again; %s", RELOAD)
    elif args.action == "server-cert":
        pair = fleet_ca.issue_server(fleet_ca.open_ca(args.ca_dir), args.name, args.host, args.days)
        print(pair.certificate)
        LOGGER.info("%s certificate for %s written; restart or signal the %s to load it", args.name,
                    ", ".join(args.host), args.name)
    elif args.action == "enroll":
        assert params is not None
        settings = params.rollout
        kit = fleet.enroll_device(args.fleet, args.credentials, args.ca_dir, args.device, args.group,
                                  args.out or Path("kits") / args.device, broker=args.broker or settings.broker,
                                  ingest_url=args.ingest_url or settings.ingest_url,
                                  public_keys=[params.package.public_keys], days=args.days,
                                  device_class=args.device_class)
        print(kit)
        LOGGER.info("device %s enrolled in %s: copy %s to it (tls/device.key stays secret); %s", args.device,
                    args.group, kit, RELOAD)
    else:
        serials = fleet.revoke_device(args.fleet, args.credentials, args.ca_dir, args.device, args.superseded)
        for serial in serials:
            print(serial)
        LOGGER.info("revoked %d certificate(s) of %s; %s (the ingest service re-reads the CRL by itself)",
                    len(serials), args.device, RELOAD)


def _logins(args: argparse.Namespace, tls: bool) -> None:
    if args.action == "add-device":
        print(fleet.add_device(args.fleet, args.credentials, args.device, args.group, args.replace,
                               device_class=args.device_class))
        LOGGER.info("device %s: password printed above, shown only once; %s", args.device, RELOAD)
    elif args.action == "remove-device":
        fleet.remove_device(args.fleet, args.credentials, args.device, tls=tls)
        LOGGER.info("device %s removed; %s", args.device, RELOAD)
    elif args.action == "list":
        inventory = fleet.load_fleet(args.fleet)
        for group, devices in inventory.groups().items():
            for device in devices:
                print(f"{device}\t{group}\t{inventory.devices[device].device_class or '-'}")
    else:
        for path in fleet.write_broker_files(fleet.load_fleet(args.fleet), args.credentials, tls=tls):
            print(path)


NEEDS = {"ca": ("ca_dir",), "server-cert": ("ca_dir",)}  # the paths an action reads; others: fleet, credentials


def _run(args: argparse.Namespace) -> None:
    needed = NEEDS.get(args.action, ("fleet", "credentials", *(("ca_dir",) if args.action in ("enroll", "revoke")
                                                               else ())))
    # enroll takes the signing keys from the params; broker-files and remove-device the broker's kind (when
    # the params file is there: without one, a password broker)
    wanted = args.action == "enroll" or (args.action in ("broker-files", "remove-device") and args.params.is_file())
    params = load_params(args.params) if wanted or any(getattr(args, name) is None for name in needed) else None
    if params is not None:
        settings = params.rollout
        args.fleet = args.fleet or settings.fleet_file
        args.credentials = args.credentials or settings.credentials_dir
        args.ca_dir = args.ca_dir or settings.fleet_ca_dir
    if args.action in ("ca", "server-cert", "enroll", "revoke"):
        _certificates(args, params)
    else:
        _logins(args, params is not None and params.rollout.broker_tls)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return report_user_errors(lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
