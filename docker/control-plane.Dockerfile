# Prefect (server and worker) and MLflow (tracking server) for docker/compose.control-plane.yml, built with no image
# hub: `edgeloop base-images --control-plane` (tasks/packaging/control_plane_images.py) assembles the context, a
# wheelhouse resolved on the host from requirements.lock (prefect, mlflow, the PostgreSQL drivers), and builds
# it on the Debian-built Python base. One image, two commands: `prefect server start ...` / `mlflow server ...`.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
COPY wheelhouse/ /wheelhouse/
RUN python3 -m venv --without-pip /opt/edgeloop \
 && python3 /wheelhouse/pip.whl/pip --python /opt/edgeloop/bin/python install --no-index --no-cache-dir \
        --no-compile --find-links /wheelhouse --requirement /wheelhouse/requirements.txt \
 && find /opt/edgeloop -depth \( -name tests -o -name __pycache__ \) -type d -exec rm -rf {} +

FROM ${BASE_IMAGE}
ARG EDGELOOP_UID=10001
RUN useradd --system --uid ${EDGELOOP_UID} --create-home --home-dir /var/lib/edgeloop --shell /usr/sbin/nologin \
        edgeloop \
 && mkdir -p /var/lib/mlflow/artifacts && chown edgeloop:edgeloop /var/lib/mlflow /var/lib/mlflow/artifacts
COPY --from=builder /opt/edgeloop /opt/edgeloop
ENV PATH=/opt/edgeloop/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFECT_HOME=/var/lib/edgeloop/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
USER edgeloop
WORKDIR /var/lib/edgeloop
