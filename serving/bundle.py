"""`conveyor bundle MODEL_REF --out DIR`: a self-contained folder (and .tar.gz) for a device on the line, and its
rollout to the line through a channel.

Contents: `model/` (OpenVINO IR, ONNX, metadata.json with class names, input size and thresholds), `run.py` (the
edge runner: numpy, OpenCV and one runtime; paho-mqtt and cryptography for decisions over MQTT and signed rollouts;
pyarrow for its prediction log), `features.py` and `log_parts.py` (the server's own feature and log-writing code, which
the runner loads for its prediction log), `edge.json` (the line, the reject rule, the queue, the channel and the log:
params.yaml `edge`), `requirements.txt`, and
`manifest.json` (which model version, and the SHA-256 of every file, checked by `run.py --verify`). Nothing in it
imports torch, Ultralytics or Conveyor.

Rollout: with the team's Ed25519 key (`conveyor edge keygen`), `sign` writes `manifest.sig` beside the manifest; the
manifest holds every file's SHA-256, so one signature covers the whole bundle. `publish` puts the archive in the
channel (a folder or s3://bucket/prefix) under `bundles/`, then points `LINE.json` at it (written last, so a runner
never sees an entry whose archive is not there yet); `LINE.history.json` keeps every entry, newest last.
`roll_back_channel` points the line back at the newest earlier entry of a given model version: `conveyor rollback`
does it when `edge.channel` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.errors import ConveyorError
from conveyor.paths import replace_folder, staged_beside
from conveyor.settings import ConfigError, EdgeSettings, RejectSettings
from pipelines import features, log_parts
from pipelines.model_source import ModelFiles

EDGE_RUNNER = Path(__file__).parent / "edge" / "run.py"
# Conveyor's own modules the runner imports from the bundle (no Conveyor import at run time): its prediction-log
# records are computed and written by the server's code.
EDGE_MODULES = (Path(features.__file__), Path(log_parts.__file__))
REQUIREMENTS = (
    "numpy\nopencv-python-headless\n# one runtime:\nopenvino\n# or: onnxruntime\n"
    "# decisions over MQTT (--mqtt):\npaho-mqtt\n# signed rollouts (--public-key):\ncryptography\n"
    "# a channel on S3, and shipping the prediction log:\nboto3\n# the prediction log (edge.log):\npyarrow\n"
)


class ChannelError(ConveyorError, RuntimeError):
    """A channel that cannot be published to or rolled back (nothing published, no such version, unreachable)."""


@dataclass(frozen=True)
class Bundle:
    directory: Path
    archive: Path
    files: int
    size_mb: float


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(
    files: ModelFiles,
    out: Path,
    conf: float,
    edge: EdgeSettings | None = None,
    *,
    overwrite: bool = False,
    private_key: Path | None = None,
    log_s3: str | None = None,
) -> Bundle:
    """The bundle folder and its .tar.gz; its runner returns detections at `conf` (serve.conf) unless told otherwise
    and decides by `edge` (params.yaml `edge`). Its prediction log is shipped to `edge.log.s3`, else `log_s3` (the
    server's, serve.prediction_log.s3). With `private_key`, the manifest is signed."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty: pass --overwrite to replace it")
        if not (out / "manifest.json").is_file():
            # --overwrite replaces a bundle; `--out data --overwrite` (a typo) removed the dataset.
            raise FileExistsError(f"{out} is not a bundle (no manifest.json): --overwrite replaces only a bundle")
    key = signing_key(private_key) if private_key is not None else None  # refused before 20 MB are copied
    edge = edge or EdgeSettings()
    check_rule(edge.reject, files.card.names, conf)
    with staged_beside(out) as staging:  # nothing half-built is left beside the bundle
        _stage(staging, files, conf, edge, key, log_s3)
    replace_folder(staging, out)  # the bundle appears whole or not at all
    archive = out.with_name(out.name + ".tar.gz")
    partial = archive.with_name(archive.name + ".partial")  # an interrupted --overwrite left a truncated archive
    try:
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        os.replace(partial, archive)
    finally:
        partial.unlink(missing_ok=True)
    written = [p for p in out.rglob("*") if p.is_file()]
    return Bundle(out, archive, len(written), round(sum(p.stat().st_size for p in written) / 1e6, 2))


def check_rule(rule: RejectSettings, names: list[str], conf: float) -> None:
    """A reject rule the model can meet: its classes are the model's, and its confidence is not under the
    threshold the runner detects at (a detection under serve.conf is never made, so it could never reject)."""
    unknown = [name for name in rule.classes or [] if name not in names]
    if unknown:
        raise ConfigError(
            f"edge.reject.classes: {', '.join(map(repr, unknown))} not among the model's classes "
            f"({', '.join(names)}): no part would be rejected for it"
        )
    if rule.min_confidence < conf:
        raise ConfigError(
            f"edge.reject.min_confidence {rule.min_confidence} is under serve.conf {conf}, the threshold the runner "
            "detects at: no detection under it is made, so none rejects. Raise min_confidence, or lower serve.conf"
        )


def _stage(staging: Path, files: ModelFiles, conf: float, edge: EdgeSettings, key: Any, log_s3: str | None) -> None:
    (staging / "model").mkdir(parents=True)
    card = {**json.loads(files.artifact("metadata").read_text()), "conf": conf}
    (staging / "model" / "metadata.json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.copyfile(files.artifact("onnx"), staging / "model" / "model.onnx")
    shutil.copytree(files.artifact("openvino"), staging / "model" / "openvino")
    if "openvino_int8" in files.artifacts:  # passed the parity gate at registration
        shutil.copytree(files.artifact("openvino_int8"), staging / "model" / "openvino_int8")
    shutil.copyfile(EDGE_RUNNER, staging / "run.py")
    for module in EDGE_MODULES:
        shutil.copyfile(module, staging / module.name)
    config = edge.model_dump(mode="json")
    config["log"]["s3"] = config["log"]["s3"] or log_s3
    (staging / "edge.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging / "requirements.txt").write_text(REQUIREMENTS)
    listed = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {
        "model": files.name,
        "version": files.version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "imgsz": files.card.imgsz,
        "names": files.card.names,
        "conf": conf,
        "sha256": {p.relative_to(staging).as_posix(): sha256(p) for p in listed},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if key is not None:
        sign(staging, key)


# --- signing ---------------------------------------------------------------------------------------------------------


def keygen(out: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: `edge-signing.key` (the team keeps it; it signs bundles) and `edge-signing.pub`
    (every runner gets it; it only verifies)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private, public = out / "edge-signing.key", out / "edge-signing.pub"
    if private.exists():
        raise FileExistsError(f"{private} exists: a new key would orphan every runner that trusts the old one")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    # Created 0600: written first and chmod-ed after, it was readable by anyone for a moment.
    with os.fdopen(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def signing_key(private_key: Path) -> Any:
    """The team's Ed25519 private key from its PEM file; anything else is refused with what it is."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    hint = "(make one with `conveyor edge keygen`; it writes edge-signing.key)"
    try:
        key = load_pem_private_key(private_key.read_bytes(), password=None)
    except OSError as exc:  # missing, a folder, unreadable
        raise ChannelError(f"--key {private_key}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, TypeError):  # not PEM, a public key, or one with a password
        raise ChannelError(f"--key {private_key}: not an unencrypted PEM private key {hint}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ChannelError(f"--key {private_key}: not an Ed25519 private key {hint}")
    return key


def sign(bundle: Path, key: Any) -> Path:
    """`manifest.sig`: the Ed25519 signature of the bundle's manifest.json, by `signing_key`'s key."""
    signature = bundle / "manifest.sig"
    signature.write_bytes(key.sign((bundle / "manifest.json").read_bytes()))
    return signature


# --- the channel -----------------------------------------------------------------------------------------------------


class ChannelStore:
    """A channel's objects in a folder or under s3://bucket/prefix (conveyor.storage's client)."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/")

    def _s3(self) -> tuple[Any, str, str]:
        from conveyor import storage

        where = storage.S3Location.parse(self.location)
        return storage.client(), where.bucket, where.prefix

    @contextlib.contextmanager
    def _explained(self, bucket: str) -> Iterator[None]:
        """boto3's failures as a ChannelError naming the channel, the bucket and the endpoint."""
        from conveyor import storage

        try:
            with storage.explained(bucket, storage.endpoint_from_env()):
                yield
        except storage.StorageError as exc:
            raise ChannelError(f"edge channel {self.location}: {exc}") from None

    def write(self, relative: str, content: bytes) -> None:
        if self.location.startswith("s3://"):
            s3, bucket, prefix = self._s3()
            with self._explained(bucket):
                s3.put_object(Bucket=bucket, Key=f"{prefix}/{relative}" if prefix else relative, Body=content)
            return
        path = Path(self.location) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.partial")
        staging.write_bytes(content)
        staging.replace(path)  # a runner reading LINE.json sees the old entry or the new one, never half

    def read(self, relative: str) -> bytes | None:
        if self.location.startswith("s3://"):
            from botocore.exceptions import ClientError

            s3, bucket, prefix = self._s3()
            with self._explained(bucket):
                try:
                    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{relative}" if prefix else relative)["Body"]
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                        return None
                    raise
                return bytes(body.read())
        path = Path(self.location) / relative
        return path.read_bytes() if path.is_file() else None


def publish(built: Bundle, channel: str, line: str) -> dict[str, Any]:
    """The bundle's archive into the channel, then the line pointed at it. A bundle must be signed to be published:
    runners that check signatures would refuse it anyway, and one that does not would run anything."""
    if not (built.directory / "manifest.sig").is_file():
        raise ChannelError(f"{built.directory} is not signed: build it with --key (`conveyor edge keygen` makes one)")
    manifest = json.loads((built.directory / "manifest.json").read_text())
    archive = built.archive.read_bytes()
    digest = hashlib.sha256(archive).hexdigest()
    relative = f"bundles/{manifest['model']}-v{manifest['version']}-{digest[:12]}.tar.gz"
    entry = {
        "bundle": relative,
        "sha256": digest,
        "manifest_sha256": sha256(built.directory / "manifest.json"),
        "model": manifest["model"],
        "version": str(manifest["version"]),
        "published": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    store = ChannelStore(channel)
    store.write(relative, archive)
    _point(store, line, entry)
    return entry


def last_run_of(channel: str, line: str, version: str) -> dict[str, Any]:
    """The newest entry of the line's history that ran `version`; a ChannelError when it never did."""
    earlier = [e for e in _history(ChannelStore(channel), line) if e["version"] == str(version)]
    if not earlier:
        raise ChannelError(
            f"{channel}: line {line} never ran v{version}: publish it first with `conveyor bundle {version} "
            f"--publish --line {line} --key KEY`"
        )
    return earlier[-1]


def roll_back_channel(channel: str, line: str, version: str) -> dict[str, Any]:
    """Point the line back at the newest entry of its history that ran `version` (the champion after a rollback)."""
    entry = {
        **last_run_of(channel, line, version),
        "published": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rolled_back": True,
    }
    _point(ChannelStore(channel), line, entry)
    return entry


def current(channel: str, line: str) -> dict[str, Any] | None:
    raw = ChannelStore(channel).read(f"{line}.json")
    return None if raw is None else dict(json.loads(raw))


def _history(store: ChannelStore, line: str) -> list[dict[str, Any]]:
    raw = store.read(f"{line}.history.json")
    return list(json.loads(raw)) if raw is not None else []


def _point(store: ChannelStore, line: str, entry: dict[str, Any]) -> None:
    store.write(f"{line}.history.json", json.dumps([*_history(store, line), entry], indent=2).encode())
    store.write(f"{line}.json", json.dumps(entry, indent=2).encode())  # last: what runners read
