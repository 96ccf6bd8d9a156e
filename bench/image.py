"""Image benchmark: size and cold start of the default edge image (amd64, LiteRT, the digits int8 model).

Builds the image exactly as ``edgeloop package`` does (build context, base image, BuildKit through the
Engine API), starting a dockerd and a registry the way the tests do when none is reachable and
stopping them afterwards, then starts it 5 times with the ``package.check_device`` profile's cpus and
memory and takes the median time from ``docker run`` to the first 200 from ``/readyz``. The first run
on a machine also builds the Debian base image and resolves the wheelhouse (cached afterwards; not
part of the figures). Last line: ``image_mb=<x> cold_start_s=<y>``. Targets: at most 250 MB and 5 s.

    .venv/bin/python bench/image.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from serve import build_int8_model  # noqa: E402  (bench/serve.py, beside this script)

from tasks.config import load_params  # noqa: E402
from tasks.devices import load_devices  # noqa: E402
from tasks.packaging import docker_client as docker_engine  # noqa: E402
from tasks.packaging.docker_client import CACHE_DIR  # noqa: E402
from tasks.packaging.image_build import REPO_ROOT, build_context, resolve_base_image  # noqa: E402
from tasks.packaging.oci_registry import Registry  # noqa: E402
from tasks.stack import services  # noqa: E402

PLATFORM = "linux/amd64"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    from sklearn.datasets import load_digits

    from tasks.registry.bundle import bundle_from_files, generate_keypair, load_private_key

    settings = load_params(REPO_ROOT / "params.yaml").package
    device = load_devices(REPO_ROOT / "devices.yaml").get(settings.check_device)
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-image-") as scratch:
        root = Path(scratch)
        saved_host = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = services.start_docker_engine(root / "run")
        registry = Registry(f"127.0.0.1:{services.free_port()}")
        services.start_registry(root / "run", int(registry.address.rsplit(":", 1)[1]))
        engine = docker_engine.connect()
        try:
            digits = load_digits()
            x = (digits.images / 16.0).astype("float32")[..., None]
            model = build_int8_model("digits_cnn", (8, 8, 1), root, x[:1200], digits.target[:1200])
            private, public = generate_keypair(root / "keys", "bench")
            bundle = bundle_from_files(root / "bundle.tar.gz", "v1", "bench", "1", None, {"primary": model},
                                       x[1200:1216], load_private_key(private))
            (root / "context").mkdir()
            build_context(bundle, [public], PLATFORM, CACHE_DIR, root / "context")
            base, runtime_base = resolve_base_image(engine, settings.base_image, "amd64", registry)
            tag = f"{registry.address}/edgeloop/bench:image"
            docker_engine.build(engine.client, root / "context", tag, PLATFORM, base, {"edgeloop.bench": "image"},
                                runtime_base=runtime_base)
            image_mb = docker_engine.image_mb(engine.client, tag)
            starts = []
            for run in range(args.runs):
                with docker_engine.running(engine.client, tag, PLATFORM, device.runner.cpus,
                                           device.runner.memory_mb, 60) as container:
                    starts.append(container.ready_s)
                print(f"run {run + 1}: ready in {container.ready_s:.2f} s "
                      f"(--cpus {device.runner.cpus} --memory {device.runner.memory_mb}m, {settings.check_device})")
            engine.client.images.remove(tag, force=True)
        finally:
            engine.close()
            services.stop("registry", root / "run")
            services.stop("dockerd", root / "run")  # only a dockerd this script started
            if saved_host is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = saved_host
    print(f"image: {image_mb:.1f} MB on {runtime_base} (target <= {settings.max_image_mb:g}); cold start median of "
          f"{len(starts)}: {statistics.median(starts):.2f} s (target <= {settings.max_start_s:g})")
    print(f"image_mb={image_mb:.1f} cold_start_s={statistics.median(starts):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
