"""Serving benchmark: what the edge service adds over the bare runtime, against ``mlflow models serve``.

For the default int8 model (``digits_cnn``, 8x8x1) and a ``resnet8``-sized int8 model (32x32x3):
- ``EdgeModel.predict`` in-process, one sample, p50 (the floor);
- ``edge.serving.serve`` over loopback HTTP with ``wrk`` (Debian ``wrk``; a JSON POST of one sample) at
  concurrency 1 and 8: p50 and requests/s;
- the same model as the MLflow pyfunc (``tasks/registry/edge_pyfunc.py``) served by
  ``mlflow models serve --env-manager local`` under the same load;
- the server's RSS with the int8 model loaded, after the load;
- the same for the default model in the armv7 image (built as ``edgeloop package`` builds it) under qemu in the
  256 MB device's profile: the qemu process's memory, the emulator's own included (``--no-armv7`` skips it).
The default model is ``digits_cnn`` trained for a few epochs on the bundled digits and sent real
test digits, so the sampler sees a realistic confidence mix (2% kept, plus the rows under 0.85).
``resnet8`` has random weights and random inputs: every prediction is under the confidence floor and
kept, the sampler's worst case. Both are converted to full int8. Host figures, not device figures.

    .venv/bin/python bench/serve.py [--seconds 5]

Last line: ``serve_added_p50_ms=<x> serve_rps_c8=<y> mlflow_p50_ratio=<edgeloop p50 / mlflow p50>
serve_rss_mb=<z> serve_rss_mb_armv7_emulated=<w>`` (for the default int8 model). Targets: added p50 <= 1 ms at
concurrency 1, p50 at most half of MLflow's, RSS <= 64 MB (a quarter of the 256 MB device).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from edge.bench.measure import measure_latency  # noqa: E402
from edge.runtime import EdgeModel  # noqa: E402
from edge.signing import load_public_keys  # noqa: E402
from edge.store.model_store import ModelStore  # noqa: E402
from tasks.stack import services  # noqa: E402

MODELS = {"digits_cnn": (8, 8, 1), "resnet8": (32, 32, 3)}


def build_int8_model(name: str, shape: tuple[int, int, int], folder: Path, data: np.ndarray | None = None,
                     labels: np.ndarray | None = None) -> Path:
    """A zoo model (trained on ``data`` when given, else random weights) as a full-int8 .tflite with a sidecar."""
    from edge.sidecar import write_sidecar
    from tasks.model import exporters
    from tasks.model.tfsetup import set_seeds
    from tasks.model.zoo import build_model

    set_seeds(0)
    model = build_model(name, shape, 10)
    if data is not None:
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(data, labels, epochs=15, batch_size=32, verbose=0)
    rng = np.random.default_rng(0)
    representative = data[:200] if data is not None else rng.random((64, *shape), dtype=np.float32)
    path = folder / f"{name}_int8.tflite"
    path.write_bytes(exporters.tflite_bytes(model, "int8", representative))
    write_sidecar(path, {"variant": "tflite_int8", "runtime": "tflite", "labels": [str(i) for i in range(10)],
                         "input": {"shape": [-1, *shape]}, "data_version": "bench", "git_commit": "bench",
                         "params_hash": "bench"})
    return path


def wrk(url: str, body: str, connections: int, seconds: float, scratch: Path) -> dict[str, float]:
    """p50 latency (ms) and requests/s of ``wrk`` POSTing ``body`` (JSON) at ``connections`` concurrency."""
    script = scratch / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(body)}\n")
    duration = f"{max(1, round(seconds))}s"
    completed = subprocess.run(["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", duration,
                                "--latency", "-s", str(script), url], capture_output=True, text=True, check=True)
    text = completed.stdout
    if re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        raise RuntimeError(f"wrk saw error responses from {url}:\n{text}")
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p50.group(2)]
    return {"p50_ms": float(p50.group(1)) * scale, "rps": float(rps.group(1))}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def serve_edgeloop(model_file: Path, sample: np.ndarray, scratch: Path) -> services.Service:
    from tasks.registry.bundle import bundle_from_files, generate_keypair, load_private_key

    private_path, public_path = generate_keypair(scratch / "keys", "bench")
    bundle = bundle_from_files(scratch / "bundle.tar.gz", "v1", "bench", "1", None, {"primary": model_file},
                               sample, load_private_key(private_path))
    ModelStore(scratch / "store", load_public_keys([public_path])).install(bundle)
    settings = {"store": scratch / "store", "public_keys": public_path, "samples_dir": scratch / "samples",
                "upload_to": scratch / "outbox", "num_threads": 1, "log_level": "WARNING"}
    return services.start_edge_server(scratch / "run", services.free_port(), {k: str(v) for k, v in settings.items()})


def serve_mlflow(model_file: Path, scratch: Path) -> services.Service:
    import mlflow

    from edge.sidecar import sidecar_path
    from tasks.registry.register import EDGE_PACKAGE, PYFUNC_FILE

    variant = scratch / "variant"
    variant.mkdir()
    for path in (model_file, sidecar_path(model_file)):
        shutil.copy(path, variant / path.name)
    model_dir = scratch / "pyfunc"
    mlflow.pyfunc.save_model(str(model_dir), python_model=str(PYFUNC_FILE), artifacts={"variant": str(variant)},
                             code_paths=[str(EDGE_PACKAGE)])
    port = services.free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(model_dir), "-p", str(port),
               "-h", "127.0.0.1", "--env-manager", "local"]
    venv_first = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its uvicorn
    return services.start("mlflow-serve", command, scratch / "run-mlflow", venv_first, f"http://127.0.0.1:{port}/ping",
                          f"http://127.0.0.1:{port}", timeout_s=120)


def bench_model(name: str, shape: tuple[int, int, int], seconds: float, root: Path) -> dict[str, float]:
    scratch = root / name
    scratch.mkdir()
    if name == "digits_cnn":
        from tasks.data.sources import load_sklearn_digits

        digits = load_sklearn_digits()
        model_file = build_int8_model(name, shape, scratch, digits.x[:1400], digits.y[:1400])
        sample = digits.x[1400:1408]  # held-out digits
    else:
        model_file = build_int8_model(name, shape, scratch)
        sample = np.random.default_rng(1).random((8, *shape), dtype=np.float32)
    raw = measure_latency(EdgeModel.load(model_file, num_threads=1), sample[0], warmup_runs=200, runs=3000)
    body = json.dumps({"inputs": sample[:1].tolist()})
    confidence = float(EdgeModel.load(model_file).predict(sample[:1]).max())
    result = {"raw_p50_ms": raw.p50_ms, "sample_confidence": confidence}
    np.save(scratch / "sample.npy", sample)  # the armv7 measurement sends the same
    edge = serve_edgeloop(model_file, sample, scratch)
    try:
        wrk(f"{edge.url}/v1/predict", body, 1, 1, scratch)  # warm-up
        for connections in (1, 8):
            figures = wrk(f"{edge.url}/v1/predict", body, connections, seconds, scratch)
            result[f"serve_p50_ms_c{connections}"] = figures["p50_ms"]
            result[f"serve_rps_c{connections}"] = figures["rps"]
        result["serve_rss_mb"] = rss_mb(edge.pid)
    finally:
        services.stop("edge-serve", scratch / "run")
    mlflow_server = serve_mlflow(model_file, scratch)
    try:
        wrk(f"{mlflow_server.url}/invocations", body, 1, 1, scratch)
        for connections in (1, 8):
            figures = wrk(f"{mlflow_server.url}/invocations", body, connections, seconds, scratch)
            result[f"mlflow_p50_ms_c{connections}"] = figures["p50_ms"]
            result[f"mlflow_rps_c{connections}"] = figures["rps"]
    finally:
        services.stop("mlflow-serve", scratch / "run-mlflow")
    result["serve_added_p50_ms"] = result["serve_p50_ms_c1"] - raw.p50_ms
    result["mlflow_p50_ratio"] = result["serve_p50_ms_c1"] / result["mlflow_p50_ms_c1"]
    return result


def armv7_rss_mb(model_file: Path, sample: np.ndarray, seconds: float, root: Path) -> float:
    """The service's resident memory in the armv7 image (built as ``edgeloop package`` builds it) under qemu, in
    the 256 MB device's profile, after ``wrk`` at concurrency 1 for ``seconds``: the qemu process's memory (the
    emulator's own included, so above what a real armv7 core would hold), labelled emulated."""
    from image import build_image, image_engine  # bench/image.py, beside this script

    import docker
    from tasks.config import load_params
    from tasks.devices import load_devices
    from tasks.packaging.docker_client import running
    from tasks.registry.bundle import bundle_from_files, generate_keypair, load_private_key

    settings = load_params(Path(__file__).resolve().parents[1] / "params.yaml").package
    device = load_devices(Path(__file__).resolve().parents[1] / "devices.yaml").get(settings.check_device)
    private, public = generate_keypair(root / "keys-armv7", "bench")
    bundle = bundle_from_files(root / "armv7.tar.gz", "v1", "bench", "1", None, {"primary": model_file}, sample,
                               load_private_key(private))
    with image_engine(root / "engine") as (engine, registry):
        tag = build_image(engine, registry, settings, bundle, public, "linux/arm/v7", root)
        with running(engine.client, tag, "linux/arm/v7", device.runner.cpus, device.runner.memory_mb, 240,
                     emulated=True) as container:
            wrk(f"{container.url}/v1/predict", json.dumps({"inputs": sample[:1].tolist()}), 1, seconds, root)
            return rss_mb(docker.from_env().containers.get(container.container.id).attrs["State"]["Pid"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per measurement")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--no-armv7", dest="armv7", action="store_false",
                        help="skip the armv7 image under qemu (needs a Docker engine and qemu-user-static)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-serve-") as scratch:
        for name in args.models:
            started = time.perf_counter()
            results[name] = bench_model(name, MODELS[name], args.seconds, Path(scratch))
            figures = " ".join(f"{key}={value:.3f}" for key, value in results[name].items())
            print(f"{name}: {figures} ({time.perf_counter() - started:.0f} s)", flush=True)
        default = results[args.models[0]]
        armv7 = ""
        if args.armv7:
            scratch_armv7 = Path(scratch) / "armv7"
            scratch_armv7.mkdir()
            folder = Path(scratch) / args.models[0]
            rss = armv7_rss_mb(folder / f"{args.models[0]}_int8.tflite", np.load(folder / "sample.npy"),
                               args.seconds, scratch_armv7)
            print(f"armv7 image under qemu (--cpus 1 --memory 256m): RSS {rss:.1f} MB (emulated: the qemu process, "
                  "the emulator's own memory included)")
            armv7 = f" serve_rss_mb_armv7_emulated={rss:.1f}"
    print(f"serve_added_p50_ms={default['serve_added_p50_ms']:.3f} serve_rps_c8={default['serve_rps_c8']:.0f} "
          f"mlflow_p50_ratio={default['mlflow_p50_ratio']:.3f} serve_rss_mb={default['serve_rss_mb']:.1f}{armv7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
