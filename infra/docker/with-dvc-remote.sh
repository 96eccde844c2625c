#!/bin/sh
# Point DVC's default remote at the team's object store, then run the given command.
#
# The repository's .dvc/config names a folder remote (`local`, ../.dvc-remote) so one machine needs no setup. In a
# container, on a CI runner or in a Kubernetes flow-run pod that folder is gone with the container, so the remote is
# taken from the environment instead:
#   CONVEYOR_DVC_REMOTE   e.g. s3://conveyor/dvc (unset: .dvc/config is left as it is)
#   AWS_ENDPOINT_URL      the S3-compatible endpoint (MinIO, Ceph, ...); unset for AWS itself
# Credentials stay in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, never in a DVC config file (a config.local with keys
# breaks reading older revisions with dvc.api). The remote goes into .dvc/config.local, which git ignores.
#
# Used as the worker image's entrypoint (so Prefect's Kubernetes jobs, which only set the command's arguments, get it
# too) and by .github/workflows/model-ci.yaml.
set -eu

if [ -n "${CONVEYOR_DVC_REMOTE:-}" ]; then
    dvc remote add --quiet --local --force --default team "$CONVEYOR_DVC_REMOTE"
    if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
        dvc remote modify --quiet --local team endpointurl "$AWS_ENDPOINT_URL"
    fi
fi

exec "$@"
