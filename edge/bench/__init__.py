"""On-device benchmarking: measure model files where they will run, and the probes of that device."""
