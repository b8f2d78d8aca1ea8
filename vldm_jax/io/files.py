"""Folders put in place atomically: the one swap that every writer of a folder (our checkpoint format, `vldm
prepare`'s shards) uses."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable. Replacing
    a folder by two renames leaves a moment with no folder under the name, and a kill there loses it."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(new: Path, dst: Path) -> None:
    """Moves the complete folder ``new`` to ``dst``. An existing ``dst`` is swapped in one step where the kernel can
    (never absent, so a kill at any moment leaves the old or the new folder), else by two renames; the old copy is
    then removed."""
    new, dst = Path(new), Path(dst)
    if not dst.exists():
        os.replace(new, dst)
    elif _exchange(new, dst):
        shutil.rmtree(new, ignore_errors=True)  # holds the old folder now
    else:
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(new, dst)
        shutil.rmtree(old, ignore_errors=True)
