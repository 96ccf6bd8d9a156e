"""Monitoring phase: what devices report back, and when it should trigger a retrain."""
