"""The edge inference service: the FastAPI app, the engine behind it, its metrics and settings at run time."""
