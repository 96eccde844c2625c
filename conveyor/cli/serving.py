"""`conveyor serve | predict | bundle | triton-repository`: serving the registry's models online, in batch, at the edge
and in a Triton cluster."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from conveyor.tables import FoldingTable

if TYPE_CHECKING:
    from conveyor.settings import Settings
    from pipelines.model_source import ModelFiles

from conveyor.cli.common import console, friendly_errors, open_project, open_registry
from conveyor.settings import LINE_NAME, ConfigError

app = typer.Typer()

RefArgument = Annotated[
    str, typer.Argument(help="models:/NAME@alias, models:/NAME/VERSION, @alias or a version (default @champion)")
]
ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="models:/NAME@alias, models:/NAME/VERSION, @alias or a version (default: champion)"),
]


@app.command()
@friendly_errors
def serve(
    model: ModelOption = None,
    host: Annotated[str | None, typer.Option(help="interface (default serve.host, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default serve.port)")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (default serve.grpc_port)")] = None,
    workers: Annotated[int | None, typer.Option(help="model instances (default serve.workers)")] = None,
    runtime: Annotated[
        str | None, typer.Option(help="openvino | openvino_int8 | onnx | tensorrt (default serve.runtime)")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="dynamic batching limit; 1 turns batching off")] = None,
) -> None:
    """Serve the registry's champion (or --model): POST /predict, the Open Inference Protocol over HTTP and gRPC,
    /metrics; follows the registry and hot-swaps when the alias moves. Token: CONVEYOR_SERVE_TOKEN."""
    from serving.server import ServeOptions
    from serving.server import serve as run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pytriton").setLevel(logging.WARNING)
    paths, settings = open_project()
    options = ServeOptions(model, host, port, grpc_port, workers, runtime, max_batch_size)
    run_server(paths, settings, options)


@app.command()
@friendly_errors
def predict(
    source: Annotated[
        str,
        typer.Argument(
            help="a folder of images, a glob ('parts/*.jpg'), a list file, or s3://bucket/prefix "
            "(endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        ),
    ],
    out: Annotated[Path, typer.Option(help="JSONL output; re-running skips images already in it")] = Path(
        "predictions.jsonl"
    ),
    model: ModelOption = None,
    runtime: Annotated[
        str | None, typer.Option(help="openvino | openvino_int8 | onnx | tensorrt (default serve.runtime)")
    ] = None,
) -> None:
    """Batch prediction: detections for every image into JSONL, with the server's model, runtime and code."""
    from pipelines.inference import ImageLimits
    from pipelines.model_source import check_runtime, open_version
    from serving import batch

    images = batch.list_images(source)  # a wrong SOURCE fails before anything is downloaded
    batch.done_images(out)  # and so does an --out that is not this command's output
    paths, settings, client = open_registry()
    cfg = settings.serve
    runtime = runtime or cfg.runtime
    check_runtime(runtime)
    loaded = open_version(paths, settings, model, client=client, runtime=runtime).model
    console.print(f"{len(images)} images; model {loaded.name} v{loaded.version} on {runtime}")
    limits = ImageLimits(cfg.max_image_bytes, cfg.max_image_pixels)
    summary = batch.predict(loaded, images, out, cfg.max_batch_size, limits, console, batch.reader_for(source))
    table = FoldingTable(title=f"predictions -> {summary.out}")
    for column in ("images", "skipped (done before)", "failed", "detections", "seconds", "images/s"):
        table.add_column(column, justify="right")
    table.add_row(
        str(summary.images),
        str(summary.skipped),
        str(summary.failed),
        str(summary.detections),
        f"{summary.seconds:.1f}",
        f"{summary.images_per_second:.1f}",
    )
    console.print(table)
    if summary.images and summary.failed == summary.images:
        console.print(f"[bold red]error:[/] none of the {summary.images} images could be read: see the 'error' lines")
        raise typer.Exit(1)
    if summary.failed:
        console.print(f"[yellow]{summary.failed} images could not be read: see their 'error' lines in {out}[/]")


def _version_files(ref: str | None) -> tuple[Settings, ModelFiles]:
    """A registry version's files, downloaded once into the project's model cache."""
    from pipelines import model_source as source

    paths, settings, client = open_registry()
    version = source.resolve_version(client, settings.registry.model_name, ref or settings.serve.model)
    return settings, source.fetch(client, version, paths.model_cache)


KEY_ENV = "CONVEYOR_EDGE_KEY"  # path of the team's signing key (a secret: not in params.yaml)


