"""The device's model store: signed bundles verified, health-checked, installed atomically, rolled back."""
