"""conveyor.yolo: the channels-last training callback, on a real YOLO model and Ultralytics' own EMA and optimizer."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.torch_utils import ModelEMA

from conveyor.yolo import use_channels_last


def _convolutions(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    # 1x1 and depthwise kernels have the same strides in both layouts; the rest tell them apart
    return [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]


def test_channels_last_converts_model_and_ema_in_place() -> None:
    model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    ema = ModelEMA(model)  # built before the callback runs, as in Ultralytics' trainer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert not any(p.is_contiguous(memory_format=torch.channels_last) for p in _convolutions(model))

    use_channels_last(SimpleNamespace(model=model, ema=ema))

    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _convolutions(model))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _convolutions(ema.ema))
    # the optimizer built before the conversion still steps the model's own parameters
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.parameters()}
    model.train()
    before = _convolutions(model)[0].detach().clone()
    out = model(torch.rand(2, 3, 64, 64))
    outputs = [o for o in (out.values() if isinstance(out, dict) else out) if torch.is_tensor(o)]
    torch.stack([o.float().mean() for o in outputs]).sum().backward()
    optimizer.step()
    assert not torch.equal(before, _convolutions(model)[0])
    ema.update(model)  # Ultralytics' EMA update across the converted tensors
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _convolutions(ema.ema))


def test_channels_last_without_ema() -> None:
    model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    use_channels_last(SimpleNamespace(model=model, ema=None))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _convolutions(model))


def test_the_time_estimate_calibrates_here_and_scales_with_the_work() -> None:
    """The first run says how long it will take before training starts: a few timed passes on this machine,
    from a model YAML or a checkpoint (which loads frozen)."""
    from conveyor.settings import TrainSettings
    from pipelines.train import estimate_training
    from tests.serving_support import CHECKPOINT

    cfg = TrainSettings(imgsz=64, batch=2)
    short = estimate_training("yolo11n.yaml", cfg, epochs=5, train_images=10, val_images=4, steps=1)
    assert short.steps_per_epoch == 5 and short.step_s > 0 and short.validation_s > 0
    assert short.seconds == short.epoch_s * 5
    assert "the whole run about" in short.describe()
    warm = estimate_training(str(CHECKPOINT), cfg, epochs=10, train_images=10, val_images=4, steps=1)
    assert warm.epochs == 10 and warm.step_s > 0


def test_a_long_run_is_timed_over_more_passes_and_a_short_one_by_its_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing more passes costs seconds that only a long run is worth: a run short even at the first (slowest) pass's
    pace is estimated from that pass."""
    import torch

    from conveyor.settings import TrainSettings
    from pipelines import train

    cfg = TrainSettings(imgsz=64, batch=2)
    passes: list[int] = []
    backward = torch.Tensor.backward

    def counted(tensor: torch.Tensor, *args: object, **kwargs: object) -> None:
        passes.append(1)
        backward(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", counted)
    train.estimate_training("yolo11n.yaml", cfg, epochs=2, train_images=4, val_images=2, steps=3)
    assert len(passes) == 1
    passes.clear()
    monkeypatch.setattr(train, "SHORT_RUN_S", 0.0)
    train.estimate_training("yolo11n.yaml", cfg, epochs=2, train_images=4, val_images=2, steps=3)
    assert len(passes) == 4


def test_a_model_that_is_neither_a_yaml_nor_a_local_file_is_refused_without_a_download(tmp_path: Path) -> None:
    """Ultralytics would fetch yolo11n.pt from GitHub (offline here: a ConnectionError traceback after the MLflow run
    was opened); Conveyor never downloads weights."""
    from conveyor.yolo import load_yolo

    with pytest.raises(FileNotFoundError, match=r"model yolo11n\.pt is neither a model YAML .* never downloads"):
        load_yolo("yolo11n.pt")
    with pytest.raises(FileNotFoundError, match="neither a model YAML"):
        load_yolo(str(tmp_path / "gone.pt"))


def test_a_cuda_device_this_machine_lacks_is_named_before_a_run_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    """`train.device: "0"` on a CPU-only machine was Ultralytics' ValueError traceback, after "on CUDA:0" was
    printed and a FAILED MLflow run was left; `gpu0` passed the settings. torch's CUDA query is stood in for, so the
    test reads the same on a machine with GPUs."""
    import torch

    from conveyor.settings import ConfigError
    from conveyor.yolo import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"train.device '0': this machine has no CUDA device"):
        resolve_device("0")
    with pytest.raises(ConfigError, match=r"'auto', 'cpu', or CUDA indices"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "0" and resolve_device("0,1") == "0,1"
    with pytest.raises(ConfigError, match=r"this machine has 2 CUDA device\(s\)"):
        resolve_device("2")


def test_training_arguments_ultralytics_refuses_are_named_before_a_run_opens() -> None:
    """`train.extra: {lr0s: 0.003}` (a misspelt key), `{lr0: abc}` and `{optimizer: AdamW2}` passed the settings and
    failed inside `model.train`: a traceback, a FAILED MLflow run, and the flow tried the stage again (the optimizer
    after the first batch). Checked as Ultralytics checks them, named as the setting they came from."""
    from conveyor.settings import ConfigError
    from pipelines.train import check_extra

    for extra, said in (
        ({"lr0s": 0.003}, "'lr0s' is not a valid YOLO argument"),
        ({"lr0": "abc"}, "'lr0=abc' is of invalid type str"),
        ({"optimizer": "AdamW2"}, "optimizer 'AdamW2' is not one of"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"train.extra (or train.finetune.extra): {said}")):
            check_extra(extra)
    check_extra({"optimizer": "sgd", "lr0": 0.0001, "warmup_epochs": 0, "mosaic": 0.0})  # the flow tests' own


def test_what_a_training_wrote_is_told_from_what_an_earlier_one_left(tmp_path: Path) -> None:
    """`conveyor train` by hand trains into a folder DVC has not emptied: an earlier training's plots and checkpoints
    were logged into the new run as its own, and an earlier best.pt would have been taken as this training's. A file
    written again is told by its size, inode or modification time (the same bytes rewritten included), not by the
    clock, which NTP may step during a training."""
    from pipelines.train import _files_of

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "epoch5.pt").write_bytes(b"an earlier training's checkpoint")
    (tmp_path / "confusion_matrix.png").write_bytes(b"an earlier training's plot")
    best = weights / "best.pt"
    best.write_bytes(b"weights")
    earlier = _files_of(tmp_path)
    time.sleep(0.01)
    best.write_bytes(b"weights")  # the same bytes, written again
    (tmp_path / "results.csv").write_text("epoch\n1\n")
    written = {path for path, signature in _files_of(tmp_path).items() if earlier.get(path) != signature}
    assert written == {best, tmp_path / "results.csv"}
