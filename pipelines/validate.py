"""Data validation: find every bad file before training sees it, report it, never touch the raw data.

Checks: unreadable or truncated images, label lines with the wrong number of fields, class ids out of range,
coordinates outside [0, 1] and zero-area boxes, labels without an image, images without a label file (background,
counted), the same image in two splits (leakage, by content hash), and empty splits.

Every problem is reported as `file[:line]: reason`. With `on_error: fail` any error stops the pipeline; with
`on_error: skip` the bad files are left out of the manifest that training reads, and listed as skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from PIL import Image
from rich.console import Console
from rich.progress import track

from conveyor.errors import ConveyorError
from conveyor.settings import SPLITS, ValidateSettings
from conveyor.tables import FoldingTable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MIN_IMAGE_SIDE = 10  # Ultralytics rejects smaller images
EDGE_TOLERANCE = 0.01  # boxes may overhang the frame by rounding, not by 1 %

Severity = Literal["error", "warning"]


class DataValidationError(ConveyorError, RuntimeError):
    """The data has errors and the policy is to fail; the message is the readable summary."""


@dataclass(frozen=True)
class Problem:
    file: str  # relative to the project root
    reason: str
    line: int | None = None
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.reason}"


@dataclass
class SplitCounts:
    images: int = 0
    accepted: int = 0
    boxes: int = 0
    background: int = 0
    skipped: int = 0


@dataclass
class ValidationReport:
    policy: str
    names: list[str]
    counts: dict[str, SplitCounts]
    problems: list[Problem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        """True when training may go on: no errors, or errors whose files were all skipped by policy."""
        return not self.errors or (self.policy == "skip" and not self.fatal)

    @property
    def fatal(self) -> list[Problem]:
        """Errors no skipping can mend (a missing data.yaml, an empty split)."""
        return [p for p in self.errors if p.file.endswith("data.yaml") or "split is empty" in p.reason]

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "policy": self.policy,
            "names": self.names,
            "counts": {k: asdict(v) for k, v in self.counts.items()},
            "errors": len(self.errors),
            "warnings": len(self.problems) - len(self.errors),
            "problems": [{**asdict(p), "message": str(p)} for p in self.problems],
            "skipped": self.skipped,
        }

    def summary(self, limit: int = 50) -> str:
        lines = [
            f"data validation: {len(self.errors)} error(s), {len(self.problems) - len(self.errors)} warning(s), "
            f"policy '{self.policy}'"
        ]
        for split, c in self.counts.items():
            lines.append(
                f"  {split}: {c.images} images, {c.accepted} accepted, {c.boxes} boxes, "
                f"{c.background} background, {c.skipped} skipped"
            )
        shown = sorted(self.problems, key=lambda p: (p.severity != "error", p.file, p.line or 0))[:limit]
        lines += [f"  {p.severity.upper()} {p}" for p in shown]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more (see the JSON report)")
        if self.skipped:
            lines.append(f"  skipped by policy: {len(self.skipped)} file(s), listed in the JSON report")
        return "\n".join(lines)


@dataclass(frozen=True)
class Sample:
    image: str | None  # relative to the data root
    label: str | None


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _check_image(path: Path) -> str | None:
    """None when the image decodes fully, else the reason. Truncation is checked the way Ultralytics checks it,
    because Ultralytics 'repairs' a JPEG without its end marker by rewriting the file in place."""
    try:
        with Image.open(path) as im:
            im.load()
            width, height = im.size
    except Exception as exc:  # decoders raise many types (and Ultralytics patches PIL's opener)
        return f"unreadable image ({exc})"
    if min(width, height) < MIN_IMAGE_SIDE:
        return f"image too small ({width}x{height}, minimum side {MIN_IMAGE_SIDE})"
    with path.open("rb") as f:  # a JPEG by its bytes, not its name (a PNG named .jpg is common, and fine)
        is_jpeg = f.read(3) == b"\xff\xd8\xff"
        f.seek(-2, 2)
        if is_jpeg and f.read() != b"\xff\xd9":
            return "truncated JPEG (no end-of-image marker)"
    return None


def _check_label(path: Path, shown: str, n_classes: int) -> tuple[list[Problem], int]:
    """Problems in one label file, and its number of boxes."""
    problems: list[Problem] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(shown, f"unreadable label file ({exc})")], 0
    seen: set[str] = set()
    boxes = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 5:
            problems.append(Problem(shown, f"expected 5 fields (class cx cy w h), got {len(fields)}", number))
            continue
        try:
            cls_value = float(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            problems.append(Problem(shown, f"non-numeric field in '{line}'", number))
            continue
        if not cls_value.is_integer() or not 0 <= cls_value < n_classes:
            problems.append(Problem(shown, f"class id {fields[0]} out of range 0..{n_classes - 1}", number))
            continue
        if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            problems.append(Problem(shown, f"coordinates outside [0, 1]: {' '.join(fields[1:])}", number))
            continue
        if w <= 0 or h <= 0:
            problems.append(Problem(shown, f"zero-area box (w={w:g}, h={h:g})", number))
            continue
        if min(cx - w / 2, cy - h / 2) < -EDGE_TOLERANCE or max(cx + w / 2, cy + h / 2) > 1 + EDGE_TOLERANCE:
            problems.append(Problem(shown, "box extends outside the image", number))
            continue
        if line in seen:
            problems.append(Problem(shown, "duplicate box (Ultralytics drops it)", number, "warning"))
            continue
        seen.add(line)
        boxes += 1
    return problems, boxes


def read_class_names(data_root: Path) -> list[str]:
    """Class names from the dataset's data.yaml (`names` as a list or an {id: name} mapping)."""
    spec = yaml.safe_load((data_root / "data.yaml").read_text(encoding="utf-8")) or {}
    names = spec.get("names") if isinstance(spec, dict) else None
    if isinstance(names, dict):
        ids = sorted(int(k) for k in names)
        if ids != list(range(len(ids))):
            raise ValueError(f"class ids in names must be 0..n-1, got {ids}")
        return [str(names[i]) for i in ids]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise ValueError("no class names ('names:') found")


