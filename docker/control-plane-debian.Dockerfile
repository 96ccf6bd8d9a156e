# PostgreSQL 15, Redis 7, Mosquitto 2, the image registry and Prometheus from Debian's packages, for
# docker/compose.control-plane.yml where no image hub is reachable. BASE_IMAGE is a debootstrap root holding all
# five (tasks/packaging/control_plane_images.py imports it); each target gives one of them the entry point and
# the paths of its official image, so the compose file runs either (EDGELOOP_*_IMAGE picks).
ARG BASE_IMAGE=edgeloop/control-plane-root:bookworm-amd64

FROM ${BASE_IMAGE} AS postgres
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/bin:/bin
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh && mkdir -p /docker-entrypoint-initdb.d
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]

FROM ${BASE_IMAGE} AS redis
RUN mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]

FROM ${BASE_IMAGE} AS mosquitto
RUN mkdir -p /mosquitto/config /mosquitto/data /mosquitto/log && chown -R mosquitto:mosquitto /mosquitto
EXPOSE 1883
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]

FROM ${BASE_IMAGE} AS registry
ENV REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=/var/lib/registry REGISTRY_AUTH=""
RUN mkdir -p /var/lib/registry && sed -i '/^auth:/,/^[^ ]/{/^auth:/d;/^  /d}' /etc/docker/registry/config.yml
EXPOSE 5000
ENTRYPOINT ["/usr/bin/docker-registry", "serve"]
CMD ["/etc/docker/registry/config.yml"]

FROM ${BASE_IMAGE} AS prometheus
RUN mkdir -p /prometheus /etc/prometheus && chown prometheus:prometheus /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
