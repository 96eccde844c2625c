"""Which batch a file of data/ came from, by its name: a module of its own so that the stages and the drift check
that need it do not import the data commands (DVC, import, synthesis) with it."""

from __future__ import annotations

import re
from pathlib import PurePath

BATCH_SEPARATOR = "__"  # data/images/<split>/<batch>__<original name>: files added by `conveyor data add`
BASE_BATCH = "base"  # what batch_of says for files that came with the dataset itself (synth, import, pull)
_BATCH_PREFIX = re.compile(r"^(add-\d{8}-\d{6}-[a-z0-9-]+)" + BATCH_SEPARATOR)


def batch_of(image_name: str) -> str:
    """The batch a file of data/ came from: `add-20250101-120000-line-3` for one added by `conveyor data add`
    (named `<batch>__<original name>`), or "base" for one that came with the dataset (synth, import, pull).

    Takes a file name or a path (only its last part counts), of an image or of its label. Only a prefix of the form
    `conveyor data add` writes counts as a batch, so an original file name that happens to hold `__` is "base".
    """
    match = _BATCH_PREFIX.match(PurePath(image_name).name)
    return match.group(1) if match else BASE_BATCH
