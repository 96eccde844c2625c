"""Config loading: the repository's params.yaml is valid, and every bad input is named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.scaffold import REPO
from conveyor.settings import ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_load() -> None:
    settings = load_settings(REPO / "params.yaml")
    assert settings.train.model.endswith(".yaml")
    assert settings.validate_.on_error == "fail"
    assert set(settings.synth.counts) == {"train", "val", "test"}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "params.yaml")


def test_unreadable_or_not_text(tmp_path: Path) -> None:
    """A params.yaml in another encoding, or a folder by that name: one line naming it (were tracebacks)."""
    latin = tmp_path / "latin" / "params.yaml"
    latin.parent.mkdir()
    latin.write_bytes("train:\n  epochs: 3  # \u00e9poques\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte \d+\)"):
        load_settings(latin)
    folder = tmp_path / "folder" / "params.yaml"
    folder.mkdir(parents=True)
    with pytest.raises(ConfigError, match="cannot read it: Is a directory"):
        load_settings(folder)


def test_a_domain_shift_must_be_a_finite_change(tmp_path: Path) -> None:
    for key in ("defect_scale", "brightness", "blur_sigma"):
        with pytest.raises(ConfigError, match=f"synth.shift.{key}: Input should be less than or equal to"):
            load_settings(write(tmp_path, f"synth:\n  shift:\n    {key}: .inf\n"))


def test_two_servers_on_one_port_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mlflow and prefect are both on port 5000"):
        load_settings(write(tmp_path, "stack:\n  ports:\n    prefect: 5000\n"))
    with pytest.raises(ConfigError, match="port and grpc_port are both 8080"):
        load_settings(write(tmp_path, "serve:\n  grpc_port: 8080\n"))
    with pytest.raises(ConfigError, match=r"  - stack.ports.s3 and serve.port are both 8080: the stack's model server"):
        load_settings(write(tmp_path, "stack:\n  ports:\n    s3: 8080\n"))


def test_a_port_is_a_number_not_a_yes(tmp_path: Path) -> None:
    """`s3: true` loaded as port 1 (a bool is an int to a lax check)."""
    with pytest.raises(ConfigError, match=r"stack\.ports\.s3: Input should be a valid integer"):
        load_settings(write(tmp_path, "stack:\n  ports:\n    s3: true\n"))
    with pytest.raises(ConfigError, match=r"serve\.port: Input should be a valid integer"):
        load_settings(write(tmp_path, "serve:\n  port: yes\n"))


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "train: [epochs: 3"))


def test_an_empty_params_yaml_is_refused_and_braces_mean_every_default(tmp_path: Path) -> None:
    """An emptied or cut-short params.yaml ran every stage on defaults without a word."""
    for text in ("", "\n", "# only a comment\n"):
        with pytest.raises(ConfigError, match=r"empty \(no settings at all\).*git checkout -- params.yaml"):
            load_settings(write(tmp_path, text))
    assert (
        load_settings(write(tmp_path, "{}\n")).train.epochs
        == load_settings(write(tmp_path, "train: {}\n")).train.epochs
    )


def test_set_param_never_shows_a_reader_a_half_written_file(tmp_path: Path) -> None:
    """The monitoring flow reads params.yaml between devices while a drift retraining writes train.weights: the file
    was truncated, then dumped, and a reader in between read an empty file (every default). Written whole now; an
    invalid value leaves the file as it was."""
    import threading

    from conveyor.settings import set_param

    path = write(tmp_path, (REPO / "params.yaml").read_text())
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.append(str(load_settings(path).train.epochs))
            except ConfigError as exc:
                seen.append(f"error: {str(exc)[:100]}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for epochs in range(1, 31):
            set_param(path, ("train", "epochs"), epochs)
    finally:
        done.set()
        reader.join()
    assert seen and not [s for s in seen if s.startswith("error")], sorted(set(seen))[:5]
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        set_param(path, ("train", "epochs"), "many")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_section_or_key_given_twice_is_refused(tmp_path: Path) -> None:
    """A second `train:` block replaced the first whole (PyYAML keeps the last), its values falling back to defaults
    without a word; DVC refuses such a file. Refused here naming both lines, by set_param too."""
    from conveyor.settings import set_param

    twice = write(tmp_path, "train:\n  epochs: 3\n  batch: 4\nserve:\n  port: 8080\ntrain:\n  imgsz: 160\n")
    with pytest.raises(ConfigError, match=r"found 'train' twice \(lines 1 and 6\)"):
        load_settings(twice)
    with pytest.raises(ConfigError, match="not valid YAML"):
        set_param(twice, ("train", "epochs"), 5)
    with pytest.raises(ConfigError, match=r"found 'epochs' twice \(lines 2 and 3\)"):
        load_settings(write(tmp_path, "train:\n  epochs: 3\n  epochs: 4\n"))


def test_a_stack_bucket_is_a_bucket_name(tmp_path: Path) -> None:
    """`team/conveyor` or `my bucket` passed, and `conveyor stack up` failed with botocore's traceback after
    PostgreSQL and the store had started."""
    for name in ("team/conveyor", "my bucket", "Conveyor_Data", "ab"):
        with pytest.raises(ConfigError, match=r"stack\.bucket"):
            load_settings(write(tmp_path, f"stack:\n  bucket: '{name}'\n"))
    assert load_settings(write(tmp_path, "stack:\n  bucket: team-conveyor.data\n")).stack.bucket == "team-conveyor.data"


def test_tensorrt_is_gated_for_parity_but_is_not_the_gates_runtime(tmp_path: Path) -> None:
    """`gates.serving_runtime: tensorrt` was accepted, then the profile and the gate opened the engine with ONNX
    Runtime (a protobuf traceback on a GPU host); an engine is built on the serving GPU, not where they run."""
    with pytest.raises(ConfigError, match=r"gates\.serving_runtime.*list it in gates\.serving_formats"):
        load_settings(write(tmp_path, "gates:\n  serving_runtime: tensorrt\n"))
    gates = load_settings(write(tmp_path, "gates:\n  serving_formats: [openvino, tensorrt]\n")).gates
    assert gates.serving_formats == ["openvino", "tensorrt"] and gates.serving_runtime == "openvino"


def test_the_served_export_must_be_gated_for_parity(tmp_path: Path) -> None:
    """`serving_formats: [onnx_dynamic]` with `serving_runtime: openvino` (or `serving_formats: []`) was accepted: a
    first model without an OpenVINO export then passed every gate, and was served on an export nobody checked."""
    for formats in ("[onnx_dynamic]", "[]"):
        with pytest.raises(ConfigError, match=r"serving_runtime openvino is not in serving_formats"):
            load_settings(write(tmp_path, f"gates:\n  serving_formats: {formats}\n"))
    gates = load_settings(write(tmp_path, "gates:\n  serving_formats: [onnx]\n  serving_runtime: onnx\n")).gates
    assert gates.serving_formats == ["onnx"]


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_settings(write(tmp_path, "- 1\n- 2\n"))


def test_bad_value_names_the_key_and_the_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, "train:\n  epochs: -3\n"))
    message = str(excinfo.value)
    assert "params.yaml" in message
    assert "train.epochs" in message and "-3" in message


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, "train:\n  epoch: 3\n"))
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in str(excinfo.value)


def test_unknown_nested_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"export\.latency\.run: unknown key \(did you mean 'runs'\?\)"):
        load_settings(write(tmp_path, "export:\n  latency:\n    run: 5\n"))


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_settings(write(tmp_path, "trian:\n  epochs: 3\n"))


def test_wrong_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"validate\.on_error"):
        load_settings(write(tmp_path, "validate:\n  on_error: ignore\n"))


def test_every_error_is_listed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, "train:\n  epochs: 0\n  batch: 0\nexport:\n  formats: [onnx, onnx]\n"))
    message = str(excinfo.value)
    assert "train.epochs" in message and "train.batch" in message and "formats lists a format twice" in message


def test_synth_counts_need_every_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing \['test'\]"):
        load_settings(write(tmp_path, "synth:\n  counts: {train: 4, val: 2}\n"))


def test_section_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    a = load_settings(write(tmp_path, "train:\n  epochs: 3\n"))
    b = load_settings(write(tmp_path, "train:\n  epochs: 3\n"))
    c = load_settings(write(tmp_path, "train:\n  epochs: 4\n"))
    assert a.section_hash() == b.section_hash() != c.section_hash()
    assert a.section_hash("validate") == c.section_hash("validate")


def test_extra_may_not_repeat_a_train_setting(tmp_path: Path) -> None:
    # Ultralytics would fail much later ("got multiple values for keyword argument"), mid-pipeline.
    with pytest.raises(ConfigError, match=r"train\.extra repeats nbs"):
        load_settings(write(tmp_path, "train:\n  extra: {nbs: 16, lr0: 0.01}\n"))


def test_finetune_extra_may_not_repeat_a_train_setting_either(tmp_path: Path) -> None:
    # Passed beside the same arguments when train.weights is set: a drift retraining would fail mid-flow.
    with pytest.raises(ConfigError, match=r"train\.finetune\.extra repeats epochs, imgsz: set it as train\.finetune"):
        load_settings(write(tmp_path, "train:\n  finetune:\n    extra: {imgsz: 640, epochs: 5}\n"))


def test_an_unknown_time_zone_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"orchestration\.timezone: .*unknown time zone 'Mars/Olympus'"):
        load_settings(write(tmp_path, "orchestration:\n  timezone: Mars/Olympus\n"))
    assert load_settings(write(tmp_path, "orchestration:\n  timezone: Europe/Berlin\n"))


def test_a_bad_cron_is_refused_before_anything_is_deployed() -> None:
    from flows.deploy import cron_of

    with pytest.raises(ConfigError, match=r"params\.yaml: monitor\.schedule: 'every monday' is not a cron"):
        cron_of("monitor.schedule", "every monday", "UTC")
    assert cron_of("orchestration.cron", "0 3 * * 1", "UTC").cron == "0 3 * * 1"


def test_set_param_writes_a_section_left_to_its_defaults(tmp_path: Path) -> None:
    """--warm-start writes train.weights: a params.yaml without a train section is valid, and gets one."""
    from conveyor.settings import set_param

    path = write(tmp_path, "# the line's settings\nvalidate:\n  on_error: skip\n")
    set_param(path, ("train", "weights"), "champion.pt")
    settings = load_settings(path)
    assert str(settings.train.weights) == "champion.pt" and settings.validate_.on_error == "skip"
    assert path.read_text().startswith("# the line's settings")


def test_where_the_log_is_shipped_may_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint, as the DVC remote is: a cluster sets it once for its server pods and its drift check's pods."""
    from conveyor.settings import PREDICTION_LOG_S3_ENV

    path = write(tmp_path, "serve:\n  prediction_log:\n    keep_hours: 24\n")
    assert load_settings(path).serve.prediction_log.s3 is None
    monkeypatch.setenv(PREDICTION_LOG_S3_ENV, "s3://conveyor/predictions")
    log = load_settings(path).serve.prediction_log
    assert log.s3 == "s3://conveyor/predictions" and log.keep_hours == 24  # the rest of the section as written
    assert load_settings(write(tmp_path, "{}\n")).serve.prediction_log.s3 == "s3://conveyor/predictions"
    monkeypatch.setenv(PREDICTION_LOG_S3_ENV, "http://minio:9000/predictions")
    with pytest.raises(ConfigError, match=r"CONVEYOR_PREDICTION_LOG_S3='http://minio:9000/predictions': not an s3://"):
        load_settings(path)


def test_a_model_name_is_a_plain_name(tmp_path: Path) -> None:
    """MLflow registered `acme's-detector`, and registration failed after the whole training: the name is quoted into
    its search filters (and `models:/NAME@alias` URIs, Triton's URLs, Prefect tags)."""
    for name in ("acme's-detector", "line@7", "two words", "-leading", "x" * 101):
        with pytest.raises(ConfigError, match=r"registry\.model_name"):
            load_settings(write(tmp_path, f'registry:\n  model_name: "{name}"\n'))
    assert load_settings(write(tmp_path, "registry:\n  model_name: line-7.defects_v2\n")).registry.model_name
