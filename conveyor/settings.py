"""Typed settings: params.yaml, loaded once and checked, with errors that name the bad key.

params.yaml is the one configuration source. Each DVC stage declares the params it reads as dependencies (its own
section, and the keys of other sections it uses, named in dvc.yaml), so changing `train.epochs` re-runs train and what
follows, never validate.
Environment variables are read only for endpoints and secrets (MLFLOW_TRACKING_URI, ...), never here.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from conveyor.errors import ConveyorError

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# An endpoint, so it may come from the environment (as CONVEYOR_DVC_REMOTE does): where every server ships its
# prediction log and every drift check reads it. A cluster sets it once, in its ConfigMap, for the server pods and the
# check's flow-run pods alike; without it the check's pod had no log at all.
PREDICTION_LOG_S3_ENV = "CONVEYOR_PREDICTION_LOG_S3"

SPLITS = ("train", "val", "test")
Split = Literal["train", "val", "test"]


class ConfigError(ConveyorError, ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the bad key."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo like `epoch:` must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DomainShift(_Section):
    """Knobs that move the synthetic domain away from the training data (used to exercise drift checks)."""

    brightness: float = Field(1.0, gt=0, le=10, description="multiplies the lighting; < 1 is darker")
    blur_sigma: float = Field(0.0, ge=0, le=50, description="Gaussian blur applied to the whole frame, in pixels")
    background: Literal["metal", "fabric", "wood", "concrete"] | None = Field(
        None, description="force one background texture; 'concrete' never appears in the default domain"
    )
    defect_scale: float = Field(1.0, gt=0, le=10, description="multiplies defect sizes (inf made full-frame boxes)")


# Ten years: a window longer than any log (1e9 h overflowed the date arithmetic, a traceback).
MAX_WINDOW_HOURS = 87_600


class SynthSettings(_Section):
    seed: int = Field(7, ge=0, description="numpy's generator takes no negative seed")
    image_size: int = Field(320, ge=64, le=2048)
    counts: dict[str, int] = Field(default_factory=lambda: {"train": 240, "val": 60, "test": 60})
    background_fraction: float = Field(0.1, ge=0, le=1, description="share of images with no defect")
    max_defects: int = Field(3, ge=1, le=20)
    jpeg_quality: int = Field(92, ge=50, le=100)
    shift: DomainShift = DomainShift()

    @model_validator(mode="after")
    def _every_split_counted(self) -> SynthSettings:
        missing = [s for s in SPLITS if s not in self.counts]
        unknown = sorted(set(self.counts) - set(SPLITS))
        if missing or unknown:
            raise ValueError(
                f"counts must give exactly the splits {list(SPLITS)}; missing {missing}, unknown {unknown}"
            )
        if any(n < 0 for n in self.counts.values()):
            raise ValueError("counts must not be negative")
        return self


class SplitSettings(_Section):
    """How a dataset's missing splits are carved out of its train images (import, and batches without splits)."""

    val: float = Field(0.15, ge=0, lt=1, description="share of images carved into val when the source has no val")
    test: float = Field(0.15, ge=0, lt=1, description="share carved into test when the source has no test")
    seed: int = Field(0, description="salts the content hash that decides an image's split")

    @model_validator(mode="after")
    def _leaves_train(self) -> SplitSettings:
        if self.val + self.test >= 1:
            raise ValueError(f"val + test is {self.val + self.test:g}: nothing would be left to train on")
        return self


class DataSettings(_Section):
    """`conveyor data import` / `data add` / `label import`: how data from a labelling tool comes in."""

    split: SplitSettings = SplitSettings()
    class_map: dict[str, str | None] = Field(
        default_factory=dict,
        description="source class -> dataset class (rename or merge), or null to drop its boxes",
    )
    classes: list[str] | None = Field(
        None, description="the dataset's classes in id order; null: the source's classes after class_map"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataSettings:
        if self.classes is not None:
            if len(set(self.classes)) != len(self.classes) or not self.classes:
                raise ValueError("classes must be a non-empty list without repeats")
            unknown = sorted({t for t in self.class_map.values() if t is not None} - set(self.classes))
            if unknown:
                raise ValueError(f"class_map maps to {unknown}, which classes {self.classes} does not list")
        return self


class ValidateSettings(_Section):
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="fail: stop the pipeline on any bad file; skip: leave bad files out and list them"
    )
    allow_background: bool = Field(True, description="images without a label file count as background images")


