"""The one base of expected failures: what a user can fix (bad params or data, a server not reachable, a refused
promotion). The CLI prints a `ConveyorError`'s message and exits 1; anything else is a bug and keeps its traceback.

Each error also keeps its builtin base (`RuntimeError`, `ValueError`, `FileNotFoundError`), so callers that catch
those still do.
"""

from __future__ import annotations


class ConveyorError(Exception):
    """An expected failure whose message tells the user what happened and what to do."""
