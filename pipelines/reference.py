"""A version's reference profile: registered with it (the `profile` pyfunc artifact), or computed on demand for a
version registered before profiles existed (then logged to its run under `monitoring/profile`)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from rich.console import Console

from conveyor.errors import ConveyorError
from conveyor.paths import ProjectPaths
from conveyor.settings import Settings
from pipelines import model_source as source
from pipelines.data import dir_md5
from pipelines.profile import Profile, ProfileError, build, training_sources

RUN_ARTIFACT_PATH = "monitoring/profile"


class ProfileMissingError(ConveyorError, FileNotFoundError):
    """The version has no reference profile; the message says how to make one."""


def load_reference(client: MlflowClient, paths: ProjectPaths, version: ModelVersion, conf: float) -> Profile:
    """The version's profile made at confidence threshold `conf` (serve.conf: the threshold of the detections the
    server logs): its registered artifact, else one computed later and logged to its run."""
    made = None  # the threshold of the first profile found at another one
    for folder in _profile_folders(client, paths, version):
        profile = Profile.load(folder)
        if _made_at(profile, conf):
            return profile
        made = profile.meta.get("conf") if made is None else made
    if made is not None:
        raise ProfileMissingError(
            f"{version.name} v{version.version}'s reference was profiled at confidence {made}, and serve.conf is "
            f"{conf}: the detections the server logs would not compare with it. Profile it at serve.conf: "
            f"`conveyor profile --model {version.version}`, or set serve.conf back to {made}"
        )
    raise ProfileMissingError(
        f"{version.name} v{version.version} has no reference profile (registered before drift monitoring). "
        f"Compute it from the data it was trained on: `conveyor profile --model {version.version}` "
        f"(data/ must be that version's data, md5 {version.tags.get('conveyor.data_md5', '?')}: check out the "
        f"commit {version.tags.get('conveyor.git_commit', '?')[:12]}'s data.dvc and `conveyor data pull`)"
    )


def compute_reference(
    client: MlflowClient, paths: ProjectPaths, settings: Settings, version: ModelVersion, console: Console
) -> Profile:
    """Profile an older version on the data it was trained on (data/ must be that version, and its validated
    manifest current: the same images the profile stage reads), and log it to its run."""
    expected = version.tags.get("conveyor.data_md5")
    if not paths.data.is_dir():
        raise FileNotFoundError("data/ is missing: `conveyor data pull` first")
    actual = dir_md5(paths.data)
    if expected and actual != expected:
        raise ProfileMissingError(
            f"v{version.version} was trained on data {expected}, and data/ is {actual}: check out the data.dvc of "
            f"commit {version.tags.get('conveyor.git_commit', '?')[:12]}, `conveyor data pull`, then retry"
        )
    try:
        sources = training_sources(paths)
    except ProfileError as exc:
        raise ProfileMissingError(f"{exc} (on this version's data)") from None
    files = source.fetch(client, version, paths.model_cache)
    runtime = source.profiling_runtime(files, settings.gates.serving_runtime)
    detector = source.load(files, runtime, 1, settings.serve.conf).detectors[0]
    folder = paths.monitoring / "profiles" / version.name / str(version.version)
    build(folder, sources, detector, runtime, settings, console, {"computed": "on demand", "data_md5": actual})
    if version.run_id:
        client.log_artifacts(version.run_id, str(folder), RUN_ARTIFACT_PATH)
    return Profile.load(folder)


def _made_at(profile: Profile, conf: float) -> bool:
    """Whether the profile's detections were counted at `conf` (a profile that does not say is taken as made so)."""
    made = profile.meta.get("conf")
    return made is None or abs(float(made) - conf) < 1e-9


def _profile_folders(client: MlflowClient, paths: ProjectPaths, version: ModelVersion) -> Iterator[Path]:
    """The version's profiles, best first: the registered one, then one computed on demand (downloaded from its run
    into the local cache when missing there). Lazy: nothing is downloaded while an earlier one will do."""
    files = source.fetch(client, version, paths.model_cache)
    if "profile" in files.artifacts:
        yield files.artifacts["profile"]
    cached = paths.monitoring / "profiles" / version.name / str(version.version)
    if not (cached / "profile.json").is_file() and version.run_id:
        names = {a.path for a in client.list_artifacts(version.run_id, RUN_ARTIFACT_PATH)}
        if f"{RUN_ARTIFACT_PATH}/profile.json" in names:
            with tempfile.TemporaryDirectory(dir=paths.scratch) as staging:
                client.download_artifacts(version.run_id, RUN_ARTIFACT_PATH, staging)
                cached.parent.mkdir(parents=True, exist_ok=True)
                Path(staging, "profile").rename(cached)
    if (cached / "profile.json").is_file():
        yield cached
