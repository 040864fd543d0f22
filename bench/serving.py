"""Serving load test: `mlflow models serve` of the champion on loopback, real ELPV photos, bounded count and time.

    python -m bench serve        # needs the stack and a champion: `make demo` first

Starts the model server (``--env-manager local``) on a free 127.0.0.1 port, warms it up, then sends
(a) single-image requests one at a time, (b) the same with 4 concurrent clients, (c) batches of 16 images,
each phase capped by a request count and a time budget. Reports requests/s, images/s and p50/p95 latency.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REQUESTS = int(os.environ.get("BENCH_SERVE_REQUESTS", "200"))
SECONDS = float(os.environ.get("BENCH_SERVE_SECONDS", "60"))
BATCH = int(os.environ.get("BENCH_SERVE_BATCH", "16"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photos(n: int) -> list[str]:
    from devstack.demo_data import load_elpv_items

    items = load_elpv_items()
    step = max(1, len(items) // n)
    return [base64.b64encode(i.path.read_bytes()).decode("ascii") for i in items[::step][:n]]


def _post(url: str, images: list[str]) -> tuple[float, dict]:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    answer = json.loads(urllib.request.urlopen(req, timeout=120).read())
    return time.perf_counter() - t0, answer


def _phase(url: str, payloads: list[list[str]], clients: int) -> dict[str, float]:
    """Send payloads round-robin until REQUESTS sent or SECONDS passed; latency percentiles in ms."""
    latencies: list[float] = []
    sizes: list[int] = []
    deadline = time.perf_counter() + SECONDS
    started = time.perf_counter()

    def worker(k: int) -> None:
        i = k
        while time.perf_counter() < deadline and len(latencies) < REQUESTS:
            payload = payloads[i % len(payloads)]
            dt, answer = _post(url, payload)
            assert len(answer["predictions"]) == len(payload) and not answer["predictions"][0].get("error")
            latencies.append(dt)
            sizes.append(len(payload))
            i += clients

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {
        "requests": len(latencies),
        "req_s": len(latencies) / wall,
        "img_s": sum(sizes) / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": q[18] * 1000,
    }


def run() -> dict[str, str]:
    from pipeline.adapters.workspace import default_model_uri

    model = os.environ.get("BENCH_MODEL_URI") or default_model_uri()  # the champion of PIPELINE_PROFILE's model
    port = _free_port()
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "models",
            "serve",
            "-m",
            model,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/invocations"
    photos = _photos(64)
    try:
        t0 = time.perf_counter()
        while True:
            try:
                _post(url, photos[:1])
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 300:
                    raise SystemExit(f"model server for {model} did not come up; see {log.name}") from None
                time.sleep(1)
        ready_s = time.perf_counter() - t0
        for p in photos[:8]:  # warm-up
            _post(url, [p])
        single = _phase(url, [[p] for p in photos], clients=1)
        concurrent = _phase(url, [[p] for p in photos], clients=4)
        batched = _phase(url, [photos[i : i + BATCH] for i in range(0, len(photos), BATCH)], clients=1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    out = {"SERVE_MODEL": model, "SERVE_READY_S": f"{ready_s:.1f}"}
    for name, r in (("SINGLE", single), ("SINGLE_4CLIENTS", concurrent), (f"BATCH{BATCH}", batched)):
        out.update(
            {
                f"SERVE_{name}_REQUESTS": str(r["requests"]),
                f"SERVE_{name}_REQ_S": f"{r['req_s']:.1f}",
                f"SERVE_{name}_IMG_S": f"{r['img_s']:.1f}",
                f"SERVE_{name}_P50_MS": f"{r['p50_ms']:.0f}",
                f"SERVE_{name}_P95_MS": f"{r['p95_ms']:.0f}",
            }
        )
    return out