class FinetuneSettings(_Section):
    """Training that starts from a checkpoint (train.weights: a drift retraining starts from the champion) learns
    from where the champion stands: fewer epochs, its own arguments."""

    epochs: int | None = Field(None, ge=1, description="epochs when train.weights is set (null: train.epochs)")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Ultralytics arguments over train.extra when train.weights is set"
    )


class TrainSettings(_Section):
    model: str = Field("yolo11n.yaml", description="an Ultralytics model YAML (architecture, trained from scratch)")
    weights: Path | None = Field(None, description="a local .pt checkpoint to warm-start from (e.g. the champion)")
    epochs: int = Field(40, ge=1)
    imgsz: int = Field(320, ge=32)
    batch: int = Field(8, ge=1)
    nbs: int = Field(
        64, ge=1, description="images per optimizer step (Ultralytics' nominal batch: it accumulates nbs/batch batches)"
    )
    seed: int = 0
    patience: int = Field(100, ge=0)
    workers: int = Field(0, ge=0, description="dataloader workers; 0 keeps memory low on small machines")
    device: str = Field("auto", description="'auto' (first GPU, else CPU), 'cpu', or a CUDA index like '0'")
    close_mosaic: int = Field(10, ge=0)
    channels_last: bool = Field(
        True, description="train in channels-last (NHWC) memory format: faster convolutions on CPU (docs/pipeline.md)"
    )
    plots: bool = Field(
        True,
        description="Ultralytics' pictures of the run (labels, batches, curves, confusion matrices), logged to MLflow;"
        " they cost seconds a run, which only a tiny run notices",
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="further Ultralytics train arguments")
    finetune: FinetuneSettings = FinetuneSettings()

    @property
    def effective_epochs(self) -> int:
        """Epochs of this training: the fine-tune's when it starts from a checkpoint."""
        return (self.finetune.epochs or self.epochs) if self.weights is not None else self.epochs

    @property
    def effective_extra(self) -> dict[str, Any]:
        return {**self.extra, **self.finetune.extra} if self.weights is not None else dict(self.extra)

    @model_validator(mode="after")
    def _extra_does_not_repeat(self) -> TrainSettings:
        # Both are passed beside the train section's own arguments (`model.train(imgsz=..., **effective_extra)`).
        reserved = set(type(self).model_fields) | {
            "data",
            "project",
            "name",
            "deterministic",
            "exist_ok",
            "verbose",
        }
        for where, extra in (("train.extra", self.extra), ("train.finetune.extra", self.finetune.extra)):
            repeated = sorted(set(extra) & reserved)
            if repeated:
                hint = "train.finetune.epochs" if repeated[0] == "epochs" and where != "train.extra" else None
                raise ValueError(
                    f"{where} repeats {', '.join(repeated)}: set it as {hint or 'train.' + repeated[0]} (or not at all)"
                )
        return self


class EvaluateSettings(_Section):
    split: Split = "test"
    batch: int = Field(16, ge=1)
    conf: float = Field(0.001, gt=0, lt=1)
    iou: float = Field(0.7, gt=0, lt=1)


class LatencySettings(_Section):
    warmup: int = Field(3, ge=0)
    runs: int = Field(20, ge=1)


ExportFormat = Literal["onnx", "onnx_dynamic", "openvino", "tensorrt"]
DEFAULT_EXPORT_FORMATS: tuple[ExportFormat, ...] = ("onnx", "onnx_dynamic", "openvino", "tensorrt")


class ExportSettings(_Section):
    formats: list[ExportFormat] = Field(default_factory=lambda: list(DEFAULT_EXPORT_FORMATS))
    fp16: bool = Field(False, description="also export an FP16 ONNX (and FP16 TensorRT engine)")
    int8: bool = Field(
        False, description="also INT8 exports: ONNX, and OpenVINO quantised with NNCF (calibrated on the val split)"
    )
    parity_images: int = Field(8, ge=1, description="test images whose raw outputs are compared across runtimes")
    latency: LatencySettings = LatencySettings()

    @model_validator(mode="after")
    def _no_duplicates(self) -> ExportSettings:
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("formats lists a format twice")
        return self


