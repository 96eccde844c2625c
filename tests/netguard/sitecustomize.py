"""Network guard for tests: any attempt to reach a non-loopback address fails and is recorded.

Put this folder on PYTHONPATH and set CONVEYOR_NETGUARD_LOG to a file: every Python process started with that
environment (the CLI, `dvc repro`'s stage commands, their children) records and refuses DNS lookups of non-local
names and connections to non-loopback addresses. Libraries often swallow network errors, so tests assert on the
log, not on exceptions.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Any

_LOG = os.environ.get("CONVEYOR_NETGUARD_LOG")
# This machine's own name resolves from /etc/hosts, not the network.
_LOCAL_NAMES = {"localhost", "ip6-localhost", "localhost.localdomain", "", socket.gethostname().lower()}


def _is_local(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%")[0]
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: looking it up is already a network attempt (DNS)
    return address.is_loopback or address.is_unspecified


def _record(event: str, host: Any) -> None:
    line = f"{os.getpid()} {' '.join(sys.argv[:2])!r} {event} {host!r}\n"
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(line)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        sock, address = args
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        host = address[0]
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        host = args[0]
    else:
        return
    if not _is_local(host):
        _record(event, host)
        raise OSError(f"netguard: network attempt to {host!r} blocked ({event})")


if _LOG:
    sys.addaudithook(_hook)
