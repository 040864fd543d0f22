"""The local-stack harness: embedded services (SeaweedFS, MLflow, Airflow), the CeleryExecutor test stack, an
Airflow REST client, ``run-dag`` and the ELPV demo data. Never shipped in a registered model or a DVC workspace;
nothing in ``pipeline`` imports it."""