class TrackingSettings(_Section):
    experiment: str = Field("conveyor", min_length=1)


ServingFormat = Literal["onnx", "onnx_dynamic", "openvino", "openvino_int8", "tensorrt"]
DEFAULT_SERVING_FORMATS: tuple[ServingFormat, ...] = ("onnx_dynamic", "openvino")


class LatencyTarget(_Section):
    """The serving target's hardware and its budget: an absolute latency means something only there."""

    hardware: str = Field(
        ...,
        min_length=1,
        description="matched against the CPU model and GPU name where the export stage measured the latency, e.g."
        " 'EPYC 9R14' or 'L4'",
    )
    budget_ms: float = Field(..., gt=0, description="p95 per image, batch 1, on the serving runtime")


class GateSettings(_Section):
    """What a challenger must show before it may become the champion."""

    min_map50_95: float = Field(0.3, ge=0, le=1)
    min_map50: float = Field(0.6, ge=0, le=1)
    min_class_recall: float = Field(0.3, ge=0, le=1, description="every class, not the mean")
    regression_tolerance: float = Field(0.02, ge=0, le=1, description="challenger mAP50-95 >= champion - this")
    parity_max_delta: float = Field(0.01, ge=0, le=1, description="|ΔmAP50-95| of each served export vs PyTorch")
    features_max_rel_diff: float = Field(
        0.05, gt=0, description="the features output of each served export vs PyTorch: max |Δ| over max |value|"
    )
    serving_formats: list[ServingFormat] = Field(default_factory=lambda: list(DEFAULT_SERVING_FORMATS))
    serving_runtime: ServingFormat = Field(
        "openvino", description="the export the gate times against the champion's, and the profile's runtime"
    )
    latency_ratio: float = Field(
        1.10,
        ge=1,
        description="the median over back-to-back pairs of calls of challenger time / champion time, in the gate stage"
        " on this host",
    )
    latency_target: LatencyTarget | None = Field(
        None,
        description="an absolute budget, checked only where the export stage runs on the serving target's hardware",
    )

    @field_validator("serving_runtime")
    @classmethod
    def _a_runtime_the_gate_can_open(cls, value: str) -> str:
        # A TensorRT engine is built on the serving GPU (`conveyor serve --runtime tensorrt`), not where the gate and
        # the profile run; its parity is gated by listing it in serving_formats.
        if value == "tensorrt":
            raise ValueError(
                "tensorrt cannot be the runtime the gate times and the profile runs on (engines are built on the "
                "serving GPU): list it in gates.serving_formats to gate its parity, and serve it with "
                "`conveyor serve --runtime tensorrt`"
            )
        return value

    @model_validator(mode="after")
    def _the_served_export_is_gated(self) -> GateSettings:
        # Its parity unchecked, a model would be served from an export nobody compared with the model that was scored.
        if self.serving_runtime not in self.serving_formats:
            raise ValueError(
                f"serving_runtime {self.serving_runtime} is not in serving_formats {self.serving_formats}: the export "
                "the line is served on must have its parity gated; list it there"
            )
        return self


class RegistrySettings(_Section):
    model_name: str = Field("conveyor-defect-detector", min_length=1, max_length=100)

    @field_validator("model_name")
    @classmethod
    def _a_plain_name(cls, value: str) -> str:
        # Quoted into MLflow's search filters (`name = '...'`), `models:/NAME@alias` URIs, Triton's URL paths and
        # Prefect tags: MLflow took `acme's-detector`, and registration failed after the whole training.
        if not _MODEL_NAME.fullmatch(value):
            raise ValueError("letters, digits, '.', '_' and '-', starting with a letter or digit (e.g. line-7-defects)")
        return value


