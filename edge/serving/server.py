"""Everything one edge server owns, built from its config: store, engine, sampling, uploads, telemetry.

The HTTP routes (:mod:`edge.serving.routers`) only call into this. ``start``/``stop`` run the background work:
the sampling worker, the uploader (when ``upload_to`` is set) and ``watch``, which reloads when
``state.json`` changes and closes sample files that reached their age.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from edge.config import ServeConfig
from edge.errors import ConfigError
from edge.sampling.sampler import Sampler, SampleStore
from edge.sampling.upload import FolderTarget, HttpTarget, Uploader
from edge.sampling.worker import SamplingWorker
from edge.serving.engine import InferenceEngine
from edge.serving.metrics import Metrics
from edge.serving.thermal import STATES, ThermalMonitor
from edge.signing import load_public_keys
from edge.store.model_store import ModelStore

log = logging.getLogger(__name__)


class Services:
    def __init__(self, config: ServeConfig) -> None:
        self.config, self.metrics = config, Metrics()
        self.admin_token = config.secret("admin_token")
        self.max_bundle_bytes = int(config.max_bundle_mb * 2**20)
        self.thermal = ThermalMonitor(config.thermal_sensor, config.thermal_limit_c, config.thermal_soft_margin_c,
                                      config.thermal_hard_margin_c)
        self.store = ModelStore(config.store, load_public_keys(config.public_keys), config.keep_versions,
                                self.max_bundle_bytes, on_event=self.metrics.store_event)
        self.engine = InferenceEngine(self.store, self.metrics, self.thermal, config.num_threads,
                                      config.cascade_threshold, config.shadow_version, config.shadow_fraction)
        self.samples = SampleStore(config.samples_dir, int(config.sample_budget_mb * 2**20),
                                   config.sample_file_records, config.sample_file_age_s, config.store_raw)
        self.sampler = Sampler(self.samples, config.device_id, config.sample_rate, config.confidence_floor)
        self.sampling = SamplingWorker(self.sampler)
        target = self._upload_target()
        self.uploader = None if target is None else Uploader(self.samples, target,
                                                             paused=lambda: not self.thermal.allows_uploads)
        self._export_metrics()

    def _upload_target(self) -> FolderTarget | HttpTarget | None:
        target = self.config.upload_to
        if not target:
            return None
        if target.startswith(("http://", "https://")):
            token, tls = self.config.secret("upload_token"), self.config.client_tls()
            if token is None and (tls is None or not tls.mutual):
                raise ConfigError("upload_to is an HTTP URL but neither a client certificate (--kit, or --tls-ca "
                                  "--tls-cert --tls-key) nor an upload_token (or upload_token_file) is set")
            return HttpTarget(target, self.config.device_id, token, tls=tls)
        return FolderTarget(Path(target), self.config.device_id)

    def _export_metrics(self) -> None:
        gauge, samples, sampler, thermal = self.metrics.gauge, self.samples, self.sampler, self.thermal
        gauge("edgeloop_ready", "1 when a verified model is loaded", lambda: self.engine.active is not None)
        self.metrics.counters("edgeloop_store_refusals", "bundles the store refused, by reason (any process)",
                              "reason", lambda: self.store.state().refused)
        gauge("edgeloop_sample_store_bytes", "bytes the sample store holds on disk", lambda: samples.bytes_used)
        self.metrics.counters("edgeloop_sample_store_dropped", "sampled files and records deleted to stay in budget",
                              "unit", lambda: {"files": samples.dropped_files, "records": samples.dropped_records})
        self.metrics.counters("edgeloop_samples_kept", "predictions kept for drift analysis", "reason",
                              lambda: {"rate": sampler.kept_by_rate, "low_confidence": sampler.kept_low_confidence})
        self.metrics.counters("edgeloop_sampling_batches_dropped", "selected batches not kept: the sampling worker "
                              "was behind", "cause", lambda: {"busy": self.sampling.dropped})
        uploader = self.uploader
        if uploader is not None:
            gauge("edgeloop_upload_backlog_files", "closed sample files waiting for upload",
                  lambda: uploader.backlog_files)
            gauge("edgeloop_upload_backlog_bytes", "bytes waiting for upload", lambda: uploader.backlog_bytes)
            gauge("edgeloop_upload_paused", "1 while uploads pause (hard thermal limit)", lambda: uploader.paused_now)
            self.metrics.counters("edgeloop_uploads", "upload attempts by outcome", "outcome",
                                  lambda: {"uploaded": uploader.uploaded_files, "failed": uploader.failed_attempts})
        gauge("edgeloop_temperature_celsius", "SoC temperature (NaN: no sensor)", lambda: thermal.temperature_c)
        gauge("edgeloop_thermal_state", "0 normal, 1 soft limit, 2 hard limit", lambda: STATES.index(thermal.state))

    def start(self) -> None:
        self.engine.reload()
        self.sampling.start()
        if self.uploader is not None:
            self.uploader.start()

    def stop(self) -> None:
        self.sampling.stop(timeout=5.0)  # keeps what is queued
        if self.uploader is not None:
            self.uploader.stop(timeout=5.0)
        self.samples.close_segment()
        self.engine.close()

    async def watch(self) -> None:
        """Reload when ``state.json`` changes (an installer or updater switched versions); rotate samples."""
        seen, last_error = None, None
        while True:
            try:
                stat = self.store.state_file.stat()
                signature = (stat.st_mtime_ns, stat.st_ino)
            except FileNotFoundError:
                signature = None
            try:
                if signature != seen:
                    await asyncio.to_thread(self.engine.reload)
                    seen = signature
                self.thermal.refresh()
                await asyncio.to_thread(self.samples.maybe_rotate)
            except Exception as error:  # a damaged state.json or a full disk: keep serving, say why, retry
                if repr(error) != last_error:  # once per distinct problem, not every interval
                    log.exception("store watch failed; serving %s meanwhile",
                                  self.engine.active.version if self.engine.active else "nothing")
                last_error = repr(error)
            else:
                last_error = None
            await asyncio.sleep(self.config.watch_interval_s)
