"""The dataset's life under DVC: make or import it, record its version, and get exactly that version back."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from rich.console import Console

from conveyor.errors import ConveyorError
from conveyor.lineage import data_version, dir_md5, present_md5
from conveyor.paths import ProjectPaths, exclusive, replace_folder, staged_beside, write_atomically
from conveyor.settings import SPLITS, SynthSettings, load_settings
from pipelines import formats, synth
from pipelines.batches import BATCH_SEPARATOR
from pipelines.dvc_repo import dvc, dvc_lock_holders
from pipelines.validate import DataValidationError, read_class_names, validate_dataset

DEMO_REMOTE = "demo"  # read-only remote shipped in the repository (infra/demo-remote)


class DataVersionError(ConveyorError, RuntimeError):
    """data/ is not, and cannot be made, the version data.dvc names."""


def wait_for_dvc_lock(root: Path, timeout: float = 60.0) -> list[int]:
    """Called under the project's training lock, so a holder of DVC's lock is a run that was interrupted (or a
    `dvc` command typed by hand): wait up to `timeout` s for it to exit. Returns the PIDs still alive after that;
    DVC's own "is busy" error then names them."""
    holders = dvc_lock_holders(root)
    if not holders:
        return []
    _, alive = psutil.wait_procs(holders, timeout=timeout)
    return [process.pid for process in alive]


@dataclass(frozen=True)
class DataStatus:
    expected: str  # md5 named by data.dvc
    actual: str | None  # md5 of data/ now, None when absent

    @property
    def in_sync(self) -> bool:
        return self.expected == self.actual


def data_status(paths: ProjectPaths) -> DataStatus:
    expected = data_version(paths.data_dvc).md5
    return DataStatus(expected, present_md5(paths.data))


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
        # Its contents into data/, which may be there empty (a volume mounted there): moving the folder itself
        # would nest it at data/data, and the commit below would name that instead.
        paths.data.mkdir(exist_ok=True)
        for entry in (Path(tmp) / "data").iterdir():
            shutil.move(str(entry), paths.data / entry.name)
    dvc(paths.root, "commit", "--force", "data.dvc")  # into the DVC cache, data.dvc unchanged
    return status.expected


def record_version(paths: ProjectPaths) -> str:
    """`dvc add data`: store the current data/ in the cache and name it in data.dvc. DVC's own words when it fails."""
    try:
        dvc(paths.root, "add", "data")
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise DataVersionError(f"`dvc add data` failed: {said[-1] if said else f'exit {exc.returncode}'}") from None
    return data_version(paths.data_dvc).md5


def _no_training(paths: ProjectPaths) -> AbstractContextManager[None]:
    """Held while data/ changes. A training run holds the same lock from its start to its promotion: data changed
    under it would be named in the registry as the data it was trained on. A run that starts meanwhile waits for it
    (orchestration.on_overlap: wait) or is turned away as busy (reject)."""

    def busy() -> None:
        raise DataVersionError(
            "a training run is in progress in this project: data/ changed under it would be recorded as the "
            "data it was trained on; try again when it ends; nothing was changed"
        )

    return exclusive(paths.training_lock, busy)


def _require_dvc(paths: ProjectPaths) -> None:
    """Checked before data/ is touched: a version that cannot be recorded is not written."""
    if not (paths.root / ".dvc").is_dir():
        raise DataVersionError(
            f"{paths.root} is not a DVC project (no .dvc/): run `dvc init` first; nothing was changed"
        )
    holders = dvc_lock_holders(paths.root)
    if holders:
        raise DataVersionError(
            f"DVC is busy (process {holders[0].pid}: a pipeline run?): try again when it ends; nothing was changed"
        )
    _drop_torn_rwlock(paths.root / ".dvc" / "tmp" / "rwlock")


RWLOCK_SETTLED_S = 10.0  # a DVC writing its rwlock this long ago has finished writing it


