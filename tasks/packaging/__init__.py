"""Packaging a registered version into device images: the Docker client, builds, checks, the OCI registry."""
