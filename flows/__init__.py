"""Prefect flows: wiring only. The work lives in tasks/; see flows/steps.py for the task wrappers."""
