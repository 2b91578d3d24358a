"""Folders of the prompt cache's disk tier that no model can read any more.

A tier's folder is named by its model's identity (:func:`~pensieve_bridge.disk_format.model_identity`),
which changes when the model's files change, or MLX or mlx-lm is upgraded: the folder of the old
identity is then never read again, yet it would keep its files (up to the whole cap) forever.
So each folder holds a small marker, :data:`MARK`, naming the model it was made for (its resolved
path, or its Hugging Face id) and the process that last used it; when a tier opens, the folders
beside it made for the same model under another identity are removed, unless a live process (or
another tier of this one) is using them. Folders without a marker, and files that are not the
tier's, are left alone.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Tuple

log = logging.getLogger(__name__)

#: The marker file in each tier's folder.
MARK = "model.json"


def mark(folder: Path, source: str) -> None:
    """Records in ``folder`` that this process uses it for the model ``source``."""
    tmp = folder / f".{MARK}.{os.getpid()}.tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "w") as f:
        f.write(json.dumps({"source": source, "pid": os.getpid()}))
    os.replace(tmp, folder / MARK)


def writer_gone(path: Path) -> bool:
    """Whether the process that named the temporary file ``path`` (``.<name>.<pid>.tmp``) is gone
    (or is this one: then the file is a leftover of its own, and is no longer written)."""
    try:
        pid = int(path.name.split(".")[-2])
    except (ValueError, IndexError):
        return True
    return pid == os.getpid() or not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(root: Path, keep: Path, source: str, in_use: Iterable[Path], suffixes: Tuple[str, ...]) -> Tuple[int, int]:
    """Removes the folders under ``root`` marked for ``source``, other than ``keep`` and those
    ``in_use`` here or by a live process; in each, only the marker and files ending with one of
    ``suffixes`` go, and the folder itself only once it is empty. Returns ``(files, bytes)``
    removed."""
    in_use = set(in_use) | {keep}
    files = nbytes = 0
    try:
        folders = [d for d in root.iterdir() if d.is_dir() and d not in in_use]
    except OSError:
        return 0, 0
    for folder in folders:
        try:
            marked = json.loads((folder / MARK).read_text())
            if marked.get("source") != source or (marked.get("pid") != os.getpid() and _alive(int(marked.get("pid", 0)))):
                continue
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # no marker, or not one of ours: not this sweep's to judge
        try:
            for f in folder.iterdir():
                if f.name.endswith(suffixes) and (not f.name.endswith(".tmp") or writer_gone(f)):
                    size = f.stat().st_size
                    f.unlink()
                    files += 1
                    nbytes += size
            (folder / MARK).unlink(missing_ok=True)
            folder.rmdir()
        except OSError as e:
            log.warning("could not remove all of the old prompt cache folder %s: %s", folder, e)
            continue
        log.info("removed the prompt cache folder %s: it was made for %s before its files or MLX changed", folder, source)
    return files, nbytes
