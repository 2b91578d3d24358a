"""The prompt cache's disk tier, with the real demo model: what is read back gives the same
tokens as processing the prompt; bad files are removed, never read; the cap holds."""

import ctypes
import json
import mmap
import os
import shutil
import stat
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import add, full, reference_generate, running
from pensieve_bridge import disk_cache, disk_sweep
from pensieve_bridge.batch import Batcher
from pensieve_bridge.protocol import Added, Caching

SYSTEM = "You are a careful assistant for a coding agent; read the tools first. " * 30
GREEDY = json.dumps({"max_tokens": 12, "temperature": 0})
MEMORY = 64 << 20
DISK = 256 << 20


def chat(question):
    return json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})


def run(batcher):
    out = {}
    while running(batcher):
        for uid, pieces, _ in batcher.step():
            out[uid] = out.get(uid, "") + "".join(p for _, p in pieces)
    return out


@pytest.fixture
def folder(tmp_path):
    yield tmp_path
    disk_cache._tiers.clear()  # the next batcher starts as a restarted process would


def restart():
    disk_cache._tiers.clear()


def batcher(engine, folder, disk=DISK):
    return Batcher(engine, 4, MEMORY, str(folder), disk)


def files(folder):
    """The entry files under ``folder``, every model's."""
    return sorted(folder.rglob("*" + disk_cache.SUFFIX))


def stats(b):
    """The disk tier's counts by name, ``off`` and ``read_seconds``."""
    d = b.disk_stats()._asdict()
    d["off"] = d.pop("off_reason")
    return d


def spill(b):
    """Memory leaves Safe: every entry goes to disk, and its writes finish."""
    b.set_caching(Caching.OFF)
    disk_cache.flush_all(30)
    b.set_caching(Caching.MEMORY)


def test_spilled_entries_are_read_back_after_a_restart_and_answer_as_a_cold_prompt(engine, folder):
    reference = "".join(t for t, _ in reference_generate(engine, engine.render(chat("hello")), GREEDY))
    b = batcher(engine, folder)
    uid, n, cached = add(b, chat("hello"), GREEDY)
    assert cached == 0
    assert run(b)[uid] == reference
    spill(b)
    assert b.prompt_cache_stats() == (0, 0)
    (entry,) = files(folder)
    assert entry.suffix == ".safetensors" and entry.parent.name == engine.identity[:32]
    s = stats(b)
    assert s["entries"] == 1 and s["bytes"] == entry.stat().st_size and s["spills"] == 1 and s["writes"] == 1

    restart()
    b = batcher(engine, folder)
    # The same prompt: its file is read off this thread while the request waits its turn...
    added, *_ = b.add(chat("hello"), full(GREEDY), 0)
    assert added == Added.READING
    assert running(b) == 0
    # ...then every token but the last comes from disk.
    uid, n, cached = add(b, chat("hello"), GREEDY)
    assert cached == n - 1
    assert run(b)[uid] == reference
    # Another question after the same system prompt: the shared prefix from disk (trimmed).
    b.drop_prompt_cache()
    uid, n2, cached2 = add(b, chat("something else"), GREEDY)
    assert 0.8 * n2 < cached2 < n2
    reference2 = "".join(t for t, _ in reference_generate(engine, engine.render(chat("something else")), GREEDY))
    assert run(b)[uid] == reference2
    s = stats(b)
    assert s["hits"] == 2 and s["hit_tokens"] == n - 1 + cached2 and s["read_seconds"] > 0


def on_disk(engine, folder, questions=("one", "two", "three")):
    """A batcher whose answered ``questions`` were spilled: it and their files."""
    b = batcher(engine, folder)
    for q in questions:
        add(b, chat(q), GREEDY)
    run(b)
    spill(b)
    return b, files(folder)


