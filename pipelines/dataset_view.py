"""The dataset as a stage sees it: the validated files only, laid out for Ultralytics, outside data/.

Ultralytics writes label caches beside the labels (and rewrites JPEGs it thinks are corrupt). Pointing it at a view
of symlinks under .conveyor/ keeps data/ byte-identical to what data.dvc names, and leaves skipped files out.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml


def load_manifest(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the validate stage first (`conveyor validate`)")
    manifest: dict[str, object] = json.loads(path.read_text())
    return manifest


def class_names(manifest: dict[str, object]) -> list[str]:
    names = manifest["names"]
    assert isinstance(names, list)
    return [str(n) for n in names]


def materialize(manifest_path: Path, data_root: Path, dest: Path, splits: tuple[str, ...]) -> Path:
    """Build the view at `dest` (replacing an older one) and return its data.yaml for Ultralytics."""
    manifest = load_manifest(manifest_path)
    split_files = manifest["splits"]
    assert isinstance(split_files, dict)
    shutil.rmtree(dest, ignore_errors=True)
    spec: dict[str, object] = {"path": str(dest.resolve())}
    for split in splits:
        for entry in split_files[split]:
            for kind in ("image", "label"):
                rel = entry[kind]
                if rel is None:  # a background image has no label file
                    continue
                # rel is images/<split>/... or labels/<split>/...: the view keeps that layout.
                link = dest / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink((data_root / rel).resolve(), link)
        (dest / "images" / split).mkdir(parents=True, exist_ok=True)
        spec[split] = f"images/{split}"
    # Ultralytics wants train and val keys even when only testing: point absent ones at an existing split.
    for key in ("train", "val"):
        spec.setdefault(key, spec[splits[0]])
    spec["names"] = dict(enumerate(class_names(manifest)))
    data_yaml = dest / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    return data_yaml
