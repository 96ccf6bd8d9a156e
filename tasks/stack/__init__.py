"""The local service stack edgeloop starts and stops: Prefect, MLflow, a worker, dockerd, Mosquitto."""
