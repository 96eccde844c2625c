"""The MLflow UI screenshots of docs/registry.md, taken in a real browser (headless Chromium, Debian's `chromium`).

    python -m docs.screenshots PROJECT_DIR      # a project after `make run`, e.g. `bench.first_run --keep`'s clone

Starts the MLflow UI on the project's embedded store, opens the pages a reviewer opens (the runs table in the review
view, the champion's version page with its review summary, the registered model with the alias history) and writes
docs/screenshots/mlflow-*.png, cropped to the page (MLflow's assistant panel on the right is cut off).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

from conveyor.paths import ProjectPaths
from conveyor.scaffold import REPO
from conveyor.settings import load_settings

OUT = REPO / "docs" / "screenshots"
PAGE_SHARE = 0.74  # MLflow 3.17 docks its assistant panel on the right quarter of the window


def _wait(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer in {timeout:.0f} s")


def shoot(url: str, out: Path, width: int, height: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--virtual-time-budget=20000",  # the single-page app loads its data before the picture is taken
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
        )
    with Image.open(out) as image:
        image.crop((0, 0, round(width * PAGE_SHARE), height)).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--port", type=int, default=5057)
    args = parser.parse_args()
    paths = ProjectPaths.discover(args.project)
    settings = load_settings(paths.params)
    from mlflow.tracking import MlflowClient

    from conveyor.tracking import RunRecord, review_url
    from pipelines import registry

    base = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    store = f"sqlite:///{paths.mlflow_db}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--workers", "1"]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(args.port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait(f"{base}/health")
        client = MlflowClient(base)
        name = settings.registry.model_name
        champion = registry.current_champion(client, name)
        if champion is None:
            raise SystemExit(f"{name} has no champion in {paths.root}: run `make run` there first")
        record = RunRecord.load(paths.run_record)
        OUT.mkdir(parents=True, exist_ok=True)
        shoot(review_url(base, record.experiment_id), OUT / "mlflow-runs.png", 1900, 520)
        model_pages = f"{base}/#/models/{name}"
        shoot(
            f"{model_pages}/versions/{champion.version}?workflowType=machine_learning",
            OUT / "mlflow-model-version.png",
            1500,
            1180,
        )
        shoot(f"{model_pages}?workflowType=machine_learning", OUT / "mlflow-registered-model.png", 1700, 760)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    for picture in sorted(OUT.glob("mlflow-*.png")):
        print(picture.relative_to(REPO))


if __name__ == "__main__":
    main()
