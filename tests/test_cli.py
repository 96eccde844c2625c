"""The CLI: commands exist, and expected failures end with a clear message and exit code 1, not a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conveyor.cli import app

runner = CliRunner()


def _commands(*group: str) -> set[str]:
    """The names registered under `conveyor GROUP...` (a name in some command's description is not a command)."""
    import typer.main

    command: Any = typer.main.get_command(app)  # a click Group (Typer's own copy of click)
    for name in group:
        command = command.commands[name]
    return set(command.commands)


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    registered = _commands()
    for command in (
        "data",
        "validate",
        "train",
        "evaluate",
        "export",
        "run",
        "ui",
        "summary",
        "label",
        "status",
        "server",
    ):
        assert command in registered and command in result.stdout


def test_a_line_name_that_leaves_the_channel_is_refused(tmp_path: Path) -> None:
    """`bundle --line` names the line's files in the channel: '../escaped' wrote them beside it."""
    result = runner.invoke(app, ["bundle", "--publish", "--channel", str(tmp_path / "channel"), "--line", "../escaped"])
    assert result.exit_code == 1 and "--line '../escaped'" in result.output, result.output
    assert not any(tmp_path.iterdir())


def test_a_path_that_is_a_folder_or_under_a_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The OS's own errors for paths the user gave (a folder where a file goes, a path under a file, no permission)
    end with their message and exit 1, not a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["edge", "keygen", "--out", str(blocker / "keys")])
    assert result.exit_code == 1 and "Not a directory" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["drift", "--last", "-5"], "greater than or equal to 1"),  # pandas' tail(-5) took all but the first five
        (["drift", "--hours", "nan"], "a number above 0"),
        (["drift", "--hours", "0"], "a number above 0"),  # 0 read as "not given": the default window
        (["drift", "--hours", "1e9"], "at most 87600 hours"),  # an OverflowError traceback in the date arithmetic
        (["label", "select", "--hours", "1e12"], "at most 87600 hours"),
        (["label", "select", "--count", "0"], "greater than or equal to 1"),
        (["server", "start", "--port", "70000"], "less than or equal to 65535"),  # it listened on 4464
        (["ui", "--port", "70000"], "less than or equal to 65535"),
        (["edge", "simulate", "--fps", "inf"], "less than or equal to 1000"),  # it spun at 90 % CPU
        (["lineage", "--data", "ab.dir", "--restore"], "--restore takes a version (REF), not --data"),
        (["lineage", "3", "--force"], "--force only goes with --restore"),
    ],
)
def test_options_out_of_range_are_refused_before_anything_runs(args: list[str], said: str) -> None:
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and said in result.output, result.output


