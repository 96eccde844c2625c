"""The dataset's life under DVC: make or import it, record its version, and get exactly that version back."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console

from conveyor.lineage import data_version
from conveyor.paths import ProjectPaths
from conveyor.settings import SPLITS, SynthSettings
from pipelines import synth
from pipelines.validate import IMAGE_SUFFIXES, read_class_names

DEMO_REMOTE = "demo"  # read-only remote shipped in the repository (infra/demo-remote)
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class DataVersionError(RuntimeError):
    """data/ is not, and cannot be made, the version data.dvc names."""


def dvc(root: Path, *args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the DVC CLI of this environment in the project."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, check=check, capture_output=capture, text=True
    )


def dir_md5(folder: Path) -> str:
    """DVC's hash of a directory (the `md5:` of its .dvc file): md5 of the sorted (relpath, md5) listing + '.dir'."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        entries.append(
            {"md5": hashlib.md5(path.read_bytes()).hexdigest(), "relpath": path.relative_to(folder).as_posix()}
        )
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


@dataclass(frozen=True)
class DataStatus:
    expected: str  # md5 named by data.dvc
    actual: str | None  # md5 of data/ now, None when absent

    @property
    def in_sync(self) -> bool:
        return self.expected == self.actual


def data_status(paths: ProjectPaths) -> DataStatus:
    expected = data_version(paths.data_dvc).md5
    actual = dir_md5(paths.data) if paths.data.is_dir() and any(paths.data.iterdir()) else None
    return DataStatus(expected, actual)


def ensure_data_version(paths: ProjectPaths, synth_settings: SynthSettings, console: Console | None = None) -> str:
    """Make data/ exactly the version data.dvc names, or fail saying why. Returns that md5.

    Order: already there; DVC cache or default remote; the demo remote shipped in the repo; deterministic
    regeneration from params.yaml, accepted only if its hash matches. Local edits to data/ are never overwritten.
    """
    console = console or Console()
    status = data_status(paths)
    if status.in_sync:
        return status.expected
    if status.actual is not None:
        raise DataVersionError(
            f"data/ ({status.actual}) differs from the version data.dvc names ({status.expected}). Nothing was "
            "changed. To keep your edits: `dvc add data` and commit data.dvc; to discard them: "
            "`dvc checkout --force data.dvc`."
        )
    for remote in (None, DEMO_REMOTE):
        args = ["pull", "data.dvc", *(["--remote", remote] if remote else [])]
        result = dvc(paths.root, *args, check=False)
        if result.returncode == 0 and data_status(paths).in_sync:
            console.print(f"data {status.expected}: pulled from DVC remote '{remote or 'default'}'")
            if remote:  # seed the default remote, so later pulls and pushes need no demo remote
                dvc(paths.root, "push", "data.dvc", check=False)
            return status.expected
    console.print("data not in any DVC remote: regenerating it from params.yaml (synth) and checking its hash")
    with tempfile.TemporaryDirectory(dir=paths.root) as tmp:
        synth.generate(synth_settings, Path(tmp) / "data")
        regenerated = dir_md5(Path(tmp) / "data")
        if regenerated != status.expected:
            raise DataVersionError(
                f"data.dvc names {status.expected}, which no DVC remote has, and regenerating from params.yaml gave "
                f"{regenerated}: a different dataset, so nothing was used. Pull it from the remote that has it "
                "(`dvc pull -r NAME`), or record the regenerated one with `conveyor data synth`."
            )
        shutil.move(str(Path(tmp) / "data"), paths.data)
    dvc(paths.root, "commit", "--force", "data.dvc")  # into the DVC cache, data.dvc unchanged
    return status.expected


def record_version(paths: ProjectPaths) -> str:
    """`dvc add data`: store the current data/ in the cache and name it in data.dvc."""
    dvc(paths.root, "add", "data")
    return data_version(paths.data_dvc).md5


def synthesize(
    paths: ProjectPaths, settings: SynthSettings, out: Path | None = None, *, overwrite: bool = False
) -> synth.SynthSummary:
    """Generate the synthetic dataset into data/ (recorded with DVC) or into `out` (not recorded)."""
    target = out or paths.data
    summary = synth.generate(settings, target, overwrite=overwrite)
    if out is None:
        record_version(paths)
    return summary


@dataclass(frozen=True)
class ImportSummary:
    images: dict[str, int]
    labels: dict[str, int]
    names: list[str]


def _split_dirs(source: Path) -> dict[str, Path]:
    """Image folders per split, from the source's data.yaml (`train: images/train`, or `../train/images`)."""
    spec = yaml.safe_load((source / "data.yaml").read_text()) or {}
    base = source / str(spec.get("path") or ".")  # an absolute `path:` replaces source on join
    found: dict[str, Path] = {}
    for key, value in spec.items():
        split = SPLIT_ALIASES.get(str(key))
        if split is None or not isinstance(value, str):
            continue
        # Roboflow-style exports say `../train/images` for a folder beside data.yaml.
        for candidate in (base / value, source / value, source / value.removeprefix("../")):
            if candidate.is_dir():
                found[split] = candidate.resolve()
                break
        else:
            raise FileNotFoundError(f"{source / 'data.yaml'}: {key}: folder {value} not found")
    if not found:  # no split keys: the plain images/<split> layout
        found = {s: source / "images" / s for s in SPLITS if (source / "images" / s).is_dir()}
    return found


def _label_dir(image_dir: Path) -> Path:
    """Ultralytics' rule: the labels folder replaces the last 'images' part of the image folder's path."""
    parts = list(image_dir.parts)
    if "images" not in parts:
        raise ValueError(f"{image_dir}: image folders must have an 'images' part (YOLO layout) to find the labels")
    index = len(parts) - 1 - parts[::-1].index("images")
    parts[index] = "labels"
    return Path(*parts)


def import_dataset(paths: ProjectPaths, source: Path, *, replace: bool = False) -> ImportSummary:
    """Copy a YOLO-format dataset (data.yaml with names, images/ and labels/) into data/ and record it with DVC.

    The source is only read. The copy is checked by the validate stage, not here: import keeps every file so the
    validation report can name it.
    """
    source = source.resolve()
    if not (source / "data.yaml").is_file():
        raise FileNotFoundError(f"{source}: no data.yaml (YOLO datasets name their classes there)")
    names = read_class_names(source)
    if paths.data.exists() and any(paths.data.iterdir()) and not replace:
        raise FileExistsError(f"{paths.data} already holds a dataset; pass --replace (the old version stays in DVC)")
    staging = Path(tempfile.mkdtemp(dir=paths.root, prefix=".import-"))
    images: dict[str, int] = {}
    labels: dict[str, int] = {}
    try:
        for split, image_dir in _split_dirs(source).items():
            label_dir = _label_dir(image_dir)
            images[split] = labels[split] = 0
            for path in sorted(image_dir.rglob("*")):
                if path.is_file():
                    dest = staging / "images" / split / path.relative_to(image_dir)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, dest)
                    images[split] += path.suffix.lower() in IMAGE_SUFFIXES
            for path in sorted(label_dir.rglob("*.txt")) if label_dir.is_dir() else []:
                dest = staging / "labels" / split / path.relative_to(label_dir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
                labels[split] += 1
        synth.write_dataset_yaml(staging, names)
        if paths.data.exists():
            shutil.rmtree(paths.data)
        shutil.move(str(staging), paths.data)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record_version(paths)
    return ImportSummary(images, labels, names)
