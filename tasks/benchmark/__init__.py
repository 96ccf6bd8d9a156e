"""On-device benchmarking: candidate variants measured on every target device through its runner, with the
device gates applied to the figures."""