@app.command()
@friendly_errors
def bundle(
    ref: RefArgument = "@champion",
    out: Annotated[Path, typer.Option(help="the bundle folder (a .tar.gz is written beside it)")] = Path("edge-bundle"),
    overwrite: Annotated[bool, typer.Option(help="replace an existing bundle folder")] = False,
    key: Annotated[
        Path | None, typer.Option(help=f"sign with this Ed25519 key (default ${KEY_ENV}; `conveyor edge keygen`)")
    ] = None,
    publish: Annotated[bool, typer.Option(help="publish it to the line's channel (edge.channel) for rollout")] = False,
    channel: Annotated[str | None, typer.Option(help="a folder or s3://bucket/prefix (default edge.channel)")] = None,
    line: Annotated[str | None, typer.Option(help="the line to roll it out to (default edge.line)")] = None,
) -> None:
    """An edge bundle: OpenVINO + ONNX models, class names, preprocessing, the reject rule (edge), checksums and a
    runner that needs no Conveyor (numpy, OpenCV, one runtime, and requirements.txt's for MQTT, signatures and
    the log); signed with --key, rolled out to a line with --publish."""
    from serving import bundle as edge

    if line is not None and not re.fullmatch(LINE_NAME, line):
        # It names the line's files in the channel: '../x' wrote them outside it.
        raise ConfigError(f"--line {line!r}: letters, digits, '_', '.' and '-' only (as params.yaml edge.line)")
    settings, files = _version_files(ref)
    key = key or (Path(os.environ[KEY_ENV]) if os.environ.get(KEY_ENV) else None)
    target = channel or settings.edge.channel
    if publish and target is None:
        raise ConfigError("--publish needs a channel: --channel DIR|s3://... or params.yaml edge.channel")
    if publish and key is None:
        raise ConfigError(f"--publish needs a signed bundle: --key PATH or ${KEY_ENV} (`conveyor edge keygen`)")
    # The line is in the bundle's signed edge.json, and a runner takes only its own line's bundles from a channel.
    edge_settings = settings.edge if line is None else settings.edge.model_copy(update={"line": line})
    built = edge.build(
        files,
        out,
        settings.serve.conf,
        edge_settings,
        overwrite=overwrite,
        private_key=key,
        log_s3=settings.serve.prediction_log.s3,
    )
    console.print(
        f"bundle of {files.name} v{files.version}: {built.directory} ({built.files} files, {built.size_mb} MB) and "
        f"{built.archive}{', signed' if key else ''}\non the device: pip install -r requirements.txt && "
        "python run.py --verify IMAGE...  or  python run.py --stream CAMERA [--mqtt BROKER]"
    )
    if publish and target is not None:
        entry = edge.publish(built, target, line or settings.edge.line)
        console.print(f"published to {target}: line {line or settings.edge.line} now runs {entry['bundle']}")


edge_app = typer.Typer(help="The edge: signing keys, a line simulator, decisions scored.", no_args_is_help=True)
app.add_typer(edge_app, name="edge")


@edge_app.command("keygen")
@friendly_errors
def edge_keygen(
    out: Annotated[Path, typer.Option(help="where the key pair goes")] = Path("edge-keys"),
) -> None:
    """A new Ed25519 key pair: the private key signs bundles (keep it), the public key goes to every runner."""
    from serving import bundle as edge

    private, public = edge.keygen(out)
    console.print(
        f"signing key {private} (keep it secret; `export {KEY_ENV}={private}`); runners verify with {public} "
        "(`run.py --public-key`)",
        markup=False,
    )


@edge_app.command("simulate")
@friendly_errors
def edge_simulate(
    out: Annotated[Path, typer.Option(help="folder for line.avi and truth.json")] = Path("line-simulation"),
    # Bounded: 10^8 parts wrote 100 MB in 20 s and would have filled the disk.
    parts: Annotated[int, typer.Option(min=1, max=100_000, help="parts passing under the camera")] = 40,
    fps: Annotated[float, typer.Option(min=1, max=1000, help="the camera's frame rate")] = 10.0,
    frames_per_part: Annotated[int, typer.Option(min=1, max=1000, help="frames each part is in view")] = 5,
    defect_rate: Annotated[float, typer.Option(min=0, max=1, help="share of defective parts")] = 0.4,
    overwrite: Annotated[bool, typer.Option(help="replace a simulation already in --out")] = False,
) -> None:
    """A line simulator: a video of synthetic parts passing under the camera, and which of them are defective."""
    from serving.line_simulator import simulate

    video = simulate(out, parts, fps, frames_per_part, defect_rate, overwrite=overwrite)
    defective = sum(p.defective for p in video.parts)
    console.print(
        f"{video.video}: {video.frames} frames at {video.fps:g} fps, {len(video.parts)} parts ({defective} defective); "
        f"truth in {video.truth}. Run: python BUNDLE/run.py --stream {video.video} > decisions.jsonl, then "
        f"`conveyor edge score decisions.jsonl --truth {video.truth}`",
        markup=False,
    )


@edge_app.command("score")
@friendly_errors
def edge_score(
    decisions: Annotated[Path, typer.Argument(help="the runner's JSON lines (its stdout without --mqtt)")],
    truth: Annotated[Path, typer.Option(help="the simulator's truth.json")],
    device: Annotated[
        str | None, typer.Option(help="the camera whose decisions to score, where the file holds several")
    ] = None,
) -> None:
    """Missed and false rejects of a runner's decisions on a simulated line."""
    from serving.line_simulator import load_decisions, load_truth, one_camera, score

    result = score(one_camera(load_decisions(decisions), device), load_truth(truth))
    table = FoldingTable(title=f"{decisions}{f' ({device})' if device else ''} against {truth}")
    for column in ("parts", "defective", "rejected", "missed rejects", "false rejects", "undecided"):
        table.add_column(column, justify="right")
    table.add_row(*(str(v) for v in result.to_json().values()))
    console.print(table)


@app.command("triton-repository")
@friendly_errors
def triton_repository(
    ref: RefArgument = "@champion",
    out: Annotated[Path, typer.Option(help="the model repository folder")] = Path("triton-models"),
    overwrite: Annotated[bool, typer.Option(help="replace the model's folder in an existing repository")] = False,
) -> None:
    """A Triton model repository serving this version with Conveyor's model code in Triton's Python backend (for a
    cluster: `tritonserver --model-repository DIR` in an image with Conveyor installed)."""
    from serving import triton_repository as repository

    settings, files = _version_files(ref)
    written = repository.write(files, out, settings.serve, overwrite=overwrite)
    console.print(f"{files.name} v{files.version} -> {written}; serve with: tritonserver --model-repository {out}")
