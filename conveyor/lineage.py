"""Where a model came from: the data version (data.dvc), the code version (git) and the exact params."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from conveyor.errors import ConveyorError


@dataclass(frozen=True)
class DataVersion:
    md5: str  # DVC's directory hash, e.g. "3f2c...e1.dir"
    files: int | None
    size: int | None


class DataDvcError(ConveyorError, ValueError):
    """data.dvc does not say which data version the project is on."""


def data_version(data_dvc: Path) -> DataVersion:
    """The data version that data.dvc names (what `dvc checkout` puts in data/)."""
    if not data_dvc.is_file():
        raise FileNotFoundError(f"{data_dvc} is missing: track the dataset with `dvc add data`")
    try:
        spec = yaml.safe_load(data_dvc.read_text()) or {}
        out = (spec.get("outs") or [{}])[0]
        return DataVersion(str(out["md5"]), out.get("nfiles"), out.get("size"))
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, KeyError, IndexError, TypeError) as exc:
        # A merge conflict's markers, or a damaged file: a YAML traceback before, from every data command.
        raise DataDvcError(
            f"{data_dvc} is not the file `dvc add data` writes ({type(exc).__name__}): a merge conflict? Resolve it, "
            f"or take a committed one back (`git checkout {data_dvc.name}`)"
        ) from None


def dir_md5(folder: Path) -> str:
    """DVC's hash of a directory (the `md5:` of its .dvc file): md5 of the sorted (relpath, md5) listing + '.dir'."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        entries.append(
            {"md5": hashlib.md5(path.read_bytes()).hexdigest(), "relpath": path.relative_to(folder).as_posix()}
        )
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def present_md5(data: Path) -> str | None:
    """The hash of the dataset folder as it is now; None when it is absent or empty."""
    return dir_md5(data) if data.is_dir() and any(data.iterdir()) else None


def data_used(data_dvc: Path, data: Path) -> tuple[str, bool]:
    """The hash of the data a run reads, and whether it is the version data.dvc names. `dvc repro` and `conveyor
    train` on data/ edited since (only the flow's preflight compared them) recorded data.dvc's version: another
    dataset than the one trained on."""
    named = data_version(data_dvc).md5
    actual = present_md5(data)
    return (actual or named), actual is None or actual == named


@dataclass(frozen=True)
class GitState:
    commit: str
    dirty: bool


def git_state(root: Path) -> GitState:
    """The commit and whether the code differs from it: a tracked file changed, or a Python module no commit has
    (an untracked module the pipeline imports ran, and the commit was recorded clean). Other untracked files (notes,
    a scratch image) are no code.

    dvc.lock and metrics/ are written by the pipeline itself, so they do not make the tree dirty; nor do params.yaml
    and data.dvc, which a run records on their own (the params' hash, the data version) and which `conveyor data
    add` and a worker's uncommitted checkout change without any code changing.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=all",
                "--",
                ".",
                ":(exclude)dvc.lock",
                ":(exclude)metrics",
                ":(exclude)params.yaml",
                ":(exclude)data.dvc",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return GitState("unknown", True)
    changed = [line for line in status.splitlines() if line.strip()]
    code = [line for line in changed if not line.startswith("??") or line.rstrip().endswith(".py")]
    return GitState(commit, bool(code))


def cpu_model() -> str:
    """The CPU's model name and widest vector ISA, e.g. "AMD EPYC, AVX-512".

    Across machines they decide PyTorch's kernels, hence a training run's last bits and its speed; one model name
    ("AMD EPYC") covers CPUs with and without AVX-512.
    """
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    if not names:
        import platform

        return platform.processor() or platform.machine()
    isa = next((name for flag, name in _VECTOR_ISAS if flag in flags), None)
    return f"{names[0]}, {isa}" if isa else names[0]


# Widest first: the x86 vector extensions PyTorch's CPU kernels are built for.
_VECTOR_ISAS = (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
