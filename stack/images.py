"""`make images`: the container images of `infra/docker` built with podman, and what each weighs and took.

The Dockerfiles stay what a team builds with Docker (`docker build -f infra/docker/Dockerfile.server .`): their bases
are build arguments that default to upstream's images (`python:3.11-slim-bookworm`, `ghcr.io/astral-sh/uv`). Where
no image registry answers (this project's build machines reach PyPI and Debian's mirror only), the same contents
are built here and passed instead:

- `localhost/conveyor-python:3.11-slim-bookworm`: Debian bookworm's Python 3.11 with its shared libpython (what the
  Triton Python backend stub links, as in python:slim), made with `mmdebstrap` from Debian's mirror;
- `localhost/conveyor-uv:VERSION`: uv's binary alone, the version the Makefile pins (its `.tools/bin/uv`, from the uv
  wheel on PyPI).

For `make test-images`, which brings infra/compose.yaml up, it also builds `localhost/conveyor-postgres:15-bookworm`:
Debian's PostgreSQL behind the official image's entrypoint contract (stand_ins/postgres-entrypoint.sh), standing in
for compose's `postgres:17`. (MinIO's stand-in is nanio, which the worker image already has.)

A build host behind a TLS-inspecting proxy names its CA bundle in SSL_CERT_FILE: it is mounted for the builds'
downloads (and uv told to trust it); nothing of it lands in an image.

podman runs with `--runtime runc --cgroup-manager=cgroupfs`: crun refuses the hybrid cgroup hierarchy of these hosts,
and runc works wherever podman does. Writes bench/results/images.json (size and build seconds per image).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from conveyor.errors import ConveyorError
from conveyor.scaffold import REPO

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
# Ulimits at or under the host's hard limits: podman's defaults are higher and fail with "setrlimit: Operation not
# permitted" where the host caps them.
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
PYTHON_VERSION = "3.11"
UPSTREAM_PYTHON = f"docker.io/library/python:{PYTHON_VERSION}-slim-bookworm"
STAND_IN_PYTHON = f"localhost/conveyor-python:{PYTHON_VERSION}-slim-bookworm"
IMAGES = {  # tag -> Dockerfile
    "localhost/conveyor-server:latest": REPO / "infra" / "docker" / "Dockerfile.server",
    "localhost/conveyor-worker:latest": REPO / "infra" / "docker" / "Dockerfile.worker",
}
RESULTS = REPO / "bench" / "results" / "images.json"


class ImageBuildError(ConveyorError, RuntimeError):
    """podman or a base image is missing, or a build failed; the message says which and how to fix it."""


@dataclass(frozen=True)
class Built:
    image: str
    dockerfile: str
    size_mb: float
    build_s: float


def podman(
    *args: str, timeout: float = 3600, check: bool = True, show: bool = False
) -> subprocess.CompletedProcess[str]:
    """podman with this host's flags; `show`: its output goes to the terminal as it comes (a build's steps)."""
    if shutil.which("podman") is None:
        raise ImageBuildError("podman is not installed: `apt-get install podman runc` (`make images` does it as root)")
    result = subprocess.run([*PODMAN, *args], capture_output=not show, text=True, timeout=timeout)
    if check and result.returncode != 0:
        output = "(its output is above)" if show else (result.stderr or result.stdout)[-3000:]
        raise ImageBuildError(f"podman {' '.join(args[:2])} failed: {output}")
    return result


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def pulled(ref: str) -> bool:
    """Whether `ref` is here or can be pulled (a machine without a registry answers no within the timeout)."""
    if image_exists(ref):
        return True
    try:
        return podman("pull", "--quiet", ref, timeout=120, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def uv_version() -> str:
    import re

    found = re.search(r"^UV_VERSION := (\S+)", (REPO / "Makefile").read_text(), re.M)
    if not found:
        raise ImageBuildError("the Makefile pins no UV_VERSION")
    return found.group(1)


def python_base() -> str:
    """Upstream's python:slim when it can be pulled, else the Debian stand-in (built once)."""
    if pulled(UPSTREAM_PYTHON):
        return UPSTREAM_PYTHON
    if not image_exists(STAND_IN_PYTHON):
        with tempfile.TemporaryDirectory(prefix="conveyor-base-") as work:
            rootfs = Path(work) / "base.tar"
            debian_rootfs(["python3", "libpython3.11", "python-is-python3", "ca-certificates"], rootfs)
            podman("import", "--change", "ENV LANG=C.UTF-8", str(rootfs), STAND_IN_PYTHON)
    return STAND_IN_PYTHON


