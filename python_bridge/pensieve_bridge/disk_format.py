"""The prompt cache's files on disk (:mod:`~pensieve_bridge.disk_cache`): what an entry's file
holds and how it is named, the model identity that names a tier's folder, and the file
operations the tier's threads share.

An entry is ``<sha256 of its tokens>.safetensors`` in the layout of mlx-lm's
``save_prompt_cache`` (its states flattened, scalars as arrays listed in the metadata), whose
metadata holds :data:`FORMAT`, the model's identity, the tokens (little-endian u32, base64)
and a CRC-32 of the header and the data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, List

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import can_trim_prompt_cache

#: Written in every file; a file with another value is not read.
FORMAT = "pensieve-prompt-cache-2"
#: Bytes of each weight file hashed into a model's identity, at its start, middle and end.
SAMPLE = 1 << 20
SUFFIX = ".safetensors"
TMP = ".tmp"

DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.uint16: "U16", mx.uint32: "U32", mx.uint64: "U64",
    mx.int8: "I8", mx.int16: "I16", mx.int32: "I32", mx.int64: "I64",
    mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32",
}  # fmt: skip

def model_identity(files: List[Path], runtime: str) -> str:
    """A hash of what makes a model's KV cache what it is: its files (names, sizes, their first,
    middle and last :data:`SAMPLE` bytes: headers, and weights a fine-tune changes) and how it
    runs (``runtime``: dtypes, classes, library versions)."""
    h = hashlib.sha256(f"{FORMAT}\0{runtime}\0".encode())
    for f in sorted(files):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for at in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
                fh.seek(at)
                h.update(fh.read(SAMPLE))
    return h.hexdigest()


def out_of_page_cache(fd: int, sync: bool) -> None:
    """Drops a file's pages from the page cache (Linux), which a memory cgroup charges to the
    server; ``sync`` writes them first (only clean pages leave), durable before the rename."""
    if sync:
        os.fdatasync(fd)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def tokens_bytes(tokens: List[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


def entry_name(token_bytes: bytes) -> str:
    return hashlib.sha256(token_bytes).hexdigest()[:40] + SUFFIX


def common_prefix(a: bytes, b: bytes) -> int:
    """Tokens (4 bytes each) ``a`` and ``b`` share at their start."""
    n = min(len(a), len(b)) // 4
    if a[: 4 * n] == b[: 4 * n]:
        return n
    lo, hi = 0, n  # a and b agree on lo tokens, not on hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[: 4 * mid] == b[: 4 * mid]:
            lo = mid
        else:
            hi = mid
    return lo


def header_crc(header: dict) -> int:
    """The CRC-32 of a file's header (the tensors' names, dtypes, shapes and offsets, and the
    metadata), its own checksum left out: where the data's CRC starts, so that the checksum
    covers both (two tensors' offsets swapped, or a shape changed, fail it)."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != "0.crc32"}
    canonical = {**header, "__metadata__": meta}
    return zlib.crc32(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())


def open_entry(path: Path):
    """Opens a cache file for reading, ``(file, size)``: never through a symlink, never
    blocking on a FIFO or a device (``O_NONBLOCK``), a regular file only (ValueError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def private_folder(folder: Path) -> None:
    """Makes ``folder`` (and its parents) and leaves it to its owner alone (0700, whatever the
    umask): its files hold prompts' tokens. Only the model's own folder: the root above it may
    be a folder the user shares (``backend.prompt_cache_dir``)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)


def header_bytes(header: dict) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def encode(prompt_cache: List[Any], token_bytes: bytes, identity: str) -> tuple[list, dict]:
    """The arrays and the safetensors header of an entry, in ``save_prompt_cache``'s layout (its
    states flattened, scalars as arrays listed in the metadata), evaluated and contiguous so
    that the writer thread writes their memory as it is."""
    scalars: list = [""]
    flat = []
    for key, value in tree_flatten([c.state for c in prompt_cache]):
        if isinstance(value, mx.array):
            flat.append((key, value))
        elif isinstance(value, (bool, int, float)):
            scalars.append((key, "scalar"))
            flat.append((key, mx.array(value)))
        elif isinstance(value, str):
            scalars.append((key, "string"))
            flat.append((key, mx.array([ord(c) for c in value])))
        elif value is None:
            scalars.append((key, "none"))
            flat.append((key, mx.array([])))
        else:
            raise ValueError(f"a prompt cache state of type {type(value).__name__} cannot be written")
    mx.eval([a for _, a in flat])
    flat = [(k, a if memoryview(a).c_contiguous else mx.contiguous(a)) for k, a in flat]
    mx.eval([a for _, a in flat])
    header: dict = {}
    offset = 0
    arrays = []
    for key, a in sorted(flat):
        header[key] = {"dtype": DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    metadata = {
        "format": FORMAT,
        "model": identity,
        "tokens": base64.b64encode(token_bytes).decode(),
        "trimmable": "1" if can_trim_prompt_cache(prompt_cache) else "0",
        "crc32": "0" * 10,  # the writer fills it in
    }
    classes = [type(c).__name__ for c in prompt_cache]
    header["__metadata__"] = dict(tree_flatten([metadata, classes, scalars]))
    return arrays, header


def runtime_of(model) -> str:
    """How a loaded model computes, for :func:`model_identity`."""
    dtypes = sorted({str(v.dtype) for _, v in tree_flatten(model.parameters())})
    import mlx_lm

    return f"{type(model).__module__}.{type(model).__name__} {dtypes} mlx {mx.__version__} mlx-lm {mlx_lm.__version__} {sys.byteorder}"
