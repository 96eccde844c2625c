"""Conveyor: an end-to-end MLOps pipeline for YOLO object detection."""

from conveyor import offline as _offline

# Before anything imports Ultralytics, OpenVINO or MLflow: they read these switches at import time.
_offline.configure()

__version__ = "0.1.0"