class OrchestrationSettings(_Section):
    """The Prefect deployment of the training flow."""

    deployment: str = Field("scheduled-training", min_length=1)
    work_pool: str = Field("conveyor", min_length=1)
    cron: str = Field("0 3 * * 1", description="when the scheduled training runs (default: Mondays 03:00)")
    timezone: str = Field("UTC", description="IANA time zone of both deployments' crons (e.g. Europe/Berlin)")
    on_overlap: Literal["wait", "reject"] = Field(
        "wait", description="a training run started while another runs: wait for it, or be rejected"
    )
    stage_retries: int = Field(1, ge=0, description="retries of a stage after a transient failure")
    push: bool = Field(True, description="push data and artifacts to the DVC remote after a run")
    worker_poll_seconds: float = Field(2.0, gt=0, description="how often `conveyor worker` asks for runs to start")
    heartbeat_seconds: int = Field(
        30,
        description="flow runs of `conveyor worker` send Prefect a heartbeat this often (Prefect's minimum 30; 0 off)",
    )
    crashed_after_seconds: int = Field(
        90, gt=0, description="`conveyor deploy`'s automation marks a flow run Crashed after this long without one"
    )

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}: an IANA name such as UTC or Europe/Berlin") from None
        return value

    @model_validator(mode="after")
    def _heartbeat_window(self) -> OrchestrationSettings:
        if self.heartbeat_seconds and self.heartbeat_seconds < 30:
            raise ValueError("heartbeat_seconds: Prefect sends heartbeats at most every 30 s (or 0 for none)")
        if self.heartbeat_seconds and self.crashed_after_seconds <= self.heartbeat_seconds:
            raise ValueError("crashed_after_seconds must be longer than heartbeat_seconds, or live runs are crashed")
        return self


ServeRuntime = Literal["openvino", "openvino_int8", "onnx", "tensorrt"]


class PredictionLogSettings(_Section):
    """What the server remembers of each image for drift checks: a small record, never the image."""

    enabled: bool = True
    directory: Path | None = Field(None, description="default: .conveyor/predictions in the project")
    queue_size: int = Field(10_000, ge=1, description="records waiting for the writer; past it they are dropped")
    flush_seconds: float = Field(5.0, gt=0, description="how often buffered records are written")
    keep_hours: int = Field(24 * 14, ge=1, description="hourly files older than this are deleted")
    keep_frames: float = Field(
        0.0, ge=0, le=1, description="share of served images also kept as files, for `conveyor label select`"
    )
    s3: str | None = Field(
        None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        description="s3://bucket/prefix: the server also ships each part file there (every replica into one place), "
        "and drift checks read their window from there; endpoint and credentials from the environment",
    )


