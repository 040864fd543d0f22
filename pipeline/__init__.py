"""Wallpaper-defect pipeline: ``core`` (torch only), ``stages`` (DVC), ``adapters`` (S3, MLflow, DVC, Airflow),
``commands`` (predict, audit, …). Map and import rules: docs/ARCHITECTURE.md."""
