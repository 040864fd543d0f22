"""The DVC stages: one ``run_<stage>(cfg, inputs…, outputs…)`` each, called by ``python -m pipeline <stage>``
(dvc.yaml), by the Airflow tasks (through ``dvc repro``) and by the tests."""
