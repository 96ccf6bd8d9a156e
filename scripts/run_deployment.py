"""Run a deployment through the worker and wait for it: ``python -m scripts.run_deployment training/nightly``.

Prints the flow run's UI address and final state; exits non-zero when the run does not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("deployment", help="flow-name/deployment-name, e.g. training/nightly")
    parser.add_argument("--parameters", default="{}", help="JSON object of flow parameters")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_UI_URL

    flow_run = run_deployment(args.deployment, parameters=json.loads(args.parameters), timeout=0)
    print(f"flow run {flow_run.name}: {PREFECT_UI_URL.value()}/runs/flow-run/{flow_run.id}", flush=True)
    from prefect.flow_runs import wait_for_flow_run

    flow_run = asyncio.run(wait_for_flow_run(flow_run.id, timeout=int(args.timeout), log_states=True))
    print(f"{args.deployment}: {flow_run.state.name}" + (f" ({flow_run.state.message})" if flow_run.state.message
                                                          else ""))
    return 0 if flow_run.state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