def _drop_torn_rwlock(rwlock: Path) -> None:
    """DVC's rwlock left empty or torn (a `dvc add` killed while writing it) blocks every later DVC command ("Unable
    to read RWLock-file ... JSON structure is corrupted"). It names no holder (`dvc_lock_holders` found none), so
    it is removed, once it has not changed for a while (a DVC still writing it is left alone)."""
    try:
        text = rwlock.read_text()
        settled = time.time() - rwlock.stat().st_mtime > RWLOCK_SETTLED_S
    except OSError:
        return
    try:
        json.loads(text)
    except ValueError:
        if settled:
            rwlock.unlink(missing_ok=True)


def synthesize(
    paths: ProjectPaths, settings: SynthSettings, out: Path | None = None, *, overwrite: bool = False
) -> synth.SynthSummary:
    """Generate the synthetic dataset into data/ (recorded with DVC) or into `out` (not recorded)."""
    if out is not None:
        return synth.generate(settings, out, overwrite=overwrite)
    with _no_training(paths):
        _require_dvc(paths)
        summary = synth.generate(settings, paths.data, overwrite=overwrite)
        record_version(paths)
    return summary


@dataclass(frozen=True)
class ImportSummary:
    images: dict[str, int]
    labels: dict[str, int]
    names: list[str]
    conversion: formats.ConvertSummary


def import_dataset(paths: ProjectPaths, source: Path, *, replace: bool = False) -> ImportSummary:
    """Bring a dataset (YOLO, COCO or Pascal VOC; see `pipelines.formats`) into data/ and record it with DVC.

    The source is only read. Conversion problems follow `validate.on_error`; splits the source lacks are carved by
    content hash (`data.split`), classes go through `data.class_map`. YOLO label lines are kept as they are (their
    class ids remapped), so the validate stage's report names any bad one.
    """
    source = source.resolve()
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such dataset folder")
    holds = paths.data.exists() and any(paths.data.iterdir())
    if holds and not replace:
        raise FileExistsError(f"{paths.data} already holds a dataset; pass --replace (the old version stays in DVC)")
    settings = load_settings(paths.params)
    if paths.data_dvc.exists():
        data_version(paths.data_dvc)  # a damaged data.dvc is named before data/ is replaced, not after
    if holds:
        # --replace promises the old version stays in DVC: only true of what a data version records. Edits never
        # recorded were deleted for good.
        status = data_status(paths) if paths.data_dvc.exists() else None
        if status is None or not status.in_sync:
            raise DataVersionError(
                f"{paths.data} holds files no data version records (it differs from what data.dvc names, or there is "
                "no data.dvc), and --replace would delete them for good; nothing was changed. Record them (`dvc add "
                "data`, commit data.dvc), discard them (`dvc checkout --force data.dvc`), or move data/ away"
            )
    with _no_training(paths):
        _require_dvc(paths)
        with staged_beside(paths.data, "import") as staging:
            conversion = formats.convert(source, staging, settings.data, settings.validate_.on_error)
        # The old data/ set aside and put back if the new one cannot take its place: Ctrl-C there left no data/.
        replace_folder(staging, paths.data)
        try:
            record_version(paths)
        except DataVersionError as exc:
            raise DataVersionError(
                f"{exc}. data/ holds the imported dataset, not recorded: fix that and run `dvc add data`, or get the "
                "version data.dvc names back with `dvc checkout data.dvc`"
            ) from None
        return ImportSummary(conversion.images, conversion.labels, conversion.names, conversion)


@dataclass(frozen=True)
class AddSummary:
    batch: str  # add-<UTC YYYYmmdd-HHMMSS>-<slug of the folder name>, the prefix of every added file
    images: dict[str, int]  # per split, only splits the batch has
    labels: dict[str, int]
    names: list[str]
    md5: str  # the new data version, as data.dvc now names it
    committed: bool  # data.dvc committed to git
    conversion: formats.ConvertSummary

    @property
    def total_images(self) -> int:
        return sum(self.images.values())


