"""Create a throwaway Conveyor project from this checkout: used by the tests and the benchmark."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def create_project(root: Path, params: dict[str, Any] | None = None, demo_remote: Path | None = None) -> Path:
    """This repo's pipeline (dvc.yaml, params.yaml updated by `params`, stage and flow code) in its own git + DVC
    repo, without data. The code is copied so DVC can hash it and a deployment can point at it; the installed
    package is what the stages import."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy2(REPO / name, root / name)
    for package in ("pipelines", "flows"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    # Code the stages depend on outside those packages (conveyor/yolo.py): DVC hashes it, so it must be there. A
    # `conveyor/` folder without __init__.py never shadows the installed package.
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
    for dep in {d for stage in stages for d in stage.get("deps", []) if d.endswith(".py")}:
        if not (root / dep).exists():
            (root / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / dep, root / dep)
    full = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), params or {})
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    for args in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "conveyor@localhost"],
        ["git", "config", "user.name", "Conveyor"],
    ):
        subprocess.run(args, cwd=root, check=True, capture_output=True)
    # `dvc init` through DVC's own API: a process of its own cost a second of imports for each test's project.
    from dvc.repo import Repo

    dvc_log = logging.getLogger("dvc")
    level = dvc_log.level
    dvc_log.setLevel(logging.WARNING)  # `dvc init -q`
    try:
        Repo.init(str(root)).close()
    finally:
        dvc_log.setLevel(level)
    # The same remotes as this repo; the demo remote is relative, so point it at this checkout's (or `demo_remote`).
    config = (REPO / ".dvc" / "config").read_text()
    demo = demo_remote or REPO / "infra" / "demo-remote"
    (root / ".dvc" / "config").write_text(config.replace("../infra/demo-remote", str(demo)))
    return root
