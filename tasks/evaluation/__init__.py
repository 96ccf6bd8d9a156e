"""Evaluation phase: the evaluate stage, gates, reports, challenger scoring (device benchmarks go here)."""
