"""The pipeline's work as plain typed functions, grouped by phase (data, model, evaluation, benchmark,
registry, packaging, rollout, monitoring) and the local service stack (``stack``).

Shared foundations live at this level: ``errors`` (imports nothing), ``config`` (params.yaml and the
environment, read once), ``devices`` (devices.yaml), ``variants`` (the export table), ``contracts`` (every
stage file and record), ``workspace``, ``lineage``, ``approval`` (the approval gate's Prefect client),
``entrypoint`` (CLI plumbing) and ``cli`` (the ``edgeloop`` command). A stage module never imports another
stage module; stages talk through :mod:`tasks.contracts`.
"""
