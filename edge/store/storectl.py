"""``python -m edge.store.storectl`` (and ``edgeloop store``): install, roll back and inspect a device's model store.

    storectl install BUNDLE     verify, health-check and activate a signed bundle
    storectl rollback           make the previous version active again
    storectl status             the store's state and any inconsistency (exit 1 when inconsistent)

``--store``, ``--public-keys`` and ``--keep-versions`` default to ``EDGELOOP_STORE``,
``EDGELOOP_PUBLIC_KEYS`` and ``EDGELOOP_KEEP_VERSIONS``, like the server's. A running server
notices the switch within its watch interval (or ``POST /v1/model/reload``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from edge.config import DATA_ROOT, ENV_PREFIX
from edge.errors import EXIT_USER_ERROR, EdgeError
from edge.signing import load_public_keys
from edge.store.model_store import ModelStore


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge.store.storectl", description="manage the device's model store")
    parser.add_argument("--store", type=Path, default=Path(os.environ.get(f"{ENV_PREFIX}STORE", DATA_ROOT / "models")),
                        help="store folder (default: %(default)s) [EDGELOOP_STORE]")
    parser.add_argument("--public-keys", type=Path, action="append",
                        help="a trusted public key file or folder; repeat the option for several "
                             "[EDGELOOP_PUBLIC_KEYS, ':'-separated]")
    parser.add_argument("--keep-versions", type=int, default=int(os.environ.get(f"{ENV_PREFIX}KEEP_VERSIONS", 3)),
                        help="versions kept, as the server's --keep-versions (default: %(default)s) "
                             "[EDGELOOP_KEEP_VERSIONS]")
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="install and activate a signed bundle")
    install.add_argument("bundle", type=Path)
    install.add_argument("--no-activate", action="store_true", help="install only (e.g. for a shadow version)")
    rollback = commands.add_parser("rollback", help="make the previous version active again")
    rollback.add_argument("--reason", default="requested with storectl rollback")
    commands.add_parser("status", help="print the state and check consistency")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from_env = os.environ.get(f"{ENV_PREFIX}PUBLIC_KEYS", "")
    args.public_keys = args.public_keys or [Path(part) for part in from_env.split(":") if part]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        store = ModelStore(args.store, load_public_keys(args.public_keys), args.keep_versions)
        if args.command == "install":
            manifest = store.install(args.bundle, activate=not args.no_activate)
            print(f"installed {manifest.model_name} {manifest.version} ({manifest.variant})")
        elif args.command == "rollback":
            print(f"active: {store.rollback(args.reason)}")
        else:
            problems = store.problems()
            print(json.dumps({**asdict(store.state()), "problems": problems}, indent=2))
            return 1 if problems else 0
    except EdgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
