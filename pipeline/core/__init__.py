"""The torch-only core: params, devices, images, data, models, losses, the training loop, DDP helpers, checkpoints and
bag inference. Imports nothing from the stages, adapters or commands, nor Airflow, MLflow, DVC, boto3 or GX
(``tests/unit/test_layout.py`` enforces it), so it runs on a bare GPU box with torch and timm."""
