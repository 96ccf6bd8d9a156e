# edgeloop: `make demo` sets up .venv and runs the pipeline on the bundled data; `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc.yaml stages call `edgeloop <stage>`: they must find the venv's `edgeloop` (and python) first.
export PATH := $(CURDIR)/$(BIN):$(PATH)

PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
PREFECT_ENV := PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: demo demo-loop edge-demo down services control-plane control-plane-compose image-services base-images image repro test test-fast lint lock \
	clean-outputs system-packages

# The Debian packages of setup/system-packages.txt (engine, registry, debootstrap, qemu, broker, sshd, browser, wrk):
# installed when missing as root; otherwise the one `sudo apt-get install ...` line and what will not run.
system-packages:
	@setup/system-packages.sh

# The lock is installed by uv (parallel downloads and unpacking, bytecode compiled over every core: ~50 s from an
# empty cache here, pip took ~120 s); pip installs it where uv cannot run or reach the index.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3 uv==0.13.8
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -r requirements.lock \
	  || { echo "uv could not install the lock: pip installs it"; $(BIN)/pip install --quiet -r requirements.lock; }
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Starts (or reuses) a Prefect server, an MLflow server, a worker, a Docker engine and the image registry,
# creates the signing key if missing, deploys prefect.yaml and runs the training flow once through the worker,
# packaging the candidate's images (amd64, and arm64 under qemu; skipped, with the reason, where no engine can
# run). Outputs go to workspace/. Leaves everything running: `make down` stops it.
demo: system-packages $(STAMP)
	$(PREFECT_ENV) $(BIN)/python -m scripts.demo --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

# The whole loop (after `make demo`): 20 simulated devices (edge service + updater each) on a Mosquitto with
# per-device logins, drifted traffic, the drift check firing, the retrain approved, canary -> full rollout;
# then a deliberately bad challenger approved and rolled back automatically. ARGS=--interactive: approve
# in the Prefect UI yourself.
demo-loop: system-packages image-services keys/control-plane.key
	$(PREFECT_ENV) $(BIN)/prefect --no-prompt deploy --all > .run/deploy.log
	$(PREFECT_ENV) MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) $(BIN)/python -m scripts.demo_loop $(ARGS)

# The candidate `make demo` registered, signed, installed in a local store (.run/edge) and served on :8080.
edge-demo: services
	MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) $(BIN)/python -m scripts.edge_demo

services: $(STAMP)
	$(BIN)/edgeloop services up --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

# The control plane for a team: the same servers with their state in PostgreSQL (ours on 127.0.0.1:5433, data in
# /var/lib/edgeloop/postgres as root, else ~/.cache/edgeloop/postgres). `make down` first if SQLite ones run.
control-plane: system-packages $(STAMP)
	$(BIN)/edgeloop services up --database postgres --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

# The same control plane as containers (docker/compose.control-plane.yml), its images built here with no hub
# (PostgreSQL, Mosquitto, registry, Prometheus from Debian's packages; Prefect and MLflow from the lock's wheels).
# Needs docker/control-plane.env (from docker/control-plane.env.example). `docker-compose ... down` stops it.
control-plane-compose: system-packages $(STAMP)
	$(BIN)/edgeloop base-images --arch amd64 --control-plane
	DOCKER_HOST=$$($(BIN)/python -c "from tasks.packaging.docker_client import find_engine; print(find_engine())") \
	  docker-compose -f docker/compose.control-plane.yml --env-file docker/control-plane.env up -d

# The servers plus a Docker engine (ours, unless one answers) and the image registry (127.0.0.1:5050).
image-services: system-packages $(STAMP)
	$(BIN)/edgeloop services up --images --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

# Python 3.11 base images from Debian packages (debootstrap): the host's base (builds) and each architecture's
# runtime (edge images run on it), for hosts without Docker Hub.
base-images: $(STAMP)
	$(BIN)/edgeloop base-images

# The signing key pair bundles are signed with (the private key never leaves the control plane).
keys/control-plane.key: | $(STAMP)
	$(BIN)/edgeloop keys generate --name control-plane

# One-off build of the images of the registered candidate (or VERSION=N): built, checked, pushed.
image: image-services keys/control-plane.key
	MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) $(BIN)/edgeloop package $(if $(VERSION),--version $(VERSION))

down:
	@test -x $(BIN)/python && $(BIN)/edgeloop services down || echo "nothing to stop"

# The same stages without Prefect, straight from dvc.yaml (local SQLite MLflow store). The package stage needs
# the Docker engine and the registry: started here as for the demo. Writes the repository's outputs and the
# git-tracked experiment metrics (reports/metrics.json, train_metrics.json).
repro: system-packages image-services keys/control-plane.key
	$(BIN)/dvc repro

# The whole suite. As root, the Debian base images (amd64 ~70 s, the compose control plane's ~95 s, arm64's
# runtime ~30 s, unpacked on the host; on a machine's first run, cached in ~/.cache/edgeloop) are built beside
# the first tests, which wait on the same cache locks; the engine
# that warm-up started, if any, is stopped afterwards.
WARMUP := .run/test-warmup
# One session over two pytest-xdist workers, a test file at a time each (most of the e2e and integration tests'
# time is spent waiting on servers, flows and containers; each worker starts the servers it needs, they share
# the Docker engine), in collection order (--no-loadscope-reorder): tests/conftest.py collects the files that
# wait for the warm-up's images after the other e2e and integration tests, and the unit tests last, so they
# fill both cores while the last long integration test runs (they used to run after it, in a session of their
# own: 2-3 min more). PYTEST_ARGS runs what it names, in one session.
ifeq ($(strip $(PYTEST_ARGS)),)
PYTEST_RUN := $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder tests/e2e tests/integration \
	tests/unit || status=$$?;
else
PYTEST_RUN := $(BIN)/python -m pytest $(PYTEST_ARGS) || status=$$?;
endif
test: system-packages $(STAMP)
	@mkdir -p $(WARMUP); warm=; \
	if [ "$$(id -u)" = 0 ]; then $(BIN)/edgeloop base-images --run-dir $(WARMUP) --control-plane > $(WARMUP)/log 2>&1 & warm=$$!; fi; \
	status=0; $(PYTEST_RUN) \
	if [ -n "$$warm" ]; then wait $$warm || { echo "base image warm-up failed:"; tail -20 $(WARMUP)/log; }; \
	  $(BIN)/edgeloop engine down --run-dir $(WARMUP) --only-this-run > /dev/null; fi; \
	exit $$status

# The unit tests only (no servers, no containers), spread over every core by pytest-xdist: the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n auto tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .

# Re-resolve requirements.in and rewrite the exact pins.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet -r requirements.in
	{ echo "# Exact pins for .venv, generated by 'make lock' from requirements.in (Python 3.11)."; \
	  .lock-venv/bin/pip freeze; } > requirements.lock && rm -rf .lock-venv

clean-outputs:
	rm -rf data/prepared models reports
