"""The device updater: a separate process that follows the fleet's rollout manifests."""
