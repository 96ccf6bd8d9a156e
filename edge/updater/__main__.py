"""``python -m edge.updater``."""

from edge.updater.daemon import main

raise SystemExit(main())
