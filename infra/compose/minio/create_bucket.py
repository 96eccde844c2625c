"""Create the stack's bucket on the S3 endpoint if it is not there yet (compose's one-shot `bucket-init` service).

Runs in the worker image with boto3, the client that MLflow's S3 artifact store uses, against AWS_ENDPOINT_URL with
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Idempotent: a bucket that exists (owned by these credentials) is fine.
Meant for compose's MinIO; on AWS, buckets belong to your infrastructure code (region, policies, versioning).
DVC writes under s3://BUCKET/dvc and the MLflow server under s3://BUCKET/mlflow; prefixes need no creation.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError


def main() -> int:
    bucket = os.environ["S3_BUCKET"]
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for attempt in range(30):  # the store may still be starting (compose waits for its health check, but be sure)
        try:
            s3.head_bucket(Bucket=bucket)
            print(f"bucket {bucket} exists on {endpoint or 'AWS'}")
            return 0
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            s3.create_bucket(Bucket=bucket)
            print(f"created bucket {bucket} on {endpoint or 'AWS'}")
            return 0
        except EndpointConnectionError:
            if attempt == 29:
                raise
            time.sleep(2)
    return 1


if __name__ == "__main__":
    sys.exit(main())
