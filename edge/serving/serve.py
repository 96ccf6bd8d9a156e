"""``python -m edge.serving.serve`` (and ``edgeloop serve``): run the edge inference service under uvicorn.

Every setting is a flag or an ``EDGELOOP_*`` environment variable (``--help`` lists them). A bad
setting, an unreadable key or store is one ``error:`` line and exit code 2, before anything listens.
"""

from __future__ import annotations

import logging
import sys

from edge.config import load_config
from edge.errors import EXIT_USER_ERROR, EdgeError


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)  # before the web stack loads: --help and bad flags answer at once
        import uvicorn

        from edge.serving.app import create_app

        logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(config)
    except EdgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    # no WebSocket routes: ws="none" keeps uvicorn from importing a WebSocket library
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level.lower(), access_log=False,
                server_header=False, ws="none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
