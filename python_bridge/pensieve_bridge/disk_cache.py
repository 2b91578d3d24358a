"""The disk tier of the prompt cache: KV caches that survive memory pressure and restarts.

The memory tier (:mod:`~pensieve_bridge.prompt_cache`) hands an entry here instead of dropping
it: when memory leaves Safe, when its own cap evicts it, when its model is unloaded and when the
server stops. An entry is one file, ``<sha256 of its tokens>.safetensors``, in the layout of
mlx-lm's ``save_prompt_cache`` (so that ``load_prompt_cache`` reads it back), under a folder
named by the model's identity (:func:`~pensieve_bridge.disk_format.model_identity`): another model, or a changed file, never
finds it. Its metadata holds the format, the identity, the tokens and a CRC-32 of the data.

- **Writes are off the batch loop.** :meth:`DiskTier.spill` runs on the backend thread and costs
  no copy: it takes the entry's arrays (already evaluated, owned) and queues them. One writer
  thread per tier writes them with plain file I/O (no MLX call off the backend thread), to a
  temporary file that is synced and renamed into place, so that a crash never leaves a half
  file under an entry's name; its pages leave the page cache, after writes and reads alike. The
  written arrays go back to the backend thread, which frees them there (:meth:`DiskTier.poll`).
- **Reads are on a memory miss**, mostly off the batch loop: the longest common prefix among
  the entries (an entry longer than the prompt is trimmed, as in memory), when it covers
  :data:`MIN_GAIN` tokens more than memory does. A reader thread reads the file and checks it
  (identity, tokens, size, CRC) while the request waits and the batch runs on
  (:meth:`DiskTier.read`); then the backend thread hands the bytes to ``load_prompt_cache``. A
  file that fails any check is removed with a warning, and the prompt is processed as if it
  were not there.
- **Across restarts** the folder is scanned at start-up: headers only, never the data.
  Temporary files of dead processes, truncated files, foreign files are removed.
- **Bounded.** Files are removed least recently used first (a read counts as a use, kept across
  restarts as the file's mtime) so that the folder never holds more than its cap, counting the
  file being written; the folders of a model's earlier identities (its files changed, MLX was
  upgraded) are removed when it opens (:mod:`~pensieve_bridge.disk_sweep`). A full disk or a
  folder that cannot be written turns the tier off with a warning; serving goes on with memory
  alone.

Tiers live in this module (:func:`open_tier`), one per folder, so that a model unloaded and
loaded again finds its index and its counters as they were.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import mlx.core as mx
from mlx_lm.models.cache import load_prompt_cache, trim_prompt_cache

from . import disk_sweep
from .disk_format import (
    FORMAT,
    SUFFIX,
    TMP,
    common_prefix,
    encode,
    entry_name,
    header_bytes,
    header_crc,
    open_entry,
    out_of_page_cache,
    private_folder,
    tokens_bytes,
)
from .protocol import DiskStats

log = logging.getLogger(__name__)

#: Entries shorter than this many tokens are not written: processing them again is as cheap.
MIN_TOKENS = 64
#: A disk entry is read only when it covers this many prompt tokens more than memory does.
MIN_GAIN = 32
#: Seconds a finished read waits for its request to take it.
READ_KEPT = 30.0
#: Seconds writes pause after the disk was full (ENOSPC, EDQUOT); then they are tried again.
FULL_PAUSE = 10.0
_tiers: dict = {}
_tiers_lock = threading.Lock()


def default_root() -> Path:
    """``prompt-cache`` in pensieve's state folder (:mod:`pensieve_bridge.paths`)."""
    from .paths import prompt_cache_dir

    return prompt_cache_dir()


def open_tier(root: str, identity: str, max_bytes: int, source: str = "") -> "DiskTier":
    """The tier of this model identity under ``root`` (``""``: :func:`default_root`), made once
    per process. With ``source`` (the model's resolved path, or its Hugging Face id), the folder
    is marked as that model's, and the folders of its earlier identities are removed
    (:mod:`~pensieve_bridge.disk_sweep`)."""
    folder = (Path(root) if root else default_root()) / identity[:32]
    with _tiers_lock:
        tier = _tiers.get(folder)
        if tier is None:
            tier = _tiers[folder] = DiskTier(folder, identity, max_bytes)
            if source and tier.off is None:
                _mark_and_sweep(tier, source)
        tier.max_bytes = max_bytes
        return tier


