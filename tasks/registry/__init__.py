"""The MLflow side of a release: tracking, registration, promotion, challenge, pyfunc and bundles."""
