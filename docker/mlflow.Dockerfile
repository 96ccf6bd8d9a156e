# MLflow's official server image plus the clients the control plane needs: Postgres and S3 (MinIO).
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.10 boto3==1.35.99