def _mark_and_sweep(tier: "DiskTier", source: str) -> None:
    try:
        disk_sweep.mark(tier.folder, source)
    except OSError as e:
        log.warning("could not mark the prompt cache folder %s as %s's: %s", tier.folder, source, e)
        return
    files, nbytes = disk_sweep.sweep(tier.folder.parent, tier.folder, source, _tiers, (SUFFIX, TMP))
    if files:
        log.info("prompt cache on disk: %d files, %.1f MB of %s's earlier identities removed", files, nbytes / 1e6, source)


def flush_all(timeout: float) -> None:
    """Waits up to ``timeout`` seconds for every tier's writes (at shutdown), then frees what
    they held."""
    deadline = time.monotonic() + timeout
    for tier in list(_tiers.values()):
        tier.flush(max(0.0, deadline - time.monotonic()))


@dataclass
class Entry:
    """An entry on disk, from its file's header."""

    tokens: bytes
    nbytes: int
    trimmable: bool
    #: Where its data starts in the file, and the CRC-32 of its header and data.
    data_start: int
    crc: int
    #: The CRC-32 of its header alone (:func:`header_crc`): where the data's CRC starts.
    header_crc: int


@dataclass
class Hit:
    """An entry worth reading for a prompt."""

    name: str
    #: Prompt tokens it gives.
    covered: int
    #: Tokens it holds (more than ``covered`` when it is trimmed).
    length: int


@dataclass
class Read:
    """A file being read by the reader thread."""

    #: When it was asked for; when it finished, once done.
    since: float
    done: bool = False
    data: Optional[bytes] = None
    error: Optional[Exception] = None
    seconds: float = 0.0


@dataclass
class Job:
    name: str
    tokens: bytes
    arrays: list
    header: dict
    nbytes: int


