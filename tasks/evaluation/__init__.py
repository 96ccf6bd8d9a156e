"""Evaluation phase: the evaluate stage, the gates, the comparison reports, challenger scoring."""
