"""Prometheus metrics of the server, in a registry of their own (prometheus_client does the exposition).

Triton's own `nv_inference_*` series (request counts, queue and compute time, executions) are appended to the same
`/metrics` page, so one scrape target shows both: what Triton saw and what the model found.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "conveyor_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "conveyor_request_seconds",
            "HTTP request latency, end to end",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "conveyor_queue_seconds",
            "Time from the request leaving the API to its batch starting (transport + Triton's batching queue)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "conveyor_inference_seconds",
            "Time of one batch: decode, letterbox, runtime, NMS",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "conveyor_batch_size", "Images per executed batch", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r
        )
        self.detections_per_image = Histogram(
            "conveyor_detections_per_image", "Detections per image", buckets=(0, 1, 2, 3, 5, 8, 13, 21, 50), registry=r
        )
        self.confidence = Histogram(
            "conveyor_detection_confidence",
            "Confidence of returned detections",
            buckets=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
            registry=r,
        )
        self.detections = Counter("conveyor_detections", "Detections by class", ["class_name"], registry=r)
        self.images = Counter("conveyor_images", "Images predicted, by outcome", ["outcome"], registry=r)
        self.model_info = Info("conveyor_model", "The model being served", registry=r)
        self.model_loads = Counter("conveyor_model_loads", "Model loads by outcome", ["outcome"], registry=r)
        self.model_load_failures = Counter(
            "conveyor_model_load_failures", "Versions that failed to load (the previous one kept serving)", registry=r
        )
        self.model_ready = Gauge("conveyor_model_ready", "1 when a model is loaded and serving", registry=r)
        self.log_dropped = Counter(
            "conveyor_prediction_log_dropped",
            "Prediction-log records dropped (the writer could not keep up)",
            registry=r,
        )
        self.log_written = Counter("conveyor_prediction_log_written", "Prediction-log records written", registry=r)