class DiskTier:
    """One model's entries on disk. See the module docs."""

    def __init__(self, folder: Path, identity: str, max_bytes: int):
        self.folder = folder
        self.identity = identity
        self.max_bytes = max_bytes
        self.off: Optional[str] = None
        #: Writes paused until then (``time.monotonic()``), and why: the disk was full.
        self._full_until = 0.0
        self._full_reason = ""
        self._lock = threading.Lock()
        self._index: "OrderedDict[str, Entry]" = OrderedDict()  # least recently used first
        self._bytes = 0
        self._pending: dict = {}  # name -> bytes, queued or being written
        self._queue: queue.Queue = queue.Queue()
        self._written: list = []  # arrays written, for the backend thread to free
        self._thread: Optional[threading.Thread] = None
        self._reads: dict = {}  # name -> Read
        self._read_queue: queue.Queue = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self.hits = self.hit_tokens = self.spills = self.spilled_bytes = 0
        self.writes = self.removed = 0
        self.read_seconds = self.write_seconds = 0.0
        try:
            private_folder(folder)
            probe = folder / f".probe{os.getpid()}{TMP}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            self._turn_off(f"the folder {folder} cannot be written ({e})")
            return
        self._scan()

    # -- the index ---------------------------------------------------------------------------

    def _scan(self) -> None:
        """Reads every entry's header (not its data); removes what cannot be used."""
        found = []
        for path in self.folder.iterdir():
            if path.name.endswith(TMP):
                if disk_sweep.writer_gone(path):  # a crash mid-write
                    path.unlink(missing_ok=True)
                continue
            if not path.name.endswith(SUFFIX):
                continue
            try:
                f, size = open_entry(path)
                with f:
                    entry = self._check_header(path.name, f, size)
                    mtime = os.fstat(f.fileno()).st_mtime
            except Exception as e:  # whatever is wrong with the file, it is not used
                self._discard(path, str(e))
                continue
            found.append((mtime, path.name, entry))
        for _, name, entry in sorted(found):
            self._index[name] = entry
            self._bytes += entry.nbytes
        self._make_room(0)
        if self._index:
            log.info("prompt cache on disk: %d entries, %.1f MB in %s", len(self._index), self._bytes / 1e6, self.folder)

    def _check_header(self, name: str, f, size: int) -> Entry:
        """The entry a file holds, from its header; ValueError says what is wrong with it."""
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 64 << 20:
            raise ValueError("truncated header")
        header = json.loads(f.read(n))
        meta = header.get("__metadata__", {})
        if meta.get("0.format") != FORMAT:
            raise ValueError(f"not a pensieve prompt cache file ({FORMAT})")
        if meta.get("0.model") != self.identity:
            raise ValueError("written for another model")
        tokens = base64.b64decode(meta["0.tokens"])
        if entry_name(tokens) != name:
            raise ValueError("its tokens do not match its name")
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"truncated: {size} bytes where its header says {8 + n + end}")
        return Entry(tokens, size, meta.get("0.trimmable") == "1", 8 + n, int(meta["0.crc32"]), header_crc(header))

    def _make_room(self, need: int) -> bool:
        """Removes least recently used entries until ``need`` more bytes fit under the cap."""
        if need > self.max_bytes:
            return False
        while self._index and self._bytes + sum(self._pending.values()) + need > self.max_bytes:
            name, entry = self._index.popitem(last=False)
            self._bytes -= entry.nbytes
            (self.folder / name).unlink(missing_ok=True)
        return self._bytes + sum(self._pending.values()) + need <= self.max_bytes

    def _discard(self, path: Path, why: str) -> None:
        log.warning("prompt cache file %s skipped and removed: %s", path, why)
        self.removed += 1
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass

    def _paused(self) -> str:
        """Why writes are paused now (the disk was full), else ""."""
        return self._full_reason if time.monotonic() < self._full_until else ""

    def _turn_off(self, why: str) -> None:
        if self.off is None:
            log.warning("the prompt cache's disk tier is off: %s; serving goes on with the memory tier alone", why)
        self.off = why

    # -- reading -----------------------------------------------------------------------------

    def lookup(self, tokens: List[int], in_memory: Callable[[], int]) -> Optional["Hit"]:
        """The entry sharing the longest prefix with ``tokens``, when it covers more than
        ``in_memory() + MIN_GAIN`` of them (what memory gives, asked only when disk has a
        candidate, and what makes a read worth it). As in memory, an exact match gives up its
        last token (which must go through the model for the first logits). A search of the
        index only: nothing is read."""
        if self.off is not None or not self._index:
            return None
        want = tokens_bytes(tokens)
        best = None
        head = want[: 4 * MIN_GAIN]
        with self._lock:
            for name, entry in self._index.items():
                if not entry.tokens.startswith(head):
                    continue  # fewer than MIN_GAIN tokens in common: never worth a read
                length = len(entry.tokens) // 4
                common = min(common_prefix(entry.tokens, want), len(tokens) - 1)
                if length > common and not entry.trimmable:
                    continue
                if common > (best.covered if best else MIN_GAIN):
                    best = Hit(name, common, length)
        if best is None or best.covered <= in_memory() + MIN_GAIN:
            return None
        return best

    def read(self, hit: "Hit"):
        """``(ready, cache)`` for a :meth:`lookup` hit. The first call starts reading its file
        on the reader thread (read, header and CRC checked) and says not ready; once the bytes
        are in, a call loads them into MLX arrays here (the backend thread), trimmed to
        ``hit.covered``: the cache, or None when the file turned out bad (it is removed)."""
        with self._lock:
            pending = self._reads.get(hit.name)
            if pending is None:
                self._reads[hit.name] = Read(time.monotonic())
            elif pending.done:
                del self._reads[hit.name]
        if pending is None:
            self._read_queue.put(hit.name)
            if self._reader is None:
                self._reader = threading.Thread(target=self._read_files, name="pensieve-prompt-cache-reader", daemon=True)
                self._reader.start()
            return False, None
        if not pending.done:
            return False, None
        started = time.perf_counter()
        try:
            if pending.error is not None:
                raise pending.error
            buffer = io.BytesIO(pending.data)
            buffer.name = hit.name  # MLX picks the format by the name's suffix
            cache = load_prompt_cache(buffer, return_metadata=False)
            mx.eval([c.state for c in cache])
            offsets = {getattr(c, "offset", hit.length) for c in cache}
            if offsets != {hit.length}:
                raise ValueError(f"its cache covers {sorted(offsets)} tokens, not {hit.length}")
        except Exception as e:  # whatever is wrong with the file, it is not used
            self._forget(hit.name, e)
            return True, None
        finally:
            self.read_seconds += pending.seconds + time.perf_counter() - started
        if hit.length > hit.covered:
            trim_prompt_cache(cache, hit.length - hit.covered)
        with self._lock:
            if hit.name in self._index:
                self._index.move_to_end(hit.name)
            self.hits += 1
            self.hit_tokens += hit.covered
        try:
            os.utime(self.folder / hit.name)  # least recently used across restarts
        except OSError:
            pass
        return True, cache

    def _read_files(self) -> None:
        """The reader thread: file bytes and their checks, no MLX."""
        while True:
            name = self._read_queue.get()
            with self._lock:
                pending = self._reads.get(name)
            if pending is None:
                continue
            started = time.perf_counter()
            try:
                with self._lock:
                    indexed = self._index.get(name)
                if indexed is None:
                    raise FileNotFoundError(name)
                f, size = open_entry(self.folder / name)
                with f:
                    if size != indexed.nbytes:
                        raise ValueError(f"{size} bytes where {indexed.nbytes} were indexed")
                    data = f.read(indexed.nbytes + 1)  # never more than the index says
                    out_of_page_cache(f.fileno(), sync=False)
                if len(data) != indexed.nbytes:
                    raise ValueError(f"{len(data)} bytes read where {indexed.nbytes} were indexed")
                entry = self._check_header(name, io.BytesIO(data), len(data))
                if zlib.crc32(memoryview(data)[entry.data_start :], entry.header_crc) != entry.crc:
                    raise ValueError("its header and data do not match its checksum")
                pending.data = data
            except Exception as e:
                pending.error = e
            pending.seconds = time.perf_counter() - started
            pending.since = time.monotonic()  # kept READ_KEPT from now for its request
            pending.done = True

    def _forget(self, name: str, error: Exception) -> None:
        """A file that could not be used: out of the index, and removed unless it is gone."""
        with self._lock:
            gone = self._index.pop(name, None)
            if gone is not None:
                self._bytes -= gone.nbytes
        path = self.folder / name
        if isinstance(error, FileNotFoundError):
            log.info("prompt cache file %s is gone (another process sharing the folder removed it)", path)
        else:
            self._discard(path, str(error))

    # -- writing -----------------------------------------------------------------------------

    def spill(self, tokens: List[int], prompt_cache: List[Any]) -> bool:
        """Queues an entry for writing (unless it is on disk already, too short or too big);
        True when it is, or will be, on disk. On the backend thread; no copy."""
        if self.off is not None or len(tokens) < MIN_TOKENS or time.monotonic() < self._full_until:
            return False
        token_bytes = tokens_bytes(tokens)
        name = entry_name(token_bytes)
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
                self.spills += 1
                return True
            if name in self._pending:
                return True
        arrays, header = encode(prompt_cache, token_bytes, self.identity)
        nbytes = 8 + len(header_bytes(header)) + sum(a.nbytes for a in arrays)
        with self._lock:
            if not self._make_room(nbytes):
                return False
            self._pending[name] = nbytes
            self.spills += 1
            self.spilled_bytes += nbytes
        self._queue.put(Job(name, token_bytes, arrays, header, nbytes))
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="pensieve-prompt-cache-writer", daemon=True)
            self._thread.start()
        return True

    def _writer(self) -> None:
        while True:
            job: Job = self._queue.get()
            try:
                if self.off is None:
                    self._write(job)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    # A full disk empties again: writes pause, then are tried again.
                    self._full_reason = f"writes paused for {FULL_PAUSE:.0f} s: the disk is full ({e})"
                    if time.monotonic() >= self._full_until:
                        log.warning("the prompt cache's disk tier: %s", self._full_reason)
                    self._full_until = time.monotonic() + FULL_PAUSE
                else:
                    self._turn_off(f"writing to {self.folder} failed ({e})")
            finally:
                with self._lock:
                    self._pending.pop(job.name, None)
                    # Handed over whole: this thread keeps no reference, or the last one
                    # dropped here would free MLX memory off the backend thread, into MLX's
                    # cache after its last clearing.
                    self._written.append(job.arrays)
                    job.arrays = []
                self._queue.task_done()

    def _write(self, job: Job) -> None:
        started = time.perf_counter()
        head_crc = crc = header_crc(job.header)
        for a in job.arrays:
            crc = zlib.crc32(a, crc)
        job.header["__metadata__"]["0.crc32"] = f"{crc:010d}"  # as long as the placeholder
        tmp = self.folder / f".{job.name}.{os.getpid()}{TMP}"
        head = header_bytes(job.header)
        try:
            # 0600 whatever the umask: the file holds the prompt's tokens.
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "wb") as f:
                f.write(struct.pack("<Q", len(head)))
                f.write(head)
                for a in job.arrays:
                    f.write(a)
                f.flush()
                out_of_page_cache(f.fileno(), sync=True)
            os.replace(tmp, self.folder / job.name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            trimmable = job.header["__metadata__"]["0.trimmable"] == "1"
            self._index[job.name] = Entry(job.tokens, job.nbytes, trimmable, 8 + len(head), crc, head_crc)
            self._bytes += job.nbytes
            self.writes += 1
            self.write_seconds += time.perf_counter() - started
        self._hold_folder_cap()

    def _hold_folder_cap(self) -> None:
        """The cap holds for the folder, not only for this process's entries: another server
        sharing it writes there too. After each write (on the writer thread), the oldest files
        (by modification time, which a read refreshes) go until the folder's entries fit."""
        files = []
        try:
            with os.scandir(self.folder) as it:
                for e in it:
                    if e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        files.append((st.st_mtime, e.name, st.st_size))
        except OSError:
            return
        total = sum(size for _, _, size in files)
        for _, name, size in sorted(files):
            if total <= self.max_bytes:
                break
            with self._lock:
                gone = self._index.pop(name, None)
                if gone is not None:
                    self._bytes -= gone.nbytes
            (self.folder / name).unlink(missing_ok=True)
            total -= size

    def poll(self) -> int:
        """Frees, on the backend thread, what finished writes held; returns the bytes still
        queued for writing."""
        now = time.monotonic()
        with self._lock:
            written, self._written = self._written, []
            pending = sum(self._pending.values())
            for name in [n for n, r in self._reads.items() if r.done and now - r.since > READ_KEPT]:
                del self._reads[name]  # read for a request that left before taking it
        if written:
            del written
            mx.clear_cache()
        return pending

    def flush(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds for the queued writes, then frees what they held."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._pending:
            log.warning("the prompt cache's disk writes did not finish in %.0f s: %d entries not written", timeout, len(self._pending))
        self.poll()

    def stats(self) -> DiskStats:
        """For ``/health`` and ``/metrics``: a :class:`~pensieve_bridge.protocol.DiskStats`."""
        pending = self.poll()
        with self._lock:
            return DiskStats(
                folder=str(self.folder), off_reason=self.off or self._paused(), entries=len(self._index), bytes=self._bytes,
                max_bytes=self.max_bytes, pending_bytes=pending, hits=self.hits, hit_tokens=self.hit_tokens,
                spills=self.spills, spilled_bytes=self.spilled_bytes, writes=self.writes, removed=self.removed,
                read_seconds=self.read_seconds, write_seconds=self.write_seconds,
            )
