"""``run-dag``: one DAG run with ``airflow dags test``, its full log in a file, a compact view on the console.

python -m devstack run-dag defect_training --conf '{"landing_uri": "s3://landing/elpv/", "profile": "cpu-demo"}'
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from pipeline.core import settings
from pipeline.core.errors import PipelineError

_SHOW = ("[DAG TEST] starting", "pipeline.", "error", "ERROR", "DagRun Finished", "Exception:", "]   - ")


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failed\w*|Interrupt): ")  # a traceback's last line
_STRUCTLOG = re.compile(r"^\S+T(\d\d:\d\d:\d\d)\S* \[\s*\w+\s*\] (.*)$")
_TRAILER = re.compile(r"\s+\[[\w.]+\] loc=\S+.*$")


def _compact(line: str) -> str:
    """Airflow's structlog line -> ``HH:MM:SS message`` (the full line stays in the log file)."""
    m = _STRUCTLOG.match(line.rstrip())
    if not m:
        return line.rstrip()[:300]
    msg = _TRAILER.sub("", m.group(2))
    msg = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ", "", msg)
    return f"{m.group(1)} {msg}"[:300]


def run_dag(dag_id: str, conf: str) -> int:
    """``airflow dags test`` with its full log in a file; the console gets task starts, our stage lines, errors."""

    try:
        json.loads(conf)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"--conf is not valid JSON: {exc}") from None
    log_dir = settings.local_root() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_fp = log_dir / f"{dag_id}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    airflow = str(Path(sys.executable).parent / "airflow")
    print(f"running DAG {dag_id} with `airflow dags test` (full log: {log_fp})", flush=True)
    with open(log_fp, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [airflow, "dags", "test", dag_id, "--conf", conf],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if (any(s in line for s in _SHOW) or _EXC_LINE.match(line)) and "Skipping registering" not in line:
                print(_compact(line), flush=True)
        code = proc.wait()
    if code != 0:
        raise PipelineError(f"DAG {dag_id} failed (exit {code}); the lines above and {log_fp} say why")
    return 0
