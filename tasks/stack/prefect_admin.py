"""What a Prefect server needs set up once, by one process, before workers and API replicas use it.

- :func:`migrate`: the database schema, upgraded by one ``prefect server database upgrade`` before any API
  process starts; the API processes themselves start with ``PREFECT_API_DATABASE_MIGRATE_ON_START=false``,
  so two replicas (or a restart during a long migration) never race on the schema.
- :func:`ensure_work_pool`: the process work pool deployments and workers name.
- :func:`ensure_crash_detection`: the automation that marks a flow run Crashed when its heartbeats stop
  (Prefect's documented "zombie flow" detection): a worker host that loses power or its network leaves
  its runs in Running for ever otherwise. Workers send a heartbeat every :data:`HEARTBEAT_S` seconds
  (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set by :func:`tasks.stack.services.start_worker`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from tasks.stack.processes import ServiceError

BIN = Path(sys.executable).parent
HEARTBEAT_S = 30  # Prefect's minimum
CRASH_AFTER_S = 3 * HEARTBEAT_S  # three missed heartbeats
CRASH_AUTOMATION = "edgeloop: crash flow runs whose heartbeats stopped"
FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


def migrate(env: dict[str, str], timeout_s: float = 300.0) -> None:
    """Bring the database ``env`` names (``PREFECT_API_DATABASE_CONNECTION_URL``) to this Prefect's schema."""
    done = subprocess.run([str(BIN / "prefect"), "server", "database", "upgrade", "-y"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise ServiceError(f"the Prefect database migration failed (exit {done.returncode}):\n{tail}")


def ensure_work_pool(env: dict[str, str], pool: str) -> None:
    """Create the process work pool unless it exists (deployments must find it before a worker polls)."""
    env = {**os.environ, **env}
    inspect = subprocess.run([str(BIN / "prefect"), "work-pool", "inspect", pool], env=env, capture_output=True,
                             text=True, timeout=120)
    if inspect.returncode == 0:
        return
    created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], env=env,
                             capture_output=True, text=True, timeout=120)
    if created.returncode != 0:
        raise ServiceError(f"could not create work pool {pool}: {created.stdout[-500:]}{created.stderr[-500:]}")


def crash_automation(within_s: float = CRASH_AFTER_S):
    """The automation: after a run's heartbeat, expect another heartbeat or a final state within ``within_s``;
    if none comes, change the run's state to Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=CRASH_AUTOMATION,
        description="Marks a flow run Crashed when its heartbeats stop: its worker host died or lost the network.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in FINAL_EVENTS)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=(
            f"no heartbeat for {within_s:.0f} s: the worker host stopped or lost the network"))])


def ensure_crash_detection(api_url: str, within_s: float = CRASH_AFTER_S) -> None:
    """Create the crash automation on the server at ``api_url``, or bring an existing one to ``within_s``."""
    from prefect.automations import Automation
    from prefect.settings import PREFECT_API_URL, temporary_settings

    wanted = crash_automation(within_s)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            existing = Automation.read(name=CRASH_AUTOMATION)
        except ValueError:  # Prefect's "automation not found"
            existing = None
        except Exception as error:  # noqa: BLE001 - the server's or the network's, named below
            raise ServiceError(f"could not read automations from {api_url}: {error}") from None
        if existing is None:
            wanted.create()
        elif existing.trigger.within != wanted.trigger.within:
            wanted.id = existing.id
            wanted.update()