def test_edge_score_names_what_is_not_a_decision_or_a_truth(tmp_path: Path) -> None:
    truth = tmp_path / "truth.json"
    truth.write_text('{"parts": [{"index": 0, "first_frame": 0, "last_frame": 4, "defects": ["scratch"]}]}')
    decisions = tmp_path / "decisions.jsonl"
    for lines, said in (
        ('{"frame": 0, "reject": true}\n{"frame": "a", "reject": false}\n', "line 2: not a decision of the runner"),
        ('{"frame": 0}\n', "line 1: not a decision of the runner (KeyError"),
        ('{"frame": 0, "reject": true\n', "line 1: not a decision of the runner"),
    ):
        decisions.write_text(lines)
        result = runner.invoke(app, ["edge", "score", str(decisions), "--truth", str(truth)], env={"COLUMNS": "300"})
        assert result.exit_code == 1 and said in result.output, result.output
    # No decision at all (the runner failed): it scored every defective part as missed, and exited 0.
    decisions.write_text('{"summary": true}\n')
    result = runner.invoke(app, ["edge", "score", str(decisions), "--truth", str(truth)], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "no decision lines" in result.output, result.output
    # The video given where the decisions go (the two swapped): it was a UnicodeDecodeError traceback.
    video = tmp_path / "line.avi"
    video.write_bytes(b"RIFF\x00\x10\xff\xfeAVI LIST\x80\x81")
    result = runner.invoke(app, ["edge", "score", str(video), "--truth", str(truth)], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "not text: the runner's decisions are JSON lines" in result.output, result.output
    decisions.write_text('{"frame": 0, "reject": true}\n{"summary": true}\n')
    for text in ("{}", "not json"):
        (tmp_path / "bad-truth.json").write_text(text)
        result = runner.invoke(app, ["edge", "score", str(decisions), "--truth", str(tmp_path / "bad-truth.json")])
        assert result.exit_code == 1 and "not the truth.json" in result.output, result.output
    from serving.line_simulator import load_decisions, load_truth, score

    scored = score(load_decisions(decisions), load_truth(truth))  # the summary line is not a decision
    assert (scored.parts, scored.rejected, scored.missed_rejects) == (1, 1, 0)
    result = runner.invoke(app, ["edge", "score", str(decisions), "--truth", str(truth)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output


def test_edge_simulate_replaces_a_line_only_when_asked_and_whole(tmp_path: Path) -> None:
    """A second `edge simulate` overwrote the first without asking, and an interrupted one left a new partial video
    beside the old truth.json, which then scored wrong without a word."""
    out = tmp_path / "line[1]"
    args = ["edge", "simulate", "--out", str(out), "--parts", "2", "--frames-per-part", "1"]
    assert runner.invoke(app, args).exit_code == 0
    first = (out / "truth.json").read_text()
    refused = runner.invoke(app, [*args, "--defect-rate", "1"], env={"COLUMNS": "300"})
    assert refused.exit_code == 1 and "already holds a simulated line: pass --overwrite" in refused.output
    assert (out / "truth.json").read_text() == first
    assert runner.invoke(app, [*args, "--defect-rate", "1", "--overwrite"]).exit_code == 0
    assert (out / "truth.json").read_text() != first and sorted(p.name for p in out.iterdir()) == [
        "line.avi",
        "truth.json",
    ]
    assert runner.invoke(app, ["edge", "simulate", "--parts", "100000000"]).exit_code == 2  # it would fill the disk


def test_edge_score_takes_one_camera_of_a_line(tmp_path: Path) -> None:
    """Two cameras on one line each number their own frames: a file with both is refused unless one is named."""
    truth = tmp_path / "truth.json"
    truth.write_text('{"parts": [{"index": 0, "first_frame": 0, "last_frame": 1, "defects": ["scratch"]}]}')
    decisions = tmp_path / "decisions.jsonl"
    decisions.write_text(
        '{"device": "cam-top", "frame": 0, "reject": true}\n{"device": "cam-side", "frame": 0, "reject": false}\n'
        '{"device": "cam-top", "frame": 1, "reject": false}\n{"device": "cam-side", "frame": 1, "reject": false}\n'
    )
    args = ["edge", "score", str(decisions), "--truth", str(truth)]
    mixed = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert mixed.exit_code == 1 and "decisions of 2 cameras (cam-side, cam-top)" in mixed.output, mixed.output
    unknown = runner.invoke(app, [*args, "--device", "cam-front"], env={"COLUMNS": "300"})
    assert unknown.exit_code == 1 and "no decisions of device 'cam-front'" in unknown.output, unknown.output
    for camera, missed in (("cam-top", "0"), ("cam-side", "1")):
        scored = runner.invoke(app, [*args, "--device", camera], env={"COLUMNS": "300"})
        assert scored.exit_code == 0, scored.output
        row = next(line for line in scored.output.splitlines() if line.count("│") >= 6)
        assert [cell.strip() for cell in row.split("│")[1:-1]] == ["1", "1", str(1 - int(missed)), missed, "0", "0"]


def test_data_help() -> None:
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0
    for command in ("synth", "import", "pull", "status"):
        assert command in _commands("data") and command in result.stdout


def test_label_help() -> None:
    result = runner.invoke(app, ["label", "--help"])
    assert result.exit_code == 0 and "select" in result.stdout and "import" in result.stdout


def test_outside_a_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 1
    assert "no Conveyor project" in result.output
    assert "Traceback" not in result.output


def test_bad_params_name_the_key(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    (project / "params.yaml").write_text("train:\n  epochs: zero\n")
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 1
    assert "train.epochs" in result.output and "'zero'" in result.output


def test_synth_then_validate_then_status(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    result = runner.invoke(app, ["data", "synth"])
    assert result.exit_code == 0, result.output
    assert "commit data.dvc" in result.output
    assert runner.invoke(app, ["data", "status"]).exit_code == 0
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    assert (project / "artifacts/validation/manifest.json").is_file()


def test_validation_failure_is_reported_not_raised(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    assert runner.invoke(app, ["data", "synth"]).exit_code == 0
    (project / "data/labels/test/test_00000.txt").write_text("0 0.5\n")
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 1
    assert "data/labels/test/test_00000.txt:1: expected 5 fields" in result.output
    status = runner.invoke(app, ["data", "status"])
    assert status.exit_code == 1 and "modified" in status.output


def test_synth_to_a_folder_with_a_domain_shift(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    result = runner.invoke(
        app, ["data", "synth", "--out", "shifted", "--brightness", "0.5", "--background", "concrete"]
    )
    assert result.exit_code == 0, result.output
    assert (project / "shifted/images/test").is_dir()
    assert not (project / "data.dvc").exists()  # a side dataset is not recorded as the data version
    bad = runner.invoke(app, ["data", "synth", "--out", "x", "--background", "marble"])
    assert bad.exit_code == 1 and "background" in bad.output
    # Named by its option, in one line (it was pydantic's text of the model: "1 validation error for DomainShift").
    bad = runner.invoke(app, ["data", "synth", "--out", "x", "--blur", "inf"], env={"COLUMNS": "300"})
    assert bad.exit_code == 1 and "--blur: Input should be less than or equal to 50 (got inf)" in bad.output, bad.output
    assert "validation error" not in bad.output and not (project / "x").exists()


def test_train_before_validate_says_what_to_run(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1
    assert "conveyor validate" in result.output
    for stage, first in (("profile", "conveyor export"), ("gate", "conveyor train")):  # profile said "[Errno 2]"
        result = runner.invoke(app, [stage], env={"COLUMNS": "300"})
        assert result.exit_code == 1 and f"stage first (`{first}`)" in result.output, result.output


def test_a_damaged_embedded_store_is_named(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.db that is not an SQLite database (a DatabaseError traceback), or a folder (two minutes, then one)."""
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = project / "mlflow.db"
    store.write_bytes(b"this is not a database" * 100)
    result = runner.invoke(app, ["models"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "is not an SQLite database (file is not a database)" in result.output, (
        result.output
    )
    store.unlink()
    store.mkdir()
    result = runner.invoke(app, ["models"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "is not an SQLite database (a folder)" in result.output, result.output


def test_a_store_under_a_path_with_uri_characters_is_read_as_it_is(tmp_path: Path) -> None:
    """'%', '?' and '#' in a project's path: a good store was read as damaged, or a stray file was made."""
    import sqlite3

    from conveyor.tracking import check_reachable

    folder = tmp_path / "line 2 %20 #1 ?x"
    folder.mkdir()
    store = folder / "mlflow.db"
    with sqlite3.connect(store) as db:
        db.execute("create table t (x int)")
    before = set(tmp_path.rglob("*"))
    check_reachable(f"sqlite:///{store}")
    assert set(tmp_path.rglob("*")) == before


def test_promote_refuses_what_is_not_a_version(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["promote", "v", "--reason", "typo"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "'v' is not a version number" in result.output, result.output
    # Past the registry's 64-bit version numbers: "Python int too large to convert to SQLite INTEGER", a traceback.
    huge = "99999999999999999999"
    for args in (["promote", huge, "--reason", "typo"], ["lineage", huge]):
        result = runner.invoke(app, args, env={"COLUMNS": "300"})
        assert result.exit_code == 1 and f"has no version {huge}" in result.output, result.output


def test_a_typo_in_the_tracking_uri_is_named(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`htp://` was MLflow's KeyError traceback, `:5000x` an InvalidURL one."""
    monkeypatch.chdir(project)
    for uri, said in (("htp://127.0.0.1:5000", "is not a tracking URI"), ("http://127.0.0.1:5000x", "is not a URL")):
        result = runner.invoke(app, ["models"], env={"COLUMNS": "300", "MLFLOW_TRACKING_URI": uri})
        assert result.exit_code == 1 and f"MLFLOW_TRACKING_URI='{uri}' {said}" in result.output, result.output


def test_a_tracking_uri_with_a_user_and_password_is_checked_with_them_and_never_shown(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`http://alice:s3cret@host:port` (which MLflow's client sends as basic auth) was read by the health check as
    a host name `alice:s3cret@127.0.0.1`: a server that was up was "unreachable", and the message showed the
    password. A real HTTP server that wants the credentials answers /health here (MLflow behind a proxy does so)."""
    import base64
    import http.server
    import threading

    from conveyor.tracking import TrackingUnavailableError, check_reachable

    wanted = "Basic " + base64.b64encode(b"alice:s3cret").decode()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/health" and self.headers.get("Authorization") == wanted
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        check_reachable(f"http://alice:s3cret@127.0.0.1:{port}")
        with pytest.raises(
            TrackingUnavailableError, match=r"http://\*\*\*@127\.0\.0\.1:\d+ is unreachable \(Unauthorized\)"
        ):
            check_reachable(f"http://alice:wrong@127.0.0.1:{port}")
        # Refused, the same command would fail again: not the "try again" exit a stage retry looks for.
        with pytest.raises(TrackingUnavailableError) as refused:
            check_reachable(f"http://alice:wrong@127.0.0.1:{port}")
        assert not refused.value.transient
    finally:
        server.shutdown()
    monkeypatch.chdir(project)
    result = runner.invoke(
        app, ["models"], env={"COLUMNS": "300", "MLFLOW_TRACKING_URI": f"http://alice:s3cret@127.0.0.1:{port}"}
    )
    # The server gone: a temporary failure (sysexits' EX_TEMPFAIL), which a flow's stage retry tries again.
    assert result.exit_code == 75 and "s3cret" not in result.output and "http://***@127.0.0.1" in result.output


def test_messages_are_text_not_markup_and_a_damaged_data_dvc_is_named(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path like `line[/cam1]` crashed the error's own printing (Rich read it as markup) and `[cam1]` was dropped
    from the message; a merge conflict in data.dvc was a YAML traceback from every data command, and `data import
    --replace` replaced data/ before it noticed."""
    monkeypatch.chdir(project)
    for folder in ("in/line[/cam1]", "in/line[cam1]"):
        result = runner.invoke(app, ["data", "add", str(project / folder)], env={"COLUMNS": "300"})
        assert result.exit_code == 1 and f"{project / folder}" in result.output, result.output
        assert "Traceback" not in result.output
    (project / "data.dvc").write_text("<<<<<<< HEAD\nouts:\n- md5: abc.dir\n=======\n- md5: def.dir\n>>>>>>> other\n")
    batch = project.parent / "batch"
    (batch / "images" / "train").mkdir(parents=True)
    (project / "data").mkdir(exist_ok=True)
    (project / "data" / "kept.txt").write_text("the data before")
    for args in (["data", "status"], ["data", "import", str(batch), "--replace"]):
        result = runner.invoke(app, args, env={"COLUMNS": "300"})
        assert result.exit_code == 1 and "data.dvc is not the file `dvc add data` writes" in result.output, (
            result.output
        )
    assert (project / "data" / "kept.txt").read_text() == "the data before"


def test_tables_fold_long_cells_instead_of_cutting_them() -> None:
    """In an 80-column terminal, `conveyor stack up` printed every address as `http://127.0.0.1:50…`: cells fold."""
    from rich.console import Console

    from conveyor.tables import FoldingTable

    table = FoldingTable(title="Conveyor stack up")
    for column in ("part", "state", "address", "start s", "log"):
        table.add_column(column)
    address = "http://127.0.0.1:50123/api/v2/some/long/path"
    log = "/work/project/.conveyor/stack/logs/prefect-server-2026-12-05T16-20-00.log"
    table.add_row(
        "prefect", "started", address, "12.2", log, "an implicit extra column, long as well: 0123456789abcdef"
    )
    console = Console(width=80, record=True, color_system=None)
    console.print(table)
    text = console.export_text()
    assert "…" not in text
    body = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    cells = ["".join(row[i].strip() for row in body) for i in range(len(body[0]))]
    assert cells[2] == address and cells[4] == log
    assert cells[5].replace(" ", "").endswith("0123456789abcdef")


def test_status_shows_what_it_closed_when_the_tracking_server_cannot_be_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`conveyor status` closes a killed run's Prefect flow run first, then asks MLflow about the rest: MLflow down
    threw the first's lines away, and the operator never learnt a run had just been marked Crashed. The repairs are
    stood in here (their own tests, test_faults, kill real runs)."""
    from conveyor.cli import project_status
    from conveyor.paths import ProjectPaths
    from conveyor.settings import Settings
    from flows import repair

    def tracking_down(*_: object) -> list[str]:
        raise ConnectionError("MLflow tracking server http://mlflow:5000 is unreachable")

    monkeypatch.setattr(repair, "close_abandoned", lambda *_: ["flow run 'brave-otter' of pid 4242: now Crashed"])
    monkeypatch.setattr(repair, "close_runs_of_ended_flow_runs", tracking_down)
    rows = project_status._repair(ProjectPaths(tmp_path), Settings())
    assert rows[0] == ("closed", "flow run 'brave-otter' of pid 4242: now Crashed")
    assert rows[1][0] == "unavailable" and "unreachable" in rows[1][1]


def test_models_lists_a_version_registered_without_a_run(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version registered by hand (from a path: no source run) made `conveyor models` a traceback for the whole
    table. Its data hash is shown whole, as `conveyor lineage --data` takes it."""
    import uuid

    from mlflow.tracking import MlflowClient

    from pipelines import registry
    from tests.conftest import TINY_PARAMS, make_project

    name = f"hand-{uuid.uuid4().hex[:8]}"
    project = make_project(tmp_path / "project", {**TINY_PARAMS, "registry": {"model_name": name}})
    client = MlflowClient(mlflow_server)
    registry.ensure_registered_model(client, name)
    experiment = client.get_experiment_by_name("cli-tests") or client.get_experiment(
        client.create_experiment("cli-tests")
    )
    logged = client.create_logged_model(experiment_id=experiment.experiment_id, name="by-hand")  # no source run
    made = client.create_model_version(
        name, source=f"models:/{logged.model_id}", model_id=logged.model_id,
        tags={"conveyor.data_md5": "0123456789abcdef0123.dir"},
    )  # fmt: skip
    assert not made.run_id
    monkeypatch.chdir(project)
    result = runner.invoke(app, ["models"], env={"COLUMNS": "300", "MLFLOW_TRACKING_URI": mlflow_server})
    assert result.exit_code == 0, result.output
    rows = [line.split("│") for line in result.output.splitlines() if line.count("│") == 8]
    assert "0123456789abcdef0123.dir" in "".join(row[5].strip() for row in rows), result.output  # a cell may fold


def test_a_version_whose_run_was_collected_shows_no_metric_not_a_traceback() -> None:
    """After `mlflow gc`, a version's run is gone, and `conveyor models` was a traceback for the whole table. A
    stand-in client raises what MLflow's does for a run that does not exist (no server can collect one here
    quickly); another error still propagates."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    from conveyor.cli.registry import _run_metrics

    class Collected:
        code = RESOURCE_DOES_NOT_EXIST

        def get_run(self, run_id: str) -> object:
            raise MlflowException(f"Run '{run_id}' not found", error_code=self.code)

    assert _run_metrics(Collected(), "0123") == {} and _run_metrics(Collected(), None) == {}
    broken = Collected()
    broken.code = INTERNAL_ERROR
    with pytest.raises(MlflowException):
        _run_metrics(broken, "0123")
