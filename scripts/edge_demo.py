"""``make edge-demo``: the last registered candidate, signed, installed in a local store and served.

Generates a demo signing key (``.run/keys``) once, exports the ``candidate`` alias from the MLflow
server ``make demo`` started (with ``tflite_fp32`` as the cascade's second stage), installs the bundle
into ``.run/edge/models``, starts ``edge.serving.serve`` on loopback and sends it one real test digit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

from tasks.stack import services

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".run")
    parser.add_argument("--port", type=int, default=int(os.environ.get("EDGELOOP_EDGE_PORT", 8080)))
    args = parser.parse_args(argv)

    import numpy as np

    from edge.errors import EdgeError
    from edge.signing import load_public_keys
    from edge.store.model_store import ModelStore
    from flows.parameters import FLOW_WORKSPACE
    from tasks.config import load_params
    from tasks.errors import EdgeloopError
    from tasks.registry.bundle import export_registered, generate_keypair
    from tasks.workspace import Workspace

    keys, edge = args.run_dir / "keys", args.run_dir / "edge"
    try:
        if not (keys / "demo.key").exists():
            generate_keypair(keys, "demo")
        bundle = export_registered(load_params(REPO_ROOT / "params.yaml"), args.run_dir / "bundles", keys / "demo.key",
                                   alias="candidate", large_variant="tflite_fp32")
        manifest = ModelStore(edge / "models", load_public_keys([keys / "demo.pub"])).install(bundle)
    except (EdgeError, EdgeloopError) as error:
        print(f"error: {error} (run `make demo` first)", file=sys.stderr)
        return 2
    settings = {"store": edge / "models", "public_keys": keys / "demo.pub", "samples_dir": edge / "samples",
                "cascade_threshold": 0.85, "thermal_sensor": edge / "no-sensor", "device_id": "demo-device"}
    server = services.start_edge_server(args.run_dir, args.port, {k: str(v) for k, v in settings.items()})
    digit = np.load(Workspace(FLOW_WORKSPACE).split_file("test"))["x"][:1]
    request = urllib.request.Request(f"{server.url}/v1/predict", data=json.dumps({"inputs": digit.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    print(f"installed {manifest.model_name} {manifest.version} ({manifest.variant}) from {bundle}")
    print(f"edge service:  {server.url}  (pid {server.pid}, log {server.log}; `make down` stops it)")
    print(f"one test digit -> label {answer['predictions'][0]['label']} "
          f"confidence {answer['predictions'][0]['confidence']:.3f} stage {answer['predictions'][0]['stage']}")
    print(f"try: curl -s {server.url}/v1/model | head; curl -s {server.url}/metrics | grep ^edgeloop_")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
