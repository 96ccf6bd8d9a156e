"""The pipeline's work as plain typed functions, grouped by phase (data, model, evaluation, release, monitoring).

Shared foundations live at this level: ``errors`` (imports nothing), ``config`` (params.yaml),
``devices`` (devices.yaml), ``variants`` (the export table), ``contracts`` (every stage file and record),
``lineage``, ``entrypoint`` (CLI plumbing) and ``cli`` (the ``edgeloop`` command). A stage module never
imports another stage module; stages talk through :mod:`tasks.contracts`.
"""
