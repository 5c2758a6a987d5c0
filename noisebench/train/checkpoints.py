"""Sealed checkpoints: a marker with every file's size and hash, written once the checkpoint is complete, so a
resume never starts from one a kill cut short (its own module: the callback seals, resume checks)."""
from __future__ import annotations

import os
from pathlib import Path

from noisebench.testbeds import cache

#: Written last into each checkpoint (file sizes and sha256): a checkpoint without it, or whose files differ from
#: it, was cut short or damaged and is never resumed from.
CHECKPOINT_MARKER = "noisebench_complete.json"

_UMASK = os.umask(0)
os.umask(_UMASK)


def mark_checkpoint(folder: str | os.PathLike) -> None:
    """Seal a finished checkpoint (call after every file of it is written), its files made readable as the
    records are (safetensors writes the weights 0600, so a colleague's ``lm_eval`` could not read them)."""
    folder = Path(folder)
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~_UMASK)
    cache.write_marker(folder, name=CHECKPOINT_MARKER)


def checkpoint_problems(folder: str | os.PathLike) -> list[str]:
    """Why a checkpoint cannot be resumed from (empty when it can)."""
    return cache.problems(Path(folder), name=CHECKPOINT_MARKER)
