"""Adapters to the outside: S3 (``storage``), MLflow (``tracking``, ``serving``), DVC (``workspace``), the data
watch (``watch``) and Airflow (``orchestration``, the one module DAG files import)."""
