"""OpenStack Swift from Debian as an S3 store with bucket quotas, for the test of a full bucket (nanio, the stack's
store, has no quotas). One of each server on loopback, data under a folder: the proxy with `s3api` (S3 on top of
Swift), `tempauth` (S3 key `test:tester`, secret `testing`) and `container_quotas` (a bucket is a container: its
`X-Container-Meta-Quota-Bytes` is the quota), the account, container and object servers, and memcached (tempauth's
tokens live there).
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from conveyor.net import free_port, port_free, wait_started
from tests.conftest import stop_tree, wait_http

SERVERS = ("account", "container", "object")
PROGRAMS = ("memcached", "swift-proxy-server", *(f"swift-{kind}-server" for kind in SERVERS), "swift-ring-builder")
USER, KEY = "test:tester", "testing"


def missing_programs() -> list[str]:
    return [program for program in PROGRAMS if shutil.which(program) is None]


@dataclass(frozen=True)
class SwiftStore:
    endpoint: str  # S3 (s3api) and Swift's own API, one port

    @property
    def credentials(self) -> tuple[str, str]:
        return USER, KEY

    def _swift(self, method: str, path: str, headers: dict[str, str]) -> None:
        """A request to Swift's native API as the account's admin (S3 has no call for container metadata)."""
        auth = urllib.request.Request(f"{self.endpoint}/auth/v1.0", headers={"X-Auth-User": USER, "X-Auth-Key": KEY})
        with urllib.request.urlopen(auth, timeout=10) as response:
            token, storage_url = response.headers["X-Auth-Token"], response.headers["X-Storage-Url"]
        request = urllib.request.Request(
            f"{storage_url}/{path}", method=method, headers={"X-Auth-Token": token, **headers}
        )
        urllib.request.urlopen(request, timeout=10).close()

    def set_quota(self, bucket: str, quota_bytes: int | None) -> None:
        """The bucket's quota in bytes, or none."""
        headers = (
            {"X-Remove-Container-Meta-Quota-Bytes": "1"}
            if quota_bytes is None
            else {"X-Container-Meta-Quota-Bytes": str(quota_bytes)}
        )
        self._swift("POST", bucket, headers)


def _configure(root: Path, ports: dict[str, int]) -> Path:
    etc, devices = root / "etc", root / "srv"
    (devices / "d1").mkdir(parents=True)
    etc.mkdir()
    (etc / "swift.conf").write_text(
        "[swift-hash]\nswift_hash_path_suffix = conveyor-test\nswift_hash_path_prefix = conveyor-test\n"
        "[storage-policy:0]\nname = Policy-0\ndefault = yes\n"
    )
    common = (
        f"[DEFAULT]\nbind_ip = 127.0.0.1\ndevices = {devices}\nmount_check = false\nswift_dir = {etc}\n"
        f"user = {getpass.getuser()}\nworkers = 0\n"
    )
    for kind in SERVERS:
        (etc / f"{kind}-server.conf").write_text(
            common + f"bind_port = {ports[kind]}\n[pipeline:main]\npipeline = {kind}-server\n"
            f"[app:{kind}-server]\nuse = egg:swift#{kind}\n"
        )
        builder = str(etc / f"{kind}.builder")  # one replica, one device: a ring of one
        for args in (["create", "0", "1", "1"], ["add", f"r1z1-127.0.0.1:{ports[kind]}/d1", "1"], ["rebalance"]):
            subprocess.run(["swift-ring-builder", builder, *args], check=True, capture_output=True)
    # recheck_container_existence = -1: the proxy asks the container server for the bucket's usage on every upload
    # (memcached expires the entry at once) instead of trusting a count up to 60 s old, so the quota bites on time.
    proxy = f"""
        bind_port = {ports["proxy"]}
        [pipeline:main]
        pipeline = catch_errors proxy-logging cache s3api tempauth container-quotas proxy-logging proxy-server
        [app:proxy-server]
        use = egg:swift#proxy
        account_autocreate = true
        recheck_container_existence = -1
        [filter:tempauth]
        use = egg:swift#tempauth
        user_test_tester = {KEY} .admin
        [filter:s3api]
        use = egg:swift#s3api
        [filter:cache]
        use = egg:swift#memcache
        memcache_servers = 127.0.0.1:{ports["memcached"]}
        [filter:catch_errors]
        use = egg:swift#catch_errors
        [filter:proxy-logging]
        use = egg:swift#proxy_logging
        [filter:container-quotas]
        use = egg:swift#container_quotas
    """
    (etc / "proxy-server.conf").write_text(common + textwrap.dedent(proxy))
    return etc


@contextmanager
def swift_store(root: Path) -> Iterator[SwiftStore]:
    """Swift on loopback under `root`, answering when this yields; every process stopped after."""
    ports = {part: free_port() for part in (*SERVERS, "proxy", "memcached")}
    etc = _configure(root, ports)
    log_path = root / "swift.log"
    with ExitStack() as stack, log_path.open("ab") as log:
        commands = {
            "memcached": ["memcached", "-l", "127.0.0.1", "-p", str(ports["memcached"]), "-u", getpass.getuser()]
        }
        commands |= {kind: [f"swift-{kind}-server", str(etc / f"{kind}-server.conf")] for kind in (*SERVERS, "proxy")}
        started = {}
        for part, command in commands.items():
            started[part] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            stack.callback(stop_tree, started[part])
        for part, process in started.items():  # listening, or the end of the log saying why not
            wait_started(part, partial(_listening, ports[part]), 60, process, log_path)
        endpoint = f"http://127.0.0.1:{ports['proxy']}"
        wait_http(f"{endpoint}/info", 30)
        yield SwiftStore(endpoint)


def _listening(port: int) -> bool:
    return not port_free(port)