def batch_id(folder_name: str, now: datetime | None = None) -> str:
    """`add-<UTC YYYYmmdd-HHMMSS>-<slug>`: the slug is the folder name lowercased, runs of anything but [a-z0-9]
    made one '-' (so it never holds the `__` separator)."""
    slug = re.sub(r"[^a-z0-9]+", "-", folder_name.lower()).strip("-") or "batch"
    return f"add-{(now or datetime.now(UTC)).strftime('%Y%m%d-%H%M%S')}-{slug}"


def image_hashes(data_root: Path) -> dict[str, tuple[str, str]]:
    """The SHA-256 of each image of the dataset -> (its split, its file name): what an added batch or a labelling
    selection is compared with (the same bytes are the same image)."""
    found: dict[str, tuple[str, str]] = {}
    for split in SPLITS:
        for path in sorted((data_root / "images" / split).rglob("*")):
            if path.is_file():
                found.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), (split, path.name))
    return found


def _check_batch(paths: ProjectPaths, staging: Path, origin: dict[str, Path], source: Path) -> None:
    """Validate the staged batch as the validate stage would, plus leakage against data/; raise on any error."""

    root = source if source.is_dir() else source.parent

    def shown(rel: str) -> str:
        if rel not in origin:
            return rel
        try:
            return origin[rel].relative_to(root).as_posix()
        except ValueError:
            return rel

    report, _ = validate_dataset(staging, load_settings(paths.params).validate_, shown_root=staging)
    # A batch may bring only some splits; that the whole batch is not empty is checked before.
    errors = [p for p in report.errors if "split is empty" not in p.reason]
    messages = []
    for p in errors:
        reason = p.reason
        for rel in (r for r in origin if r in reason):  # another file named in the reason (leakage, duplicates)
            reason = reason.replace(rel, shown(rel))
        messages.append(f"{shown(p.file)}{f':{p.line}' if p.line is not None else ''}: {reason}")
    existing = image_hashes(paths.data)
    in_batch: dict[str, str] = {}  # content hash -> the batch's first image of it
    for rel in (r for r in origin if r.startswith("images/")):
        split = rel.split("/")[1]
        digest = hashlib.sha256((staging / rel).read_bytes()).hexdigest()
        other = existing.get(digest)
        if digest in in_batch:  # `part_0001 (copy).jpg`: its label would count twice (it was only a warning)
            messages.append(f"{shown(rel)}: same image as {shown(in_batch[digest])} in this batch")
        in_batch.setdefault(digest, rel)
        if other and other[0] != split:
            messages.append(
                f"{shown(rel)}: same image as data/images/{other[0]}/{other[1]} (leakage between {other[0]} and "
                f"{split})"
            )
        elif other:  # a second batch bringing an image the dataset has: its label would count twice
            messages.append(f"{shown(rel)}: already in the dataset as data/images/{other[0]}/{other[1]}")
    if messages:
        listed = "\n".join(f"  {m}" for m in messages[:50])
        more = f"\n  ... and {len(messages) - 50} more" if len(messages) > 50 else ""
        raise DataValidationError(
            f"{source}: {len(messages)} error(s), nothing was added (data/ is unchanged):\n{listed}{more}"
        )


def _place(staging: Path, data_root: Path) -> tuple[list[Path], list[Path]]:
    """Move the staged images/ and labels/ files into data_root. On any failure take back what was placed and
    raise; else return the files placed and the folders made (to take them back later)."""
    placed: list[Path] = []
    made: list[Path] = []
    try:
        for kind in ("images", "labels"):
            for path in sorted(p for p in (staging / kind).rglob("*") if p.is_file()):
                target = data_root / path.relative_to(staging)
                missing = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
                for folder in reversed(missing):
                    folder.mkdir()
                    made.append(folder)
                shutil.move(path, target)
                placed.append(target)
    except BaseException:
        _take_back(placed, made)
        raise
    return placed, made


def _take_back(placed: list[Path], made: list[Path]) -> None:
    """Best effort: remove the files placed, then the folders made for them (deepest first)."""
    for path in placed:
        path.unlink(missing_ok=True)
    for folder in reversed(made):
        with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
            folder.rmdir()