def test_a_truncated_a_corrupted_and_a_foreign_file_are_removed_and_never_read(engine, folder):
    b, (one, two, three) = on_disk(engine, folder)
    data = one.read_bytes()
    one.write_bytes(data[: len(data) - 1000])  # truncated: a crash of another writer, a full disk
    data = bytearray(two.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit in the KV data
    two.write_bytes(bytes(data))
    # A file written for another model, in this model's folder under a valid name.
    foreign = disk_cache.DiskTier(folder / "other", "f" * 64, DISK)
    restart()
    raw = three.read_bytes()
    theirs = raw.replace(engine.identity.encode(), foreign.identity.encode())
    three.write_bytes(theirs)

    restart()
    b = batcher(engine, folder)
    # The truncated and the foreign file are found at start-up, from their headers.
    assert not one.exists() and not three.exists()
    assert two.exists()
    reference = {q: "".join(t for t, _ in reference_generate(engine, engine.render(chat(q)), GREEDY)) for q in ["two"]}
    # The corrupted one is found when it is read: the prompt is processed from memory instead.
    uid, n, cached = add(b, chat("two"), GREEDY)
    assert cached == 0
    assert run(b)[uid] == reference["two"]
    assert not two.exists()
    assert stats(b)["removed"] == 3


def test_fifos_symlinks_and_devices_are_refused_without_blocking_and_files_are_private(engine, folder):
    b, (one, two, three) = on_disk(engine, folder)
    tier = one.parent
    assert tier.stat().st_mode & 0o777 == 0o700, "the model's folder is its owner's alone"
    assert {f.stat().st_mode & 0o777 for f in (one, two, three)} == {0o600}, "files too"
    # A FIFO in an entry's place would block open() forever; a symlink to /dev/zero would be
    # read without end; a symlink to a good entry is still not followed.
    name_one, name_two = one.name, two.name
    one.unlink()
    os.mkfifo(one)
    two.unlink()
    os.symlink("/dev/zero", two)
    restart()
    b = batcher(engine, folder)  # at start-up: refused and removed, in no time
    assert not (tier / name_one).exists() and not os.path.lexists(tier / name_two)
    assert stats(b)["entries"] == 1
    # At run time too: the indexed entry swapped for a FIFO is refused by the reader thread,
    # and the prompt is processed instead.
    three.unlink()
    os.mkfifo(three)
    uid, n, cached = add(b, chat("three"), GREEDY)
    assert cached == 0, "processed, not read from the FIFO"
    run(b)
    assert not os.path.lexists(three) or not stat.S_ISFIFO(os.lstat(three).st_mode)


def test_a_header_changed_on_disk_fails_the_checksum(engine, folder):
    """Two tensors' offsets swapped: the data is intact, the header is not."""
    b, (one,) = on_disk(engine, folder, ["one"])
    raw = one.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"][:2]
    a, c = header[names[0]]["data_offsets"], header[names[1]]["data_offsets"]
    assert a[1] - a[0] == c[1] - c[0], "two tensors of one size"
    header[names[0]]["data_offsets"], header[names[1]]["data_offsets"] = c, a
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (n - len(head))
    assert len(head) == n
    one.write_bytes(raw[:8] + head + raw[8 + n :])
    restart()
    b = batcher(engine, folder)
    uid, _, cached = add(b, chat("one"), GREEDY)
    assert cached == 0, "the swapped entry is never used"
    run(b)
    assert not one.exists() and stats(b)["removed"] == 1


def test_two_servers_sharing_a_folder_hold_the_cap_together(engine, folder):
    """Two processes on one folder, each with its own index of it (two tiers, as two servers
    open them): each write keeps the folder's entries under the cap, whoever wrote them."""
    b, (one,) = on_disk(engine, folder, ["one"])
    cap = int(one.stat().st_size * 2.5)  # room for two entries
    one.unlink()
    restart()
    mine = batcher(engine, folder, cap)
    restart()  # the next batcher opens a tier of its own on the same folder
    theirs = batcher(engine, folder, cap)
    assert mine._disk is not theirs._disk
    for i, b in enumerate([mine, theirs, mine, theirs, mine]):
        add(b, chat(f"question {i}"), GREEDY)
        run(b)
        spill(b)
        total = sum(f.stat().st_size for f in files(folder))
        assert total <= cap, f"{total} bytes on disk over the cap of {cap} after write {i}"
    assert len(files(folder)) == 2


def test_the_cap_holds_and_the_least_recently_used_entry_goes_first(engine, folder):
    b = batcher(engine, folder)
    add(b, chat("q0"), GREEDY)
    run(b)
    spill(b)
    (first,) = files(folder)
    size = first.stat().st_size
    cap = int(size * 2.5)  # room for two entries
    restart()
    b = batcher(engine, folder, cap)
    for i in range(1, 5):
        add(b, chat(f"q{i}"), GREEDY)
        run(b)
        spill(b)
        assert sum(p.stat().st_size for p in files(folder)) <= cap
        assert stats(b)["bytes"] <= cap
    assert len(files(folder)) == 2
    # An entry larger than the whole cap is not written.
    restart()
    b = batcher(engine, folder, size // 2)
    assert files(folder) == []  # the cap was lowered: start-up brought the folder under it
    add(b, chat("q9"), GREEDY)
    run(b)
    spill(b)
    assert files(folder) == []


def test_a_folder_that_cannot_be_written_turns_the_tier_off_and_serving_goes_on(engine, folder):
    blocker = folder / "not-a-folder"
    blocker.write_bytes(b"")  # the tier's folder would be under a file: mkdir fails
    b = batcher(engine, blocker / "cache")
    assert "cannot be written" in stats(b)["off"]
    uid, n, cached = add(b, chat("hello"), GREEDY)
    assert run(b)[uid]
    spill(b)
    uid, n, cached = add(b, chat("hello"), GREEDY)
    assert cached == 0  # nothing on disk, nothing in memory: served all the same
    run(b)


def test_folders_of_the_models_earlier_identities_are_removed_when_it_opens(engine, folder):
    """A changed model file or an MLX upgrade gives the model a new identity: its old folder
    could never be read again, so it goes, unless a live process uses it. Other models' folders,
    folders without a marker and files that are not the tier's stay."""
    b = batcher(engine, folder)
    add(b, chat("hello"), GREEDY)
    run(b)
    spill(b)
    (entry,) = files(folder)
    mine = entry.parent
    dead = subprocess.Popen(["true"])
    dead.wait()

    def old(name, source, pid, extra=()):
        d = folder / name
        d.mkdir()
        shutil.copy(entry, d / entry.name)
        (d / f".{entry.name}.{dead.pid}.tmp").write_bytes(b"half")  # a crash mid-write
        for f in extra:
            (d / f).write_bytes(b"not the tier's")
        (d / disk_sweep.MARK).write_text(json.dumps({"source": source, "pid": pid}))
        return d

    earlier = old("a" * 32, engine.source, dead.pid)
    with_notes = old("b" * 32, engine.source, dead.pid, ["notes.txt"])
    other_model = old("c" * 32, "/models/other.gguf", dead.pid)
    in_use = old("d" * 32, engine.source, os.getppid())  # another live server, on an older MLX
    unmarked = folder / ("e" * 32)
    unmarked.mkdir()
    shutil.copy(entry, unmarked / entry.name)

    restart()
    b = batcher(engine, folder)
    assert not earlier.exists()
    assert [p.name for p in with_notes.iterdir()] == ["notes.txt"]
    for kept in (other_model, in_use, unmarked):
        assert (kept / entry.name).exists(), kept
    assert json.loads((mine / disk_sweep.MARK).read_text()) == {"source": engine.source, "pid": os.getpid()}
    # The model's own folder is untouched: its entry is read.
    uid, n, cached = add(b, chat("hello"), GREEDY)
    assert cached == n - 1
    run(b)


def test_a_written_entry_is_freed_on_the_backend_thread_and_nothing_is_left_in_mlxs_cache(engine, folder):
    """The writer thread hands the arrays back and keeps no reference of its own: once the
    write is done, the backend thread frees them and clears MLX's cache. (The writer's last job
    used to hold its arrays until the next one arrived, then free them on the writer thread, into
    MLX's cache after its last clearing: 248 KB found at idle by the 1 MB-cap soak.)"""
    b = batcher(engine, folder)
    mx.clear_cache()
    before = mx.get_active_memory()
    for q in ["one", "two"]:
        add(b, chat(q), GREEDY)
        run(b)
        held = b.prompt_cache_stats()[0]
        assert held > 100_000
        spill(b)
        assert b.prompt_cache_stats() == (0, 0)
        assert mx.get_active_memory() <= before + 16_384, (q, mx.get_active_memory() - before, held)
        assert mx.get_cache_memory() == 0
    assert stats(b)["writes"] == 2


def test_at_warning_finished_generations_go_straight_to_disk_and_beyond_it_nowhere(engine, folder):
    """Memory at Warning keeps no prompt cache, but a session's next turn should not process
    its whole prompt again: each finished generation (or one whose client left) is written to
    disk, and read back when the next turn comes. At Critical nothing is written."""
    b = batcher(engine, folder)
    b.set_caching(Caching.DISK)
    uid, n, _ = add(b, chat("hello"), GREEDY)
    reference = run(b)[uid]
    disk_cache.flush_all(30)
    assert b.prompt_cache_stats() == (0, 0)
    assert len(files(folder)) == 1 and stats(b)["writes"] == 1
    # A client that leaves mid-answer: what was computed goes to disk too.
    uid, *_ = add(b, chat("a question whose answer is cut"), GREEDY)
    b.step()
    b.cancel([uid], keep=True)
    disk_cache.flush_all(30)
    assert len(files(folder)) == 2 and b.prompt_cache_stats() == (0, 0)
    # Critical: nothing is kept anywhere.
    b.set_caching(Caching.OFF)
    add(b, chat("at critical"), GREEDY)
    run(b)
    disk_cache.flush_all(30)
    assert len(files(folder)) == 2 and b.prompt_cache_stats() == (0, 0)
    # The next turn reads every token but the last from disk, and answers the same.
    b.set_caching(Caching.MEMORY)
    uid, n, cached = add(b, chat("hello"), GREEDY)
    assert cached == n - 1
    assert run(b)[uid] == reference


def resident(path):
    """Pages of ``path`` in the page cache (``mincore``, which faults nothing in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = path.stat().st_size
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    try:
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
    finally:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    return sum(v & 1 for v in vec), pages


@pytest.fixture
def disk_folder():
    """A folder on a disk (under the repository), not on tmpfs, whose pages are memory itself."""
    path = Path(__file__).resolve().parents[2] / ".cache" / f"test-page-cache-{os.getpid()}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path)
    disk_cache._tiers.clear()


def test_the_tiers_files_leave_the_page_cache_once_written_and_once_read(engine, disk_folder):
    """The tier moves bytes out of memory: a file's pages are not left in the page cache (which
    a memory cgroup charges to the server, and counts as in use once a page is read twice)."""
    folder = disk_folder
    b = batcher(engine, folder)
    add(b, chat("hello"), GREEDY)
    run(b)
    spill(b)
    (entry,) = files(folder)
    n, pages = resident(entry)
    assert pages > 100 and n <= 1, (n, pages)  # written, synced, dropped
    entry.read_bytes()  # as a backup tool or a grep would
    assert resident(entry)[0] == pages
    restart()
    b = batcher(engine, folder)
    uid, n_tokens, cached = add(b, chat("hello"), GREEDY)
    assert cached == n_tokens - 1
    run(b)
    assert resident(entry)[0] <= 1, resident(entry)
