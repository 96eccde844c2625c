#!/bin/sh
# A plain `tritonserver` on the model repository that `conveyor triton-repository` wrote to /models: Triton's own
# Python backend runs Conveyor's ServedModel (serving/triton_repository.py), with Conveyor installed in this image.
# The binary, its backends and the Python backend stubs come from the PyTriton wheel in uv.lock, so no NGC Triton
# image with another Python is needed. tests/test_serving.py::test_plain_triton_serves_the_same_model_code runs the
# same command line against the same kind of repository.
set -eu

dist=$(python -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")')
version=$(python -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
backends=${TRITON_BACKEND_DIR:-/tmp/triton-backends}

# The Python backend needs the stub built for this interpreter's version beside it.
rm -rf "$backends"
cp -r "$dist/backends" "$backends"
cp "$dist/python_backend_stubs/$version/triton_python_backend_stub" "$backends/python/"

# This interpreter's shared libpython first (else the stub may load the system's, another patch release), then the
# wheel's bundled libraries.
libs=$(python -c 'import sysconfig; from pytriton.utils.distribution import get_libs_path; print(sysconfig.get_config_var("LIBDIR"), get_libs_path(), sep=":")')
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Triton's administrative extensions behind a key nobody holds (random at each start), as `conveyor serve` keeps them
# (serving/triton.py): shared-memory registration, traces, logs and statistics are not for clients in the cluster.
admin_key=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
admin="shared-memory,model-repository,statistics,trace,logging:conveyor-admin-key=$admin_key"

exec "$dist/bin/tritonserver" \
    --model-repository="${TRITON_MODEL_REPOSITORY:-/models}" \
    --backend-directory="$backends" \
    --http-port=8000 \
    --grpc-port=8001 \
    --metrics-port=8002 \
    --http-restricted-api="$admin" \
    --grpc-restricted-protocol="$admin" \
    "$@"
