"""The one base of expected failures: what a user can fix (bad params or data, a server not reachable, a refused
promotion). The CLI prints a `ConveyorError`'s message and exits 1; anything else is a bug and keeps its traceback.

Each error also keeps its builtin base (`RuntimeError`, `ValueError`, `FileNotFoundError`), so callers that catch
those still do.
"""

from __future__ import annotations

import re


class ConveyorError(Exception):
    """An expected failure whose message tells the user what happened and what to do."""

    def __init__(self, *args: object, transient: bool = False) -> None:
        super().__init__(*args)
        # Whether the same command may succeed when tried again unchanged (a server that did not answer). The CLI
        # exits with TEMPORARY_FAILURE for those and 1 for the rest; the training flow retries a stage only then.
        self.transient = transient


TEMPORARY_FAILURE = 75  # sysexits.h's EX_TEMPFAIL: "a temporary failure; the user is invited to retry"


# `scheme://user:password@host`: what an error message quoting a URL may carry (an MLflow URI with credentials).
_URL_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


def without_credentials(text: str) -> str:
    """`text` with the user and password of every URL in it replaced by `***`: for every message, log line and
    record that quotes a URL."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)
