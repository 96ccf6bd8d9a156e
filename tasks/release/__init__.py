"""Release phase: MLflow tracking, the register stage, promotion (packaging and rollout go here)."""
