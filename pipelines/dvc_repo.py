"""DVC as Conveyor drives it: its command line in the project, its stage lock, the default remote (where it is,
whether its bucket answers) and what a push needs to say when it fails.

Both the training flow (preflight, push) and `conveyor lineage` (where a data version is kept) read the default
remote here, from DVC's own configuration, the way `dvc push` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from conveyor.errors import ConveyorError


def dvc(
    root: Path, *args: str, check: bool = True, capture: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the DVC CLI of this environment in the project (in `env` when given, else this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, check=check, capture_output=capture, text=True, env=env
    )


def dvc_lock_holders(root: Path) -> list[psutil.Process]:
    """The live processes (other than this one) that DVC's stage lock (.dvc/tmp/rwlock) names. DVC removes dead
    holders itself, but a killed run's `dvc repro` is still listed while the kernel tears it down or until it is
    reaped, and DVC then refuses with "is busy"."""
    path = root / ".dvc" / "tmp" / "rwlock"
    try:
        lock = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return []
    infos = [*lock.get("write", {}).values()]
    for readers in lock.get("read", {}).values():
        infos.extend(readers)
    holders = []
    for pid in sorted({int(info["pid"]) for info in infos if isinstance(info, dict) and "pid" in info}):
        if pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            holders.append(psutil.Process(pid))
    return holders


def default_remote(root: Path) -> dict[str, Any]:
    """The default DVC remote's configuration (url, endpointurl, ...) with its name; empty when there is none."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        return {"name": name, **repo.config["remote"].get(name, {})} if name else {}


def check_remote_storage(root: Path) -> None:
    """When the default DVC remote is on S3: its bucket answers to these credentials (conveyor.storage.StorageError
    naming the endpoint and bucket otherwise), before any stage runs rather than at the push after training."""
    remote = default_remote(root)
    url = str(remote.get("url", ""))
    if not url.startswith("s3://"):
        return
    from conveyor.storage import S3Location, check_bucket, endpoint_from_env

    check_bucket(S3Location.parse(url).bucket, remote.get("endpointurl") or endpoint_from_env())


def remove_partial_objects(root: Path) -> list[Path]:
    """Objects a killed push left cut short in a folder remote, removed so that the next push sends them again.

    DVC writes some objects (a directory's `.dir` listing among them) to a folder remote at their final name, and
    on the next push takes any object that exists there as sent: a `.dir` left empty by a SIGKILL then failed every
    later push ("object ... .dir is corrupted"), found by tests/test_faults.py. An object whose size differs from
    the cache's copy of it is such a leftover. Object stores (S3) write an object whole or not at all: nothing to do
    there. Returns what was removed."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        if not repo.config["core"].get("remote"):
            return []
        remote = repo.cloud.get_remote_odb()
        if remote.fs.protocol != "local":
            return []
        cache, remote_root = Path(repo.cache.local.path), Path(remote.path)
    removed = []
    for local in cache.glob("*/*"):
        there = remote_root / local.parent.name / local.name
        if there.is_file() and there.stat().st_size != local.stat().st_size:
            there.unlink()
            removed.append(there)
    return removed


def pushed_state(root: Path) -> str:
    """What a push covers: the data and stage versions (data.dvc, dvc.lock) and where they go (the DVC config)."""
    digest = hashlib.sha256()
    for name in ("data.dvc", "dvc.lock", ".dvc/config", ".dvc/config.local"):
        path = root / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return digest.hexdigest()


class RemoteFullError(ConveyorError, RuntimeError):
    """The DVC remote refused uploads for lack of space (a bucket quota, a full disk): retrying cannot help."""


# How stores say "no room": S3 with a bucket quota (Swift's container quotas answer EntityTooLarge "Upload exceeds
# quota", Ceph RGW and MinIO QuotaExceeded), a local or mounted remote out of space (ENOSPC).
REMOTE_FULL_MARKERS = ("exceeds quota", "QuotaExceeded", "EntityTooLarge", "No space left on device", "Errno 28")


def push_failure(stderr: str, remote: dict[str, Any]) -> RuntimeError:
    """What a failed `dvc push` says to a person: a full remote is named as such (no retry helps), anything else
    keeps DVC's own words."""
    lines = stderr.strip().splitlines()
    refusal = next((line for line in lines if any(marker in line for marker in REMOTE_FULL_MARKERS)), None)
    if refusal is None:
        return RuntimeError(f"dvc push failed: {stderr.strip()[-2000:]}")
    failed = re.search(r"(\d+) files? failed to upload", stderr)
    count = int(failed.group(1)) if failed else 0
    refused = f"{count} file was" if count == 1 else f"{count} files were" if count else "uploads were"
    where = f"DVC remote '{remote.get('name', 'default')}' ({remote.get('url', '?')})"
    return RemoteFullError(
        f"dvc push failed: {where} is full: {refused} refused "
        "for lack of space (its bucket quota or disk). Free space or raise the quota, then run again: what was "
        "uploaded is kept and not sent twice, and this push is not recorded as done until every object is there.\n"
        f"The store said: {refusal.strip()[:500]}\n{lines[-1].strip()[:500]}"
    )


def remote_location(root: Path, md5: str) -> str:
    """Where the default DVC remote keeps that data version (DVC 3 layout: files/md5/ab/cdef....dir)."""
    remote = default_remote(root)
    url = str(remote.get("url", ""))
    if not url:
        return f"(no default DVC remote) md5 {md5}"
    return f"{remote['name']}: {url.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"