class ServeSettings(_Section):
    """`conveyor serve`: the online server (Triton's protocol, batching and metrics through PyTriton)."""

    model: str | None = Field(None, description="models:/NAME@alias or a version; default the champion")
    runtime: ServeRuntime = Field(
        "openvino", description="openvino (fastest on CPU here) | openvino_int8 (export.int8) | onnx | tensorrt"
    )
    host: str = Field("127.0.0.1", description="interface to listen on; 0.0.0.0 exposes the server")
    port: int = Field(
        8080, ge=1, le=65535, strict=True, description="HTTP: /predict, /v2 (Open Inference Protocol), /metrics"
    )
    grpc_port: int = Field(
        8081, ge=1, le=65535, strict=True, description="gRPC: the Open Inference Protocol (tritonclient)"
    )
    workers: int = Field(1, ge=1, le=64, description="model instances, each with its share of the cores")
    max_batch_size: int = Field(8, ge=1, description="dynamic batching: the largest batch; 1 turns batching off")
    max_queue_delay_ms: float = Field(0.0, ge=0, description="dynamic batching: the longest wait for a fuller batch")
    max_queue_size: int = Field(64, ge=1, description="requests waiting; past it the answer is 503 + Retry-After")
    poll_seconds: float = Field(10.0, gt=0, description="how often the registry is asked whether the model moved")
    max_image_bytes: int = Field(20_000_000, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images are refused (decompression bombs)")
    max_images_per_request: int = Field(32, ge=1)
    conf: float = Field(0.25, gt=0, lt=1, description="minimum confidence of a returned detection")
    prediction_log: PredictionLogSettings = PredictionLogSettings()

    @model_validator(mode="after")
    def _two_ports(self) -> ServeSettings:
        if self.port == self.grpc_port:
            raise ValueError(f"port and grpc_port are both {self.port}: HTTP and gRPC need a port each")
        return self


class ColumnTest(_Section):
    """One feature's drift threshold where the default is wrong for it."""

    effect: float = Field(..., gt=0, description="the effect size (distance in reference standard deviations)")


class MonitorSettings(_Section):
    """`conveyor drift` and the monitoring flow: what counts as drift, and when drift may start a retraining."""

    window_hours: float = Field(
        24.0,
        gt=0,
        le=MAX_WINDOW_HOURS,
        description="the current window: prediction-log records of the last T h (ten years at most)",
    )
    window_records: int | None = Field(None, ge=1, description="or only the last N records of that window")
    max_window_records: int = Field(
        10_000,
        ge=100,
        description="a larger window is checked on a uniform sample of this many records, read part by part (a day "
        "at 20 requests/s is 1.7 million records, about 10 GB held whole)",
    )
    min_samples: int = Field(
        30, ge=2, description="fewer current (or reference) rows than this: 'insufficient data', never 'drift'"
    )
    effect_size: float = Field(
        1.0,
        gt=0,
        description="a feature drifted when its distribution moved at least this far (Wasserstein distance in "
        "reference standard deviations; for the prediction features together, their means' Mahalanobis distance) ...",
    )
    p_value: float = Field(
        0.001,
        gt=0,
        lt=1,
        description="... and the two-sample K-S test's p-value is below this (Hotelling's T² test's, for the embedding "
        "and the predictions together)",
    )
    constant_share: float = Field(
        0.1, gt=0, le=1, description="a feature constant in the reference drifted when this share of rows differ"
    )
    columns: dict[str, ColumnTest] = Field(default_factory=dict, description="per-feature effect size threshold")
    exclude: list[str] = Field(default_factory=list, description="features not tested")
    embeddings: bool = Field(True, description="the model's features output: logged by the server, tested")
    embedding_components: int = Field(10, ge=1, le=64, description="principal components of the reference kept")
    embedding_effect: float = Field(
        1.5, gt=0, description="embedding drifted when the mean moved this many reference standard deviations"
    )
    retrain_cost: float = Field(
        0.03,
        gt=0,  # at 0 any drift would retrain, and the estimate alone could never decide (it needs a threshold)
        le=1,
        description="drift starts a retraining when the estimated mAP50-95 cost reaches this; below it, an alert only",
    )
    retrain_after: int = Field(
        3,
        ge=1,
        description="... or when drift persisted over this many windows in a row that do not overlap, whatever the "
        "estimate says",
    )
    cooldown_hours: float = Field(
        6.0,
        ge=0,
        description="after a drift alert started a retraining, no retraining alert for this long (alert-only ones go "
        "out)",
    )
    dedupe_hours: float = Field(24.0, ge=0, description="one alert per model version and drifted features per this")
    schedule: str = Field("0 * * * *", description="cron of the monitoring deployment (default: hourly)")
    deployment: str = Field("drift-check", min_length=1)
    retrain_on_drift: bool = Field(True, description="`conveyor deploy` creates the drift -> retraining automation")
    experiment: str = Field("conveyor-monitoring", min_length=1, description="MLflow experiment of the checks")


class RejectSettings(_Section):
    """When the edge runner rejects a part: one decision per frame from the frame's detections."""

    classes: list[str] | None = Field(
        None, min_length=1, description="classes that reject a part; null: any class (an empty list is refused)"
    )
    min_confidence: float = Field(0.5, gt=0, le=1, description="a detection rejects from this confidence up")
    min_area: float = Field(0.0, ge=0, description="and from this box area up, in frame pixels")
    roi: tuple[float, float, float, float] = Field(
        (0.0, 0.0, 1.0, 1.0), description="region of interest x0, y0, x1, y1 as fractions; a box's centre counts"
    )

    @model_validator(mode="after")
    def _roi_inside_frame(self) -> RejectSettings:
        x0, y0, x1, y1 = self.roi
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"roi {list(self.roi)}: want 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return self


class EdgeLogSettings(_Section):
    """The runner's prediction log: the server's records for the frames it decides, read by `conveyor drift --device`
    and the monitoring flow."""

    enabled: bool = Field(True, description="write it (the runner then needs pyarrow)")
    directory: str = Field("edge-log", description="on the device; relative to the runner's working directory")
    s3: str | None = Field(
        None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        description="where its parts are shipped; default serve.prediction_log.s3 (where drift checks read)",
    )
    every: int = Field(1, ge=1, description="log one frame in N: a camera sees each part in several frames")
    flush_seconds: float = Field(5.0, gt=0, description="how often buffered records are written (and shipped)")
    keep_hours: int = Field(24 * 14, ge=1, description="hourly folders older than this are deleted on the device")
    queue_size: int = Field(10_000, ge=1, description="records waiting for the writer; past it they are dropped")


LINE_NAME = r"^[A-Za-z0-9_.-]+$"  # it names the line's MQTT topic and its files in the channel


class EdgeSettings(_Section):
    """The edge runner on the line (`conveyor bundle` writes it into the bundle's edge.json)."""

    line: str = Field("line-1", pattern=LINE_NAME, description="the line's name: MQTT topic, channel key")
    reject: RejectSettings = RejectSettings()
    queue: int = Field(10_000, ge=1, description="decisions kept while the MQTT broker is away; past it, dropped")
    channel: str | None = Field(None, description="folder or s3://bucket/prefix the runner takes new bundles from")
    poll_seconds: float = Field(10.0, gt=0, description="how often the runner looks at the channel")
    rollouts: str = Field(
        "edge-rollouts",
        min_length=1,
        description="on the device, relative to the runner's working directory: the bundle last taken from the "
        "channel, run again after a restart",
    )
    log: EdgeLogSettings = EdgeLogSettings()


class LabelSettings(_Section):
    """`conveyor label select`: which frames are worth a person's time."""

    count: int = Field(50, ge=1, description="frames selected per call")
    floor: float = Field(0.05, gt=0, lt=1, description="detections scored from this confidence up")
    uncertainty_weight: float = Field(1.0, ge=0, description="weight of 'the model is unsure' (near its threshold)")
    novelty_weight: float = Field(1.0, ge=0, description="weight of 'unlike the reference' (embedding distance)")
    pool_factor: int = Field(
        2, ge=1, description="the best count x this frames are clustered; one frame per cluster is taken"
    )
    reference_images: int = Field(200, ge=10, description="training images embedded when no profile is at hand")


class StackPorts(_Section):
    postgres: int = Field(5433, gt=0, lt=65536, strict=True)
    s3: int = Field(9000, gt=0, lt=65536, strict=True)
    mlflow: int = Field(5000, gt=0, lt=65536, strict=True)
    prefect: int = Field(
        4210, gt=0, lt=65536, strict=True, description="not 4200: that is the local server of `conveyor run`"
    )
    prometheus: int = Field(9090, gt=0, lt=65536, strict=True)

    @model_validator(mode="after")
    def _one_part_a_port(self) -> StackPorts:
        taken: dict[int, str] = {}
        for name, port in self.model_dump().items():
            if port in taken:  # the second part fails to bind, after the first started (and was left behind)
                raise ValueError(f"{taken[port]} and {name} are both on port {port}: give each part its own")
            taken[port] = name
        return self


class StackSettings(_Section):
    """`conveyor stack up | status | down`: the parts a team runs, as processes on this machine."""

    directory: str = Field(".conveyor/stack", description="data, logs and the env file (relative to the project)")
    bucket: str = Field(
        "conveyor",
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",  # S3's bucket names (as prediction_log.s3's)
        description="an S3 bucket name (lowercase, digits, '.', '-'): DVC data under dvc/, MLflow under mlflow/",
    )
    ports: StackPorts = StackPorts()
    serve: bool = Field(True, description="start the model server (it waits for a champion) and Prometheus")


class Settings(_Section):
    synth: SynthSettings = SynthSettings()
    data: DataSettings = DataSettings()
    validate_: ValidateSettings = Field(ValidateSettings(), alias="validate")
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    export: ExportSettings = ExportSettings()
    tracking: TrackingSettings = TrackingSettings()
    gates: GateSettings = GateSettings()
    registry: RegistrySettings = RegistrySettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()
    serve: ServeSettings = ServeSettings()
    monitor: MonitorSettings = MonitorSettings()
    label: LabelSettings = LabelSettings()
    edge: EdgeSettings = EdgeSettings()
    stack: StackSettings = StackSettings()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _stack_leaves_the_server_its_ports(self) -> Settings:
        if self.stack.serve:  # the stack's model server listens on serve.port and serve.grpc_port
            for name, port in self.stack.ports.model_dump().items():
                for key in ("port", "grpc_port"):
                    if port == getattr(self.serve, key):
                        raise ValueError(
                            f"stack.ports.{name} and serve.{key} are both {port}: the stack's model server listens "
                            "on serve.port and serve.grpc_port"
                        )
        return self

    def section_hash(self, *sections: str) -> str:
        """A short, stable hash of the named sections (all when none): tags runs with the exact params."""
        dumped = self.model_dump(mode="json", by_alias=True)
        chosen = {k: dumped[k] for k in (sections or tuple(dumped))}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at the place `loc` points into (for 'did you mean' hints)."""
    model: Any = Settings
    for part in loc:
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def described(exc: ValidationError, where: str) -> ConfigError:
    """A ConfigError listing every problem pydantic found, each with its key (and a 'did you mean' for a typo)."""
    problems = "\n".join(f"  - {_describe(dict(e))}" for e in exc.errors())
    return ConfigError(f"{where}: invalid settings\n{problems}")


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")  # our own checks' words need no prefix
    if not location:  # a check of the whole section (two of its keys together): its words say which
        return message
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), _known_keys(error["loc"][:-1]), n=1)
        return f"{location}: unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
    got = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
    return f"{location}: {message}{got}"


def set_param(path: Path, key: tuple[str, ...], value: Any) -> None:
    """Change one value in params.yaml, keeping its comments and layout. The new text is checked before it is
    written, and written whole (a temporary file, then a rename): a process reading params.yaml meanwhile (the
    monitoring flow, between devices) never sees it half-written, and a kill mid-write leaves the old one."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.error import YAMLError

    from conveyor.paths import write_atomically

    editor = YAML()
    editor.preserve_quotes = True
    try:
        document = editor.load(path.read_text(encoding="utf-8")) or CommentedMap()
    except YAMLError as exc:  # a key given twice among them: ruamel refuses it too
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    node = document
    for part in key[:-1]:
        if node.get(part) is None:  # a section left to its defaults (absent or empty) is written in
            node[part] = CommentedMap()
        node = node[part]
    node[key[-1]] = value
    text = io.StringIO()
    editor.dump(document, text)
    parse_settings(text.getvalue(), str(path))  # never write an invalid params.yaml
    write_atomically(path, text.getvalue())


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently (a second
    `train:` block replaced the first whole, its values falling back to defaults), and DVC refuses such a file."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found '{key}' twice (lines {seen[key].line + 1} and {key_node.start_mark.line + 1}): "
                    "the second would replace the first whole",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_settings(path: Path) -> Settings:
    """Read and check params.yaml. Raises ConfigError naming the file and every bad key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:  # unreadable, a folder
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return parse_settings(text, str(path))


def parse_settings(text: str, source: str) -> Settings:
    """Settings from params.yaml's text; `source` names it in errors."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if raw is None:  # emptied by mistake, or cut short: every stage would have run on defaults without a word
        raise ConfigError(
            f"{source}: empty (no settings at all): restore it (`git checkout -- params.yaml`), or write `{{}}` in it "
            "to run every stage on its defaults"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    shipped = os.environ.get(PREDICTION_LOG_S3_ENV)
    if shipped:  # over params.yaml's serve.prediction_log.s3
        try:
            PredictionLogSettings(s3=shipped)
        except ValidationError:
            raise ConfigError(f"{PREDICTION_LOG_S3_ENV}={shipped!r}: not an s3://bucket/prefix URL") from None
        serve = dict(raw.get("serve") or {})
        serve["prediction_log"] = {**(serve.get("prediction_log") or {}), "s3": shipped}
        raw = {**raw, "serve": serve}
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise described(exc, source) from None