def _pair_files(data_root: Path, split: str) -> tuple[list[Sample], list[Problem]]:
    image_dir, label_dir = data_root / "images" / split, data_root / "labels" / split
    images: dict[str, Path] = {}
    shared: set[str] = set()  # label stems more than one image has
    problems: list[Problem] = []
    for path in sorted(image_dir.rglob("*")) if image_dir.is_dir() else []:
        if not path.is_file():
            continue
        relative = path.relative_to(image_dir)
        key = relative.with_suffix("").as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(Problem(_rel(path, data_root), "not an image file: ignored", severity="warning"))
            continue
        if "images" in relative.parts[:-1]:
            # Ultralytics finds a label by replacing the *last* /images/ of the image's path with /labels/: this
            # image's label would be looked for under images/, and it would train as a background image.
            problems.append(
                Problem(
                    _rel(path, data_root),
                    f"inside a folder named 'images' below images/{split}: Ultralytics would look for its label "
                    "elsewhere and train on it without boxes; rename that folder",
                )
            )
        if key in images:
            first = _rel(images[key], data_root)
            problems.append(Problem(_rel(path, data_root), f"second image for one label stem '{key}' (with {first})"))
            if key not in shared:  # the first is left out too: whose label it is, is unknown
                shared.add(key)
                problems.append(
                    Problem(first, f"shares its label stem '{key}' with another image: which one the label describes "
                            "is unknown; rename one")
                )  # fmt: skip
        else:
            images[key] = path
    labels = {
        p.relative_to(label_dir).with_suffix("").as_posix(): p
        for p in (sorted(label_dir.rglob("*.txt")) if label_dir.is_dir() else [])
    }
    samples = [Sample(_rel(images[k], data_root), _rel(labels[k], data_root) if k in labels else None) for k in images]
    samples += [Sample(None, _rel(labels[k], data_root)) for k in sorted(labels.keys() - images.keys())]
    return samples, problems


