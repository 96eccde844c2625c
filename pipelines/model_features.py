"""The model's own view of an image, as a second output of the exported model: `features`.

What the detection head sees: the feature maps its inputs come from (the neck's P3, P4 and P5 for YOLO11), each
averaged over its spatial positions and concatenated (448 values for yolo11n). Drift checks compare these between
traffic and the version's training images. Being an output of the served model, they cost one reduction per map on
top of the inference the server runs anyway, and they are taken at the serving resolution, where blur, noise and
compression still show (a backbone on a small thumbnail did not see them: ROC AUC 0.50 on heavy blur).

The output is added to the files Ultralytics exports (ONNX and OpenVINO, INT8 included) by finding each head input's
tensor in the graph: layer i of the PyTorch model is the scope `/model.i/` in ONNX node names and `__module.model.i`
in OpenVINO's. The export stage checks the added output against PyTorch (`pooled` below) on the parity images, so a
graph this lookup misreads fails the export instead of serving wrong features.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.errors import ConveyorError

FEATURES_OUTPUT = "features"
_ONNX_SCOPE = re.compile(r"^/model\.(\d+)/")
_OPENVINO_SCOPE = re.compile(r"__module\.model\.(\d+)(?:[./]|$)")
_ACTIVATIONS = {"Swish", "Sigmoid", "Relu", "HSwish", "HSigmoid", "Gelu", "Mish", "Elu", "PRelu", "Clamp"}


class FeatureOutputError(ConveyorError, RuntimeError):
    """The exported graph does not show the head's inputs where expected; the message names the layer."""


def head_inputs(model: Any) -> list[int]:
    """Indices of the layers whose outputs feed the detection head (the last module), e.g. [16, 19, 22]."""
    head = model.model[-1]
    sources = head.f if isinstance(head.f, list | tuple) else [head.f]
    return [int(i) if i >= 0 else len(model.model) - 1 + int(i) for i in sources]


def pooled(outputs: Sequence[Any]) -> np.ndarray:
    """The features from PyTorch feature maps [n, c, h, w]: the reference the exports are checked against."""
    return np.concatenate([np.asarray(o.float().mean(dim=(2, 3)).numpy()) for o in outputs], axis=1)


def _layer_tensors(
    producers: dict[str, int], consumers: dict[str, list[int]], outputs: set[str], layers: Sequence[int]
) -> list[str]:
    """For each layer, the one tensor its ops produce that ops of another layer (or the graph) consume."""
    found = []
    for layer in layers:
        leaving = [
            tensor
            for tensor, scope in producers.items()
            if scope == layer and (tensor in outputs or any(c != layer for c in consumers.get(tensor, [])))
        ]
        if len(leaving) != 1:
            raise FeatureOutputError(
                f"layer {layer}: expected one output tensor leaving its scope in the exported graph, found "
                f"{len(leaving)} ({', '.join(leaving[:4])})"
            )
        found.append(leaving[0])
    return found


def add_to_onnx(path: Path, layers: Sequence[int]) -> None:
    """Add the `features` output ([batch, channels], float32) to an ONNX model file, in place."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    if any(o.name == FEATURES_OUTPUT for o in graph.output):
        return
    producers: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    for node in graph.node:
        scope = _ONNX_SCOPE.match(node.name)
        layer = int(scope.group(1)) if scope else -1
        for tensor in node.output:
            producers[tensor] = layer
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(layer)
    tensors = _layer_tensors(producers, consumers, {o.name for o in graph.output}, layers)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    pooled_names = []
    for layer, tensor in zip(layers, tensors, strict=True):
        name = f"/conveyor/features/pool{layer}"
        if opset >= 18:  # axes became an input of ReduceMean in opset 18
            axes = f"{name}/axes"
            graph.initializer.append(helper.make_tensor(axes, TensorProto.INT64, [2], [2, 3]))
            graph.node.append(helper.make_node("ReduceMean", [tensor, axes], [name], name=name, keepdims=0))
        else:
            graph.node.append(helper.make_node("ReduceMean", [tensor], [name], name=name, axes=[2, 3], keepdims=0))
        pooled_names.append(name)
    joined = "/conveyor/features/concat"
    graph.node.append(helper.make_node("Concat", pooled_names, [joined], name=joined, axis=1))
    # float32 whatever the graph computes in (an FP16 export keeps float32 inputs and outputs)
    graph.node.append(
        helper.make_node("Cast", [joined], [FEATURES_OUTPUT], name="/conveyor/features/cast", to=TensorProto.FLOAT)
    )
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    batch_dim: str | int = batch.dim_param or batch.dim_value or 1
    graph.output.append(helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT, [batch_dim, None]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def add_to_openvino(model_dir: Path, layers: Sequence[int]) -> None:
    """Add the `features` output to the OpenVINO IR in `model_dir` (its .xml and .bin), in place."""
    import openvino as ov
    import openvino.opset13 as ops

    xml = next(model_dir.glob("*.xml"))
    core = ov.Core()
    model = core.read_model(xml)
    if any(FEATURES_OUTPUT in output.get_names() for output in model.outputs):
        return
    producers: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    ports: dict[str, Any] = {}
    scopes: dict[str, int] = {}  # friendly name -> layer, in topological order
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Constant", "Parameter", "Result"):
            continue
        if op.get_type_name() in _ACTIVATIONS and op.get_input_size():
            # Ultralytics shares one activation module between layers, so its ops carry the first user's name:
            # an activation belongs to the layer of what it activates.
            layer = scopes.get(op.input(0).get_source_output().get_node().get_friendly_name(), -1)
        else:
            scope = _OPENVINO_SCOPE.search(op.get_friendly_name())
            layer = int(scope.group(1)) if scope else -1
        scopes[op.get_friendly_name()] = layer
        for index, port in enumerate(op.outputs()):
            key = f"{op.get_friendly_name()}:{index}"
            producers[key] = layer
            ports[key] = port
    for key, port in ports.items():
        for target in port.get_target_inputs():
            consumers.setdefault(key, []).append(scopes.get(target.get_node().get_friendly_name(), -1))
    tensors = _layer_tensors(producers, consumers, set(), layers)
    axes = ops.constant(np.array([2, 3], dtype=np.int64))
    means = [ops.reduce_mean(ports[key], axes, keep_dims=False) for key in tensors]
    joined = ops.concat(means, axis=1)
    result = ops.result(joined)
    result.output(0).get_tensor().set_names({FEATURES_OUTPUT})
    model.add_results([result])
    temporary = xml.with_name(xml.stem + ".features.xml")
    ov.save_model(model, temporary, compress_to_fp16=False)
    # The weights are unchanged; the new graph is written beside the old one and then takes its place.
    temporary.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    temporary.replace(xml)
