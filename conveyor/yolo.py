"""Ultralytics, imported one way: offline settings applied, threads set to the cores we have, a device resolved."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from conveyor.paths import available_cores

if TYPE_CHECKING:
    from ultralytics import YOLO


def load_yolo(model: str) -> YOLO:
    """A YOLO model from a model YAML (trained from scratch) or a local checkpoint; never downloads."""
    from pathlib import Path

    from conveyor.offline import apply_ultralytics_settings

    if Path(model).suffix not in {".yaml", ".yml"} and not Path(model).exists():
        # Ultralytics would try to download a name it does not find (yolo11n.pt from GitHub): refused here instead.
        # (A folder is an exported model, an OpenVINO export's `*_openvino_model/`.)
        raise FileNotFoundError(
            f"model {model} is neither a model YAML (e.g. yolo11n.yaml, trained from scratch) nor a local checkpoint: "
            "Conveyor never downloads weights; set train.model to a YAML, or train.weights to a local .pt"
        )

    apply_ultralytics_settings()
    import ultralytics.utils.torch_utils as torch_utils
    from ultralytics import YOLO

    # Ultralytics trains on cores-1 threads (1 of 2 here); measured: 2 threads train a 3-epoch run in 54 s vs 83 s.
    torch_utils.NUM_THREADS = available_cores()
    return YOLO(model, task="detect")


def use_channels_last(trainer: Any) -> None:
    """Ultralytics callback (`on_pretrain_routine_end`): the model and its EMA in channels-last memory format.

    oneDNN's convolutions run on NHWC tensors without the reorders NCHW costs them, and CUDA's tensor cores prefer
    NHWC too. The parameters are converted in place, so the optimizer already built over them keeps its references.
    """
    import torch

    trainer.model.to(memory_format=torch.channels_last)
    if getattr(trainer, "ema", None) is not None:
        trainer.ema.ema.to(memory_format=torch.channels_last)


def resolve_device(device: str) -> str:
    """'auto' means the first CUDA GPU when there is one, else the CPU. A CUDA index this machine does not have is a
    ConfigError, before a run opens: it was Ultralytics' ValueError traceback, after "on CUDA:0" was printed and a
    FAILED MLflow run was left."""
    import torch

    if device == "auto":
        return "0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    from conveyor.settings import ConfigError

    indices = [part.strip() for part in device.removeprefix("cuda:").split(",")]
    if not all(part.isdigit() for part in indices):
        raise ConfigError(f"train.device {device!r}: 'auto', 'cpu', or CUDA indices like '0' or '0,1'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [part for part in indices if int(part) >= count]
    if missing:
        has = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise ConfigError(f"train.device {device!r}: this machine has {has}; use 'auto' or 'cpu'")
    return device