def _git_commit(root: Path, message: str) -> None:
    """Commit data.dvc alone (other staged changes stay staged)."""
    for args in (["git", "add", "data.dvc"], ["git", "commit", "-q", "-m", message, "--", "data.dvc"]):
        try:
            result = subprocess.run(args, cwd=root, capture_output=True, text=True, check=False)
        except OSError as exc:
            output, failed = str(exc), True
        else:
            output, failed = (result.stderr or result.stdout).strip(), result.returncode != 0
        if failed:
            raise DataVersionError(
                f"`{' '.join(args[:2])}` failed ({output}). The batch is in data/ and recorded in data.dvc; "
                "commit data.dvc yourself"
            )


def add_dataset(paths: ProjectPaths, source: Path, *, commit: bool = False, name: str | None = None) -> AddSummary:
    """Append a batch of labelled images (YOLO, COCO or Pascal VOC, as `import_dataset` reads) to the current
    dataset, and record the new version with DVC (and commit data.dvc to git if `commit`).

    The batch is checked before data/ changes, and refused whole on any error (whatever the `on_error` policy): its
    classes, after `data.class_map`, must be among the current dataset's (class ids are mapped by name); it must hold
    images; it must pass the validate stage's checks and not repeat an image of data/; no file may exist already. A
    batch that names splits keeps them; one that names none (a labelling tool's export) is split by content hash
    (`data.split`). Only images and .txt labels are added, renamed `<batch>__<name>` (see `batch_of`). They are
    staged first, then moved in; a failure while moving or recording takes back what was moved. The source is only
    read. `name` names the batch (default: the source folder's name).
    """
    source = source.resolve()
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder (expected a dataset: YOLO, COCO or Pascal VOC)")
    if not paths.data.is_dir() or not any(paths.data.iterdir()):
        raise DataVersionError(
            f"no dataset in {paths.data} to add to: run `conveyor data pull` first (or make one with `conveyor data "
            "synth` or `conveyor data import`)"
        )
    status = data_status(paths)
    if not status.in_sync:
        raise DataVersionError(
            f"data/ ({status.actual}) differs from the version data.dvc names ({status.expected}), so nothing was "
            "added. Record your edits (`dvc add data`, commit data.dvc) or discard them (`dvc checkout --force "
            "data.dvc`) first."
        )
    current = read_class_names(paths.data)
    settings = load_settings(paths.params)
    with _no_training(paths):
        _require_dvc(paths)
        batch = batch_id(name or source.stem)
        recorded = paths.data_dvc.read_bytes()  # put back, with the data, if anything below is interrupted
        staging = Path(tempfile.mkdtemp(dir=paths.root, prefix=".add-"))
        placed: list[Path] | None = None
        made: list[Path] = []
        try:
            conversion = formats.convert(
                source,
                staging,
                settings.data,
                "fail",
                target_names=current,
                carve_named=False,
                action="add",
                prefix=f"{batch}{BATCH_SEPARATOR}",
            )
            _check_batch(paths, staging, conversion.origin, source)
            taken = sorted(rel for rel in conversion.origin if (paths.data / rel).exists())
            if taken:
                raise FileExistsError(
                    f"{len(taken)} file(s) of batch {batch} already exist in data/ (e.g. {taken[0]}); nothing was added"
                )
            placed, made = _place(staging, paths.data)
            shutil.rmtree(staging, ignore_errors=True)
            md5 = record_version(paths)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if placed is None:  # nothing was placed in data/
                raise
            # Ctrl-C anywhere from the batch's placing to `dvc add`'s end (which may leave data.dvc naming the new
            # version): the version data.dvc named is put back, with the data, so the two agree.
            write_atomically(paths.data_dvc, recorded)
            _take_back(placed, made)
            if isinstance(exc, DataVersionError):
                raise DataVersionError(f"{exc}; the batch was taken out of data/ again") from None
            raise
        if commit:
            _git_commit(paths.root, f"data: add {batch} ({sum(conversion.images.values())} images)")
        return AddSummary(batch, conversion.images, conversion.labels, conversion.names, md5, commit, conversion)
