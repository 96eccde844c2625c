"""Offline by construction: the switches are set, and the network guard used by the end-to-end test really guards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conveyor import offline


def test_guard_blocks_and_records_non_loopback(netguard_env: tuple[dict[str, str], Path]) -> None:
    """Positive control: without it, an empty log in the end-to-end test would prove nothing."""
    env, log = netguard_env
    code = (
        "import socket\n"
        "for target in (('192.0.2.1', 80), ('example.com', 80)):\n"
        "    try:\n"
        "        socket.create_connection(target, timeout=1)\n"
        "    except OSError as e:\n"
        "        print('blocked', e)\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); port = s.getsockname()[1]\n"
        "socket.create_connection(('127.0.0.1', port), timeout=1).close()\n"
        "print('loopback ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.count("blocked netguard") == 2
    assert "loopback ok" in result.stdout
    recorded = log.read_text()
    assert "192.0.2.1" in recorded and "example.com" in recorded


def test_importing_conveyor_sets_offline_switches(tmp_path: Path) -> None:
    # None of the switches handed down: this process imported conveyor, which set them here too.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in offline.OFFLINE_ENV and not k.startswith(("YOLO_", "MLFLOW_", "DVC_"))
    }
    env["HOME"] = str(tmp_path)
    env.pop("XDG_CACHE_HOME", None)
    code = "import conveyor, os, json; print(json.dumps(dict(os.environ)))"
    seen = json.loads(
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    )
    for key, value in offline.OFFLINE_ENV.items():
        assert seen[key] == value
    fonts = Path(seen["YOLO_CONFIG_DIR"]) / "Ultralytics"
    assert (fonts / "Arial.ttf").stat().st_size > 100_000  # a real TTF: Ultralytics will not download one
    assert (tmp_path / "intel" / "openvino_telemetry").read_text() == "0"


def test_user_choices_win_over_defaults(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "YOLO_VERBOSE": "True"}
    code = "import conveyor, os; print(os.environ['YOLO_VERBOSE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
