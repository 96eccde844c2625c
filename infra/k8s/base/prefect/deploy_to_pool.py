"""Register Conveyor's deployments on the Kubernetes work pool (the `conveyor-deploy` Job runs this).

1. The pool's base job template (base-job-template.json, from prefect-kubernetes' default) gets this pod's own image,
   pinned by its digest, and namespace as the defaults of its `image` and `namespace` variables: flow runs then start
   as Jobs of the very image that registered them, whatever tag an overlay's `images:` set (`:latest` included), in
   whatever namespace the overlay chose.
2. `prefect work-pool create POOL --type kubernetes --overwrite` creates or updates the pool (the Prefect CLI needs no
   prefect-kubernetes for that; only the worker does).
3. `conveyor deploy` registers the training and drift-check deployments and the drift automation. It deploys to
   params.yaml's `orchestration.work_pool` (the process pool `conveyor` of a single machine), so this container's own
   copy of params.yaml is pointed at POOL first; the flow-run pods read the image's unchanged params.yaml, in which no
   stage depends on `orchestration`.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def own_pod() -> tuple[str, str]:
    """This pod's first container image and its namespace, read from the API server with the pod's service account
    (its Role allows `get` on pods)."""
    namespace = (SERVICE_ACCOUNT / "namespace").read_text().strip()
    pod_name = os.environ["HOSTNAME"]  # a pod's hostname is its name
    request = urllib.request.Request(
        f"https://kubernetes.default.svc/api/v1/namespaces/{namespace}/pods/{pod_name}",
        headers={"Authorization": f"Bearer {(SERVICE_ACCOUNT / 'token').read_text().strip()}"},
    )
    context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        pod = json.load(response)
    return pinned_image(pod), namespace


def pinned_image(pod: dict[str, Any]) -> str:
    """The image this pod's first container runs, by digest where the kubelet reports one (`imageID`). A tag can move
    (`:latest`, or a tag pushed again): a node with an older copy cached would start flow runs on other code than
    this pod registered."""
    container = pod["spec"]["containers"][0]
    image = str(container["image"])
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    image_id = next((str(s.get("imageID") or "") for s in statuses if s.get("name") == container["name"]), "")
    if "@sha256:" not in image_id:
        return image  # not reported (yet): the tag, as the pod was given it
    name = image.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:  # a tag, not a registry's port
        name = name[: name.rfind(":")]
    return f"{name}@{image_id.rsplit('@', 1)[1]}"


def flow_run_template(template: dict[str, Any], image: str, namespace: str) -> dict[str, Any]:
    """The base job template with `image` and `namespace` defaulting to this deployment's own."""
    patched = json.loads(json.dumps(template))
    variables = patched["variables"]["properties"]
    variables["image"]["default"] = image
    variables["namespace"]["default"] = namespace
    return patched


def main() -> int:
    pool = os.environ.get("CONVEYOR_WORK_POOL", "conveyor-k8s")
    template_path = Path(os.environ.get("CONVEYOR_JOB_TEMPLATE", "/etc/conveyor/base-job-template.json"))
    image, namespace = own_pod()
    patched = Path("/tmp/base-job-template.json")
    patched.write_text(json.dumps(flow_run_template(json.loads(template_path.read_text()), image, namespace)))
    print(f"work pool {pool}: flow runs as Jobs of {image} in namespace {namespace}", flush=True)
    create = ["prefect", "work-pool", "create", pool, "--type", "kubernetes", "--base-job-template", str(patched)]
    subprocess.run([*create, "--overwrite"], check=True)
    from conveyor.settings import set_param

    set_param(Path("params.yaml"), ("orchestration", "work_pool"), pool)
    return subprocess.run(["conveyor", "deploy"], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
