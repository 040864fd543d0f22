"""Benchmarks, side by side in one process (ratios, because shared machines are noisy).

    python -m bench            # or: make bench (data + train)
    python -m bench serve      # or: make bench-serve (needs the stack and a champion: `make demo` first)
    python -m bench event-loop # or: make bench-loop (private stack + scheduler; new data → training, timed)
    python -m bench cpu        # malloc thresholds and the frozen-layer cache, side by side (bench/cpu_speed.py)
    python -m bench label-noise  # or: make bench-label-noise (seeded label noise on ELPV, ~30-60 min on 2 cores)

Prints ``KEY=value`` lines and rewrites the generated block of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench import cpu_speed, data_pipeline, event_loop, label_noise, serving, train_step

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    which = sys.argv[1:] or ["data", "train"]
    results: dict[str, str] = {}
    if "data" in which:
        results.update(data_pipeline.run())
    if "train" in which:
        results.update(train_step.run())
    if "serve" in which:
        from pipeline.adapters.credentials import use_local_account

        use_local_account()  # the champion is read from MLflow: MLFLOW_TRACKING_* or the stack's accounts file
        results.update(serving.run())
    if "event-loop" in which:
        results.update(event_loop.run())
    if "cpu" in which:
        results.update(cpu_speed.run())
    if "label-noise" in which:
        results.update(label_noise.run())
    for k, v in results.items():
        print(f"{k}={v}")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.processor() or ''}"
    block = "\n".join(f"| `{k}` | {v} |" for k, v in results.items())
    doc = ROOT / "docs" / "BENCHMARKS.md"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    tag = "bench" if set(which) <= {"data", "train"} else "bench-" + "-".join(which)
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    body = (
        f"{start}\nLast `python -m bench {' '.join(which)}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine}):\n\n"
        f"| key | value |\n|---|---|\n{block}\n{end}"
    )
    text = (
        text[: text.index(start)] + body + text[text.index(end) + len(end) :]
        if start in text
        else text + "\n" + body + "\n"
    )
    doc.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
