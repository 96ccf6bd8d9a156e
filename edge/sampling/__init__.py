"""Sampling served rows for drift and retraining: selection, the bounded on-disk store, uploads."""
