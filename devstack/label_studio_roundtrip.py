"""The relabelling loop against the real Label Studio (from PyPI), start to end, on a private stack.

    python -m devstack.label_studio_roundtrip [--ls-port 14100] [--s3-port 14333] [--mlflow-port 14000] [--keep]
                                              [--hold]

Too heavy for ``make test`` (installing Label Studio took 61 s here, a round trip 53–89 s), so it is a script:

1. a separate venv ``.local/label-studio-venv`` with ``label-studio==LABEL_STUDIO_VERSION`` (made once, reused);
2. a private SeaweedFS and MLflow under a temporary folder (random S3 keys), seeded by ``devstack.review_fixture``:
   Korean class folders (one with a comma, one NFD) and a registered version holding a ``label_issues`` report;
3. ``python -m pipeline review-export`` → tasks JSON + labeling config;
4. Label Studio on 127.0.0.1 with a generated admin user, password and legacy API token (never written to the
   repository; they live in the temporary folder's process environment only);
5. through its HTTP API: create a project with our labeling config, import our file, annotate the first task
   with a class other than the given and the suggested one (the comma class), export the project as JSON;
6. ``python -m pipeline relabel --from <export>`` (dry run), then ``--apply``; check the object moved and the
   move is logged under ``relabel-log/``.

Every server it started is stopped at the end (``--keep`` leaves the temporary folder for a look; ``--hold``
keeps the servers up after the annotation, for a look at Label Studio's labeling page in a browser, until the file
it prints as ``HOLD=`` is deleted or 15 minutes pass; the file (mode 600) holds the generated login). Prints
``KEY=value`` lines; exit code 0 only when the whole round trip held.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from devstack import accounts, services
from devstack import review_fixture as fx

_logger = logging.getLogger("label_studio_roundtrip")
ROOT = Path(__file__).resolve().parent.parent
LABEL_STUDIO_VERSION = "1.23.2"
VENV = ROOT / ".local" / "label-studio-venv"
BUCKET, PREFIX, MODEL = "landing", "review/", "review-roundtrip"


def ensure_venv() -> Path:
    """Label Studio in its own venv (its pins clash with the pipeline's); built once, reused."""
    exe = VENV / "bin" / "label-studio"
    if exe.exists():
        return exe
    _logger.info("installing label-studio==%s into %s (a minute or more)", LABEL_STUDIO_VERSION, VENV)
    subprocess.run(["nice", "-n", "10", sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        ["nice", "-n", "10", str(VENV / "bin" / "pip"), "install", "--quiet", f"label-studio=={LABEL_STUDIO_VERSION}"],
        check=True,
    )
    return exe


class LabelStudio:
    """The few REST calls of the round trip (legacy token auth: ``Authorization: Token <token>``)."""

    def __init__(self, url: str, token: str, username: str = "", password: str = ""):
        self.url, self.token = url.rstrip("/"), token
        self.username, self.password = username, password  # the generated admin login (``--hold`` only)

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False


def start_label_studio(stack: services.Stack, exe: Path, port: int, data_dir: Path) -> LabelStudio:
    token, username, secret = secrets.token_hex(20), "relabel-admin@example.com", secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "LABEL_STUDIO_USERNAME": username,
        "LABEL_STUDIO_PASSWORD": secret,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "PATH": f"{exe.parent}{os.pathsep}{os.environ['PATH']}",
    }
    cmd = [
        "nice",
        "-n",
        "10",
        str(exe),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--enable-legacy-api-token",
    ]
    ls = LabelStudio(f"http://127.0.0.1:{port}", token, username, secret)
    _logger.info("starting Label Studio on %s (first start migrates its database)", ls.url)
    services._spawn(stack, "label-studio", cmd, env)
    services._wait(stack, "label-studio", ls.healthy, timeout=600)
    return ls


def annotate_first_task(ls: LabelStudio, project: int) -> dict:
    """Pick, for the first task, a class neither given nor suggested (so only the annotation can say it)."""
    listed = ls.call("GET", f"/api/projects/{project}/tasks/?page_size=100")
    tasks = listed if isinstance(listed, list) else listed.get("tasks") or listed.get("results") or []
    task = min(tasks, key=lambda t: t["id"])
    data = task["data"]
    chosen = next(c for c in fx.CLASSES if c not in (data["given_class"], data["suggested_class"]))
    ls.call(
        "POST",
        f"/api/tasks/{task['id']}/annotations/",
        {
            "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [chosen]}}],
            "was_cancelled": False,
        },
    )
    return {
        "task": task["id"],
        "key": data["landing_key"],
        "given": data["given_class"],
        "chosen": chosen,
        "file": data["landing_key"].rsplit("/", 1)[1],
    }


def hold(work: Path, ls: LabelStudio, project: int, seconds: float = 900) -> None:
    """Keep the servers up for a look in a browser until the printed file is deleted (or ``seconds`` pass)."""
    fp = work / "hold.json"
    accounts.write_private(fp, {"url": ls.url, "project": project, "username": ls.username, "password": ls.password})
    print(f"HOLD={fp}  (labeling page: {ls.url}/projects/{project}/data; delete the file to go on)", flush=True)
    deadline = time.monotonic() + seconds
    while fp.exists() and time.monotonic() < deadline:
        time.sleep(2)


def roundtrip(work: Path, ls_port: int, s3_port: int, mlflow_port: int, keep_up: bool = False) -> dict:
    exe = ensure_venv()
    stack = services.Stack(root=work / "local", s3_port=s3_port, mlflow_port=mlflow_port)
    stack.root.mkdir(parents=True, exist_ok=True)
    accounts.ensure(stack.root)  # the private MLflow runs basic-auth; this script works as the service account
    env = {
        "MLFLOW_TRACKING_USERNAME": accounts.SERVICE_ACCOUNT,
        "MLFLOW_TRACKING_PASSWORD": accounts.password(accounts.SERVICE_ACCOUNT, stack.root),
        "AWS_ACCESS_KEY_ID": f"rt-{secrets.token_hex(4)}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": stack.s3_url,
        "MLFLOW_TRACKING_URI": stack.mlflow_url,
        "PIPELINE_S3": "embedded",
    }
    os.environ.update(env)
    try:
        services.start_s3(stack)
        services.start_mlflow(stack)
        from pipeline.adapters import storage

        paths = fx.seed_landing(BUCKET, PREFIX)
        version = fx.seed_version(MODEL, f"s3://{BUCKET}/{PREFIX}", paths)
        review = work / "review.json"
        _cli(["review-export", "--model", MODEL, "--version", version, "--out", str(review)])
        tasks = json.loads(review.read_text(encoding="utf-8"))
        ls = start_label_studio(stack, exe, ls_port, work / "label-studio")
        project = ls.call(
            "POST",
            "/api/projects/",
            {
                "title": "relabel round trip",
                "label_config": review.with_name("review.label_config.xml").read_text(encoding="utf-8"),
            },
        )["id"]
        imported = ls.call("POST", f"/api/projects/{project}/import", tasks)
        picked = annotate_first_task(ls, project)
        if keep_up:
            hold(work, ls, project)
        export = ls.call("GET", f"/api/projects/{project}/export?exportType=JSON")
        export_fp = work / "label-studio-export.json"
        export_fp.write_text(json.dumps(export, ensure_ascii=False, indent=1), encoding="utf-8")
        relabel = ["relabel", "--from", str(export_fp), "--landing-uri", f"s3://{BUCKET}/{PREFIX}"]
        dry = _cli(relabel, check=False)
        applied = _cli([*relabel, "--apply"], check=False)
        target = fx.landing_key(PREFIX, f"{picked['chosen']}/{picked['file']}")  # the folder's own spelling
        logs = [o.key for o in storage.list_objects(f"s3://{BUCKET}/relabel-log/")]
        log_lines = [
            json.loads(x) for k in logs for x in storage.get_bytes(f"s3://{BUCKET}/{k}").decode("utf-8").splitlines()
        ]
        result = {
            "LS_VERSION": LABEL_STUDIO_VERSION,
            "LS_IMPORTED": imported.get("task_count"),
            "LS_EXPORTED_TASKS": len(export),
            "LS_ANNOTATED": sum(1 for t in export if t.get("annotations")),
            "RELABEL_DRY_RC": dry.returncode,
            "RELABEL_APPLY_RC": applied.returncode,
            "MOVED_FROM": picked["key"],
            "MOVED_TO": target,
            "OLD_KEY_GONE": storage.head(BUCKET, picked["key"]) is None,
            "NEW_KEY_THERE": storage.head(BUCKET, target) is not None,
            "LOG_LINES": json.dumps([(r["action"], r["chosen"]) for r in log_lines], ensure_ascii=False),
        }
        print(dry.stdout + applied.stdout)
        result["OK"] = (
            result["LS_IMPORTED"] == len(tasks)
            and dry.returncode == 0
            and applied.returncode == 0
            and result["OLD_KEY_GONE"]
            and result["NEW_KEY_THERE"]
            and [r["action"] for r in log_lines] == ["moved"]
        )
        return result
    finally:
        for name in ("label-studio", "mlflow", "seaweedfs"):
            services.stop(stack, name)


def _cli(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True)
    _logger.info("python -m pipeline %s -> rc %d", " ".join(args[:1]), out.returncode)
    if check and out.returncode != 0:
        raise RuntimeError(f"python -m pipeline {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m devstack.label_studio_roundtrip", description=__doc__.split("\n")[0])
    # Below Linux's ephemeral range (32768-60999), SeaweedFS's gRPC ports (S3 + 10000) included: see tests/conftest.py
    p.add_argument("--ls-port", type=int, default=14100)
    p.add_argument("--s3-port", type=int, default=14333, help="SeaweedFS base port (it also takes the next four)")
    p.add_argument("--mlflow-port", type=int, default=14000)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, export, LS database)")
    p.add_argument(
        "--hold",
        action="store_true",
        help="after the annotation, keep the servers up for a browser "
        "until the printed HOLD file is deleted (15 min at most)",
    )
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ls-roundtrip-"))
    started = time.monotonic()
    try:
        result = roundtrip(work, args.ls_port, args.s3_port, args.mlflow_port, keep_up=args.hold)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"WORK_DIR={work}")
    result["SECONDS"] = round(time.monotonic() - started)
    for k, v in result.items():
        print(f"{k}={v}")
    return 0 if result["OK"] else 1


if __name__ == "__main__":
    sys.exit(main())
