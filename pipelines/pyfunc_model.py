"""The registered model as an MLflow pyfunc: `mlflow.pyfunc.load_model("models:/NAME@champion").predict(images)`.

Input: a pandas DataFrame with an `image` column (file paths or encoded image bytes). Output: one row per detection
(image index, class id and name, confidence, box in pixels of the original image). Runs the ONNX export through
`pipelines.inference.Detector`, the server's code: the letterbox and non-maximum suppression the model was evaluated
with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel, PythonModelContext

DETECTION_COLUMNS = ["image_index", "class_id", "class_name", "confidence", "x0", "y0", "x1", "y1"]


def _decode(item: Any) -> np.ndarray:
    from pipelines.inference import decode_image

    if isinstance(item, np.ndarray):
        return item
    data = bytes(item) if isinstance(item, bytes | bytearray) else Path(str(item)).read_bytes()
    return decode_image(data)


class ConveyorDetector(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        import conveyor  # noqa: F401  (offline switches before Ultralytics)
        from pipelines.inference import Detector, ModelCard
        from pipelines.runtimes import OnnxRuntime

        self.card = ModelCard.load(Path(context.artifacts["metadata"]))
        self.detector = Detector(OnnxRuntime(Path(context.artifacts["onnx"])), self.card)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if "image" not in model_input.columns:
            raise ValueError("expected a DataFrame with an 'image' column of file paths or encoded image bytes")
        conf = float((params or {}).get("conf", self.card.conf))
        images = [_decode(item) for item in model_input["image"]]
        rows = []
        for index, found in enumerate(self.detector.detect(images, conf)):
            for d in found:
                rows.append([index, d.class_id, d.class_name, d.confidence, *d.box])
        return pd.DataFrame(rows, columns=DETECTION_COLUMNS)


# Models from code: MLflow logs this file and loads the model by running it (no pickled object).
set_model(ConveyorDetector())
