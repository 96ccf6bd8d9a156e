"""Rollout phase: the device fleet, its broker credentials, and staged (canary) model rollouts over MQTT."""
