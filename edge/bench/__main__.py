"""``python -m edge.bench``."""

from edge.bench.benchmark import main

raise SystemExit(main())
