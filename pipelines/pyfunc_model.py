"""The registered model as an MLflow pyfunc: `mlflow.pyfunc.load_model("models:/NAME@champion").predict(images)`.

Input: a pandas DataFrame with an `image` column (file paths or encoded image bytes). Output: one row per detection
(image index, class id and name, confidence, box in pixels of the original image). Runs the ONNX export with the
preprocessing (letterbox to the trained size) and non-maximum suppression the model was evaluated with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel, PythonModelContext

DETECTION_COLUMNS = ["image_index", "class_id", "class_name", "confidence", "x0", "y0", "x1", "y1"]


def _decode(item: Any) -> np.ndarray:
    import cv2

    if isinstance(item, np.ndarray):
        return item
    if isinstance(item, bytes | bytearray):
        image = cv2.imdecode(np.frombuffer(item, np.uint8), cv2.IMREAD_COLOR)
    else:
        image = cv2.imread(str(item))
    if image is None:
        raise ValueError(f"cannot decode image {str(item)[:80]!r}")
    return np.asarray(image)


class ConveyorDetector(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        import conveyor  # noqa: F401  (offline switches before Ultralytics)
        from conveyor.yolo import load_yolo

        self.metadata = json.loads(Path(context.artifacts["metadata"]).read_text())
        self.model = load_yolo(context.artifacts["onnx"])

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if "image" not in model_input.columns:
            raise ValueError("expected a DataFrame with an 'image' column of file paths or encoded image bytes")
        items = list(model_input["image"])
        conf = float((params or {}).get("conf", self.metadata.get("conf", 0.25)))
        rows = []
        for index, item in enumerate(items):
            result: Any = self.model.predict(_decode(item), imgsz=self.metadata["imgsz"], conf=conf, verbose=False)
            boxes = result[0].boxes
            for cls, score, xyxy in zip(boxes.cls.tolist(), boxes.conf.tolist(), boxes.xyxy.tolist(), strict=True):
                rows.append([index, int(cls), self.metadata["names"][int(cls)], float(score), *map(float, xyxy)])
        return pd.DataFrame(rows, columns=DETECTION_COLUMNS)


# Models from code: MLflow logs this file and loads the model by running it (no pickled object).
set_model(ConveyorDetector())
