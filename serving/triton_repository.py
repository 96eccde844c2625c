"""A Triton model repository for a scaled-out deployment (Triton on Kubernetes): the same `ServedModel` that
`conveyor serve` binds through PyTriton, here in Triton's own Python backend.

`conveyor triton-repository MODEL_REF --out DIR` writes:

    DIR/NAME/config.pbtxt          backend python, dynamic batching, queue policy, instances, the tensors
    DIR/NAME/1/model.py            `TritonPythonModel` below, imported from Conveyor (installed in the image)
    DIR/NAME/1/conveyor-model/     the registry version (MLmodel, ONNX, OpenVINO, metadata)

and `tritonserver --model-repository DIR` serves it, with Conveyor installed in the server's Python. A new version
is rolled out as a new repository (a new pod), Triton's way, instead of the in-process swap of `conveyor serve`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.paths import replace_folder, staged_beside
from conveyor.settings import ServeSettings
from pipelines.inference import ImageLimits
from pipelines.model_source import ModelFiles

MODEL_PY = '''"""Conveyor's served model in Triton's Python backend (written by `conveyor triton-repository`)."""

from serving.triton_repository import TritonPythonModel  # noqa: F401
'''


def config_pbtxt(name: str, cfg: ServeSettings) -> str:
    """Triton's model configuration with the same batching and queue settings `conveyor serve` uses."""
    from serving.model import OUTPUTS

    delay = int(cfg.max_queue_delay_ms * 1000) if cfg.max_batch_size > 1 else 0
    return (
        "\n".join(
            [
                f'name: "{name}"',
                'backend: "python"',
                f"max_batch_size: {cfg.max_batch_size}",
                'input [{ name: "image", data_type: TYPE_STRING, dims: [ 1 ] }]',
                "output [",
                ",\n".join(
                    f'  {{ name: "{o.name}", data_type: {o.triton_type}, dims: [ {", ".join(map(str, o.shape))} ] }}'
                    for o in OUTPUTS
                ),
                "]",
                f"instance_group [{{ count: {cfg.workers}, kind: KIND_CPU }}]",
                "parameters ["
                + ", ".join(
                    f'{{ key: "{key}", value: {{ string_value: "{value}" }} }}'
                    for key, value in (
                        ("runtime", cfg.runtime),
                        ("conf", cfg.conf),
                        ("max_image_bytes", cfg.max_image_bytes),
                        ("max_image_pixels", cfg.max_image_pixels),
                    )
                )
                + "]",
                f"dynamic_batching {{ max_queue_delay_microseconds: {delay}, "
                f"default_queue_policy {{ max_queue_size: {cfg.max_queue_size} }} }}",
            ]
        )
        + "\n"
    )


@dataclass(frozen=True)
class ServedSettings:
    """What the model code reads back from its config.pbtxt's parameters: serve's when the repository was written."""

    runtime: str
    conf: float | None
    limits: ImageLimits

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> ServedSettings:
        """From Triton's model configuration as its Python backend hands it over (JSON)."""
        parameters = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
        defaults = ImageLimits()
        return cls(
            parameters.get("runtime") or "openvino",
            float(parameters["conf"]) if parameters.get("conf") else None,
            # A repository written before the limits were: ImageLimits' defaults, as it had.
            ImageLimits(
                int(parameters.get("max_image_bytes") or defaults.max_bytes),
                int(parameters.get("max_image_pixels") or defaults.max_pixels),
            ),
        )


def write(files: ModelFiles, out: Path, cfg: ServeSettings, *, overwrite: bool = False) -> Path:
    model_root = out / files.name
    if model_root.exists() and not overwrite:
        raise FileExistsError(f"{model_root} exists: pass --overwrite to replace it")
    # Written beside it, then put in its place: a copy that fails (a full disk) leaves the old repository whole.
    with staged_beside(model_root) as staging:
        (staging / "1").mkdir(parents=True)
        shutil.copytree(files.root, staging / "1" / "conveyor-model")
        (staging / "1" / "model.py").write_text(MODEL_PY)
        (staging / "config.pbtxt").write_text(config_pbtxt(files.name, cfg))
        (staging / "1" / "conveyor-model" / "version.json").write_text(
            json.dumps({"name": files.name, "version": files.version})
        )
    replace_folder(staging, model_root)
    return model_root


class TritonPythonModel:
    """Triton's Python backend interface around `ServedModel` (one instance per Triton model instance)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import conveyor  # noqa: F401  (offline switches)
        from pipelines import model_source as source
        from serving.metrics import ServingMetrics
        from serving.model import ServedModel
        from serving.swap import ModelSlot

        served = ServedSettings.from_model_config(json.loads(args["model_config"]))
        root = Path(args["model_repository"]) / args["model_version"] / "conveyor-model"
        identity = json.loads((root / "version.json").read_text())
        files = source.read_model_dir(root, identity["name"], identity["version"])
        slot = ModelSlot()
        slot.swap(source.load(files, served.runtime, workers=1, conf=served.conf))
        # Triton exports its own metrics; the prediction log belongs to the serving pod's volume (not here yet).
        self.served = ServedModel(slot, 0, ServingMetrics(), None, served.limits)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        tensors = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
            for outputs in self.served.execute_images(tensors)
        ]