POSTGRES_STAND_IN = "localhost/conveyor-postgres:15-bookworm"
POSTGRES_ENTRYPOINT = Path(__file__).parent / "stand_ins" / "postgres-entrypoint.sh"


def debian_rootfs(packages: list[str], out: Path, *hooks: str) -> None:
    """A Debian bookworm root filesystem as a tarball, from Debian's mirror (mmdebstrap, no registry needed)."""
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("no registry answers and mmdebstrap is missing: apt-get install mmdebstrap")
    args = ["mmdebstrap", "--variant=apt", f"--include={','.join(packages)}"]
    args += [arg for hook in hooks for arg in ("--customize-hook", hook)]
    result = subprocess.run([*args, "bookworm", str(out)], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise ImageBuildError(f"mmdebstrap failed:\n{result.stderr[-3000:]}")


def postgres_stand_in() -> str:
    """For infra/compose.yaml's `postgres:17` where no registry answers: Debian's PostgreSQL 15 behind an entrypoint
    with the official image's contract as compose uses it (stand_ins/postgres-entrypoint.sh). Built once."""
    if not image_exists(POSTGRES_STAND_IN):
        with tempfile.TemporaryDirectory(prefix="conveyor-postgres-") as work:
            rootfs = Path(work) / "postgres.tar"
            debian_rootfs(
                ["postgresql-15"],
                rootfs,
                f"upload {POSTGRES_ENTRYPOINT} /usr/local/bin/docker-entrypoint.sh",
                'chroot "$1" sh -c "chmod 755 /usr/local/bin/docker-entrypoint.sh'
                " && rm -rf /var/lib/postgresql/15 /etc/postgresql/15"  # Debian's default cluster: not used
                " && mkdir -p /var/lib/postgresql/data /docker-entrypoint-initdb.d"
                ' && chown -R postgres:postgres /var/lib/postgresql && chmod 700 /var/lib/postgresql/data"',
            )
            changes = [
                "USER postgres",
                "ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV PGDATA=/var/lib/postgresql/data",
                "ENV PGHOST=/var/lib/postgresql",
                "ENV LANG=C.UTF-8",
                'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]',
                'CMD ["postgres"]',
                "EXPOSE 5432",
                "STOPSIGNAL SIGINT",  # PostgreSQL's fast shutdown, as the official image
            ]
            podman("import", *[arg for change in changes for arg in ("--change", change)], str(rootfs),
                   POSTGRES_STAND_IN)  # fmt: skip
    return POSTGRES_STAND_IN


def uv_base(version: str) -> str:
    """Upstream's uv image when it can be pulled, else an image holding the Makefile's uv binary as /uv."""
    upstream = f"ghcr.io/astral-sh/uv:{version}"
    if pulled(upstream):
        return upstream
    stand_in = f"localhost/conveyor-uv:{version}"
    if not image_exists(stand_in):
        binary = REPO / ".tools" / "bin" / "uv"
        found = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.split()
        if len(found) < 2 or found[1] != version:
            raise ImageBuildError(f"{binary} is not uv {version}: run `make env` first")
        with tempfile.TemporaryDirectory(prefix="conveyor-uv-") as work:
            archive = Path(work) / "uv.tar"
            with tarfile.open(archive, "w") as tar:
                tar.add(binary, arcname="uv")
            podman("import", str(archive), stand_in)
    return stand_in


def build(tag: str, dockerfile: Path, python_image: str, uv_image: str) -> Built:
    args = [
        "build",
        "--format",
        "docker",  # OCI's image format has no HEALTHCHECK: podman would drop the Dockerfiles' health checks
        "--network",
        "host",
        *ULIMITS,
        "-f",
        str(dockerfile),
        "--ignorefile",
        str(dockerfile.with_name(dockerfile.name + ".dockerignore")),
        "--build-arg",
        f"PYTHON_IMAGE={python_image}",
        "--build-arg",
        f"UV_IMAGE={uv_image}",
        "-t",
        tag,
    ]
    bundle = os.environ.get("SSL_CERT_FILE")
    if bundle and Path(bundle).is_file():  # a proxy's CA: for the downloads only, never in the image
        args += ["-v", f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro", "--build-arg", "UV_NATIVE_TLS=1"]
    started = time.perf_counter()
    podman(*args, str(REPO), show=True)
    seconds = time.perf_counter() - started
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    return Built(tag, dockerfile.relative_to(REPO).as_posix(), round(size / 1e6, 1), round(seconds, 1))


def untagged_images() -> set[str]:
    """The IDs of the images no tag names and no image builds on (what `podman image prune` would remove now)."""
    listed = podman("images", "--filter", "dangling=true", "--quiet", "--no-trunc", check=False)
    return set(listed.stdout.split()) if listed.returncode == 0 else set()


def remove_untagged_since(before: set[str]) -> list[tuple[str, str]]:
    """Remove what a build left untagged: the image its tag named before, and its build stage's layers (gigabytes).

    Only images that became untagged since `before`: `podman image prune` would remove every untagged image on the
    host, other projects' too. A layer is untagged once the image above it is gone, so this repeats until nothing
    new is left. Returns the images that could not be removed (a container still uses one) and why."""
    failed: dict[str, str] = {}
    while left := untagged_images() - before - failed.keys():
        for image in sorted(left):
            removed = podman("rmi", image, check=False)
            if removed.returncode != 0 and image_exists(image):  # gone with an image above it: not a failure
                failed[image] = removed.stderr.strip() or removed.stdout.strip()
    return sorted(failed.items())


def build_all(only: list[str] | None = None) -> list[Built]:
    python_image, uv_image = python_base(), uv_base(uv_version())
    built = []
    for tag, dockerfile in IMAGES.items():
        if only and not any(name in tag for name in only):
            continue
        print(f"building {tag} from {dockerfile.relative_to(REPO)} on {python_image} ...", flush=True)
        untagged_before = untagged_images()
        built.append(build(tag, dockerfile, python_image, uv_image))
        for image, why in remove_untagged_since(untagged_before):  # not fatal: a container may still use one
            print(f"  (image {image[:19]} left: {why[:300]})", flush=True)
        print(f"  {built[-1].size_mb / 1000:.2f} GB in {built[-1].build_s:.0f} s", flush=True)
    if not only:
        print(f"compose's PostgreSQL for `make test-images`: {postgres_stand_in()}", flush=True)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "only", nargs="*", help="build only the images whose tag contains one of these (server, worker)"
    )
    args = parser.parse_args()
    try:
        built = build_all(args.only)
    except ImageBuildError as exc:
        raise SystemExit(f"error: {exc}") from None
    from conveyor.lineage import cpu_model
    from conveyor.paths import available_cores

    earlier = json.loads(RESULTS.read_text()).get("images", []) if RESULTS.is_file() else []
    fresh = {b.image for b in built}
    RESULTS.write_text(
        json.dumps(
            {
                "images": [e for e in earlier if e["image"] not in fresh] + [asdict(b) for b in built],
                "host": {"cpu": cpu_model(), "cores": available_cores(), "platform": platform.platform()},
                "podman": podman("--version").stdout.strip(),
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=2,
        )
        + "\n"
    )
    for b in built:
        print(f"{b.image}: {b.size_mb / 1000:.2f} GB, built in {b.build_s:.0f} s")
    print(f"written to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
