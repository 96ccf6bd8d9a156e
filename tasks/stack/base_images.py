"""``make base-images``: the Debian-built Python images (tasks/packaging/base_images.py), with an engine: the
host's base (builder stages) and every architecture's runtime (edge images' final stage); ``--control-plane``:
also the compose control plane's images (tasks/packaging/control_plane_images.py).

    edgeloop base-images [--arch amd64 arm64] [--control-plane]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.errors import EdgeloopError
from tasks.packaging.base_images import PLATFORMS, ensure_base_image, host_arch
from tasks.packaging.control_plane_images import ensure_control_plane_images
from tasks.packaging.docker_client import connect
from tasks.stack.services import REPO_ROOT, ServiceError, start_docker_engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(PLATFORMS), choices=PLATFORMS)
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".run")
    parser.add_argument("--control-plane", action="store_true",
                        help="also the images docker/compose.control-plane.yml runs (amd64), built with no hub")
    args = parser.parse_args(argv)
    try:
        start_docker_engine(args.run_dir)
        engine = connect()
        try:
            for arch in args.arch:  # the control plane's images right after amd64 (CI's warm-up: tests wait on them)
                if arch == host_arch():
                    print(ensure_base_image(arch, engine))
                print(ensure_base_image(arch, engine, runtime=True))
                if arch == "amd64" and args.control_plane:
                    for setting, tag in ensure_control_plane_images(engine).items():
                        print(f"{setting}={tag}")
        finally:
            engine.close()
    except (ServiceError, EdgeloopError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
