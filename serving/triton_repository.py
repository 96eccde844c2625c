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
from pathlib import Path
from typing import Any

from conveyor.settings import ServeSettings
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
                f'parameters [{{ key: "runtime", value: {{ string_value: "{cfg.runtime}" }} }}, '
                f'{{ key: "conf", value: {{ string_value: "{cfg.conf}" }} }}]',
                f"dynamic_batching {{ max_queue_delay_microseconds: {delay}, "
                f"default_queue_policy {{ max_queue_size: {cfg.max_queue_size} }} }}",
            ]
        )
        + "\n"
    )


def write(files: ModelFiles, out: Path, cfg: ServeSettings, *, overwrite: bool = False) -> Path:
    model_root = out / files.name
    if model_root.exists() and not overwrite:
        raise FileExistsError(f"{model_root} exists: pass --overwrite to replace it")
    shutil.rmtree(model_root, ignore_errors=True)
    (model_root / "1").mkdir(parents=True)
    shutil.copytree(files.root, model_root / "1" / "conveyor-model")
    (model_root / "1" / "model.py").write_text(MODEL_PY)
    (model_root / "config.pbtxt").write_text(config_pbtxt(files.name, cfg))
    (model_root / "1" / "conveyor-model" / "version.json").write_text(
        json.dumps({"name": files.name, "version": files.version})
    )
    return model_root


class TritonPythonModel:
    """Triton's Python backend interface around `ServedModel` (one instance per Triton model instance)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import conveyor  # noqa: F401  (offline switches)
        from pipelines import model_source as source
        from pipelines.inference import ImageLimits
        from serving.metrics import ServingMetrics
        from serving.model import ServedModel
        from serving.swap import ModelSlot

        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        runtime = parameters.get("runtime", {}).get("string_value", "openvino")
        conf = parameters.get("conf", {}).get("string_value")  # serve.conf when the repository was written
        root = Path(args["model_repository"]) / args["model_version"] / "conveyor-model"
        identity = json.loads((root / "version.json").read_text())
        files = source.read_model_dir(root, identity["name"], identity["version"])
        slot = ModelSlot()
        slot.swap(source.load(files, runtime, workers=1, conf=float(conf) if conf else None))
        # Triton exports its own metrics; the prediction log belongs to the serving pod's volume (not here yet).
        self.served = ServedModel(slot, 0, ServingMetrics(), None, ImageLimits())

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        tensors = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
            for outputs in self.served.execute_images(tensors)
        ]