def validate_dataset(
    data_root: Path, settings: ValidateSettings, *, shown_root: Path | None = None
) -> tuple[ValidationReport, dict[str, list[Sample]]]:
    """Check every file of the dataset at `data_root`. Returns the report and the accepted samples per split.

    Paths in the report are relative to `shown_root` (default: the data root's parent, i.e. the project).
    """
    base = (shown_root or data_root.parent).resolve()
    try:
        prefix = data_root.resolve().relative_to(base).as_posix()
    except ValueError:  # the data lives outside the shown root: show absolute paths
        prefix = data_root.resolve().as_posix()

    def shown(rel: str) -> str:
        return f"{prefix}/{rel}" if prefix not in ("", ".") else rel

    report = ValidationReport(settings.on_error, [], {s: SplitCounts() for s in SPLITS})
    try:
        report.names = read_class_names(data_root)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        report.problems.append(Problem(shown("data.yaml"), f"cannot read class names: {exc}"))
        return report, {s: [] for s in SPLITS}

    accepted: dict[str, list[Sample]] = {}
    first_seen: dict[str, tuple[str, str]] = {}  # content hash -> (split, shown path)
    for split in SPLITS:
        counts = report.counts[split]
        samples, problems = _pair_files(data_root, split)
        report.problems += [Problem(shown(p.file), p.reason, p.line, p.severity) for p in problems]
        bad_files: set[str] = {p.file for p in problems if p.severity == "error"}
        kept: list[Sample] = []
        for sample in track(samples, description=f"checking {split}", transient=True):
            sample_problems: list[Problem] = []
            n_boxes = 0
            if sample.image is None:
                assert sample.label is not None
                sample_problems.append(Problem(shown(sample.label), "label file without an image"))
            else:
                counts.images += 1
                image_path = data_root / sample.image
                reason = _check_image(image_path)
                if reason:
                    sample_problems.append(Problem(shown(sample.image), reason))
                digest = hashlib.sha256(image_path.read_bytes()).hexdigest()
                if digest in first_seen:
                    other_split, other = first_seen[digest]
                    if other_split != split:
                        sample_problems.append(
                            Problem(
                                shown(sample.image),
                                f"same image as {other} (leakage between {other_split} and {split})",
                            )
                        )
                    else:
                        sample_problems.append(
                            Problem(shown(sample.image), f"duplicate of {other}", severity="warning")
                        )
                else:
                    first_seen[digest] = (split, shown(sample.image))
                if sample.label is None:
                    if settings.allow_background:
                        counts.background += 1
                    else:
                        sample_problems.append(Problem(shown(sample.image), "no label file (background not allowed)"))
                else:
                    label_problems, n_boxes = _check_label(
                        data_root / sample.label, shown(sample.label), len(report.names)
                    )
                    sample_problems += label_problems
                    counts.background += n_boxes == 0 and not label_problems
            report.problems += sample_problems
            if any(p.severity == "error" for p in sample_problems) or sample.image in bad_files:
                report.skipped += [f for f in (sample.image, sample.label) if f]
                counts.skipped += sample.image is not None
            else:
                kept.append(sample)
                counts.accepted += 1
                counts.boxes += n_boxes
        if counts.images == 0:
            report.problems.append(Problem(shown(f"images/{split}"), "split is empty: no images"))
        elif counts.accepted == 0:  # every image skipped by policy: training would read an empty split all the same
            report.problems.append(
                Problem(shown(f"images/{split}"), f"split is empty: all {counts.images} images have errors")
            )
        accepted[split] = kept
    report.skipped = [shown(f) for f in report.skipped]
    return report, accepted


def write_outputs(report: ValidationReport, accepted: dict[str, list[Sample]], data_root: Path, out: Path) -> None:
    """The JSON report, the readable summary and the manifest of accepted files that training reads."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    (out / "summary.txt").write_text(report.summary(limit=10_000) + "\n")
    manifest = {
        "data_root": data_root.name,
        "names": report.names,
        "splits": {
            split: [{"image": s.image, "label": s.label} for s in samples] for split, samples in accepted.items()
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def print_report(report: ValidationReport, console: Console | None = None) -> None:
    console = console or Console()
    table = FoldingTable(title="data validation")
    for column in ("split", "images", "accepted", "boxes", "background", "skipped"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, c in report.counts.items():
        table.add_row(split, *(str(v) for v in (c.images, c.accepted, c.boxes, c.background, c.skipped)))
    console.print(table)
    for p in sorted(report.problems, key=lambda p: (p.severity != "error", p.file, p.line or 0))[:30]:
        style = "red" if p.severity == "error" else "yellow"
        console.print(f"[{style}]{p.severity}[/] {p}", highlight=False)
    if len(report.problems) > 30:
        console.print(f"... {len(report.problems) - 30} more in the JSON report")


def run(data_root: Path, settings: ValidateSettings, out: Path) -> ValidationReport:
    """The validate stage: check, write report and manifest, and fail unless the data may be used."""
    report, accepted = validate_dataset(data_root, settings)
    write_outputs(report, accepted, data_root, out)
    if not report.ok:
        raise DataValidationError(report.summary())
    return report
