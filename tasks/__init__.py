"""Pipeline stages as plain typed functions; each module has a CLI used by dvc.yaml."""
