"""Which split an image belongs to when its source does not say: decided by its content, so it never moves.

An image's bytes (salted with `data.split.seed`) hash to a number u in [0, 1). The interval [0, test) is test and
[test, test + val) is val, whichever of them the caller lets it go to; the rest is train. Because only the image's own
bytes decide, adding a batch later never moves an old image, the same image always lands in the same split (so a
duplicate cannot leak between splits), and a re-import of the same data gives the same dataset. Classes are spread
across splits in proportion in expectation, not exactly: a stratified shuffle would move old images each time data
is added, and stability is what keeps the test split meaningful across data versions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection

from conveyor.settings import Split, SplitSettings


def unit_hash(content: bytes, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:".encode() + content).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(content: bytes, settings: SplitSettings, allowed: Collection[str] = ("val", "test")) -> Split:
    """train, or val/test when the hash falls in its interval and the caller allows that split."""
    u = unit_hash(content, settings.seed)
    if "test" in allowed and u < settings.test:
        return "test"
    if "val" in allowed and settings.test <= u < settings.test + settings.val:
        return "val"
    return "train"
