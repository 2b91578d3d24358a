"""The prompt cache's disk tier: time to first token on Claude Code's recorded request, cold and
warm from each tier, and what a spill costs a running stream.

Run with ``make bench`` (or ``.venv/bin/python benches/disk_cache.py [MODEL]`` after ``make
build``; MODEL is ``demo`` by default, or a folder or GGUF file). Needs root and cgroup v1
memory limits (``/sys/fs/cgroup/memory``): the server runs in a memory cgroup of its own, where
an allocator process takes memory out of Safe for real.

Every round uses Claude Code's request (``tests/fixtures/claude-code-request.json``: its system
prompt and 12 tools), its texts that the fixture cut short (``…(7010 chars)``) filled back to
their recorded lengths with filler words (``FULL=0`` keeps them cut), with a round number put
before the system prompt, so that each round's cold start is cold, and measures the time to the first text token of a stream (``max_tokens``
2):

1. **cold**: a new prompt on a server with an empty disk folder;
2. **warm, memory**: the same request again;
3. **warm, disk after a restart**: SIGTERM (the stop writes the prompt cache out), a new server
   on the same folder, the same request;
4. **warm, disk after leaving Safe**: the allocator takes memory to Warning (the prompt cache
   goes to disk), memory is freed, Safe again, the same request.

Before step 4 the session's next turn puts a new entry in memory (for the spill to write), and
during step 4 a stream of another prompt runs; its inter-token gaps are recorded, and the
largest gap while the spill is written is compared with the stream's median gap, and with the
same steps on a server whose disk tier is off (leaving Safe drops the entry instead): the
control, which separates the spill's cost from the allocation's and the tier change's.

5. **the next turn at Warning**: while memory is still at Warning (after the stream of step 4),
   a turn that brings a tool result of :data:`TOOL_RESULT_WORDS` words (turn A), then the turn
   after it (turn B). At Warning each finished generation is written to disk, so B reads A's
   whole prompt from disk; the control is B after a variant of A that was never sent, which
   reads only the prefix that memory spilled when it left Safe and processes the tool result
   again: what every turn at Warning cost before finished generations were written there.

Medians over ``ROUNDS`` rounds (default 5) are printed, with each warm time as a fraction of
cold (the goal: disk ≤ ¼ of cold).
"""

import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "pensieve"
ROUNDS = int(os.environ.get("ROUNDS", "5"))
MODEL = sys.argv[1] if len(sys.argv) > 1 else "demo"
#: The shortest window whose inter-token gaps are compared.
WINDOW = 0.5
CGROUP = Path(f"/sys/fs/cgroup/memory/pensieve-bench-disk-{os.getpid()}")
LIMIT = int(os.environ.get("LIMIT_MB", "3072")) << 20
ENV = {
    "PENSIEVE_MEMORY__WARNING_GB": "1.4",
    "PENSIEVE_MEMORY__CRITICAL_GB": "0.6",
    "PENSIEVE_MEMORY__EMERGENCY_GB": "0.3",
    "PENSIEVE_MEMORY__SAMPLE_INTERVAL_MS": "50",
    "PENSIEVE_LOG__LEVEL": "warn,pensieve::server=info",
}
ALLOCATOR = """
import sys
chunks = []
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "alloc":
        chunks.append(bytearray(int(cmd[1]) << 20))  # zero pages: touched, so charged
        for c in chunks[-1:]:
            c[::4096] = b"x" * len(c[::4096])
    elif cmd[0] == "free":
        chunks.clear()
    print("ok", flush=True)
"""


FULL = os.environ.get("FULL", "1") == "1"
#: The words of the tool result in step 5's turn A.
TOOL_RESULT_WORDS = 1500
WORDS = "file read write edit tool call shell command test build commit branch merge diff patch".split()


def fill(match):
    """``n`` characters of filler words for a ``…(n chars)`` the fixture cut."""
    rnd = random.Random(int(match.group(1)))
    out = ""
    while len(out) < int(match.group(1)):
        out += rnd.choice(WORDS) + " "
    return out[: int(match.group(1))]


def restore(value):
    if isinstance(value, str):
        return re.sub(r"…\((\d+) chars\)", fill, value)
    if isinstance(value, list):
        return [restore(v) for v in value]
    if isinstance(value, dict):
        return {k: restore(v) for k, v in value.items()}
    return value


def request(round_, question="say hi", max_tokens=2):
    body = json.loads((ROOT / "tests" / "fixtures" / "claude-code-request.json").read_text())["body"]
    if FULL:
        body = restore(body)
    body.update(stream=True, max_tokens=max_tokens, temperature=0)
    body["system"][1]["text"] = f"Round {round_}. " + body["system"][1]["text"]
    body["messages"][0]["content"][1]["text"] = question
    return body


def with_tool_result(round_, seed, more=()):
    """Claude Code's request after a file was read: the question, an answer, the file's text
    (``seed`` picks its words), and ``more`` messages."""
    body = request(round_, "read src/main.rs and tell me what it does")
    rnd = random.Random(seed)
    text = " ".join(rnd.choice(WORDS) for _ in range(TOOL_RESULT_WORDS))
    body["messages"] += [
        {"role": "assistant", "content": "Reading it."},
        {"role": "user", "content": f"src/main.rs:\n{text}"},
        *more,
    ]
    return body


def warning_turns(server, round_, turns, hold):
    """Step 5, at Warning: ``(TTFT, tokens read)`` of turn B after turn A was written, and of
    the control (B after a turn A that was never sent), go to ``turns``. ``hold()`` takes
    memory back to Warning before each turn (a spill frees memory) and returns the tier."""
    more = [{"role": "assistant", "content": "It starts the server."}, {"role": "user", "content": "now run the tests"}]
    disk = lambda: server.health()["backend"]["prompt_cache_disk"]  # noqa: E731

    def settle():
        # A write holds its entry's bytes until it is done; the load check counts them.
        wait_for("the writes", lambda: disk()["pending_bytes"] == 0)
        time.sleep(0.3)

    def turn(body):
        tier = hold()
        assert tier == "Warning", f"step 5 needs Warning, not {tier}"
        out = server.stream(body)
        settle()
        return out

    writes = disk()["writes"]
    turn(with_tool_result(round_, "a"))
    assert disk()["writes"] > writes, "turn A was not written"
    t, usage = turn(with_tool_result(round_, "a", more))
    c, control = turn(with_tool_result(round_, "b", more))
    turns.append((t, usage["cache_read_input_tokens"], c, control["cache_read_input_tokens"],
                  usage["input_tokens"] + usage["cache_read_input_tokens"]))


class Server:
    def __init__(self, folder, disk=True):
        args = [str(BIN), "serve", "--port", "0", "--model", MODEL]
        env = {**os.environ, **ENV, "PENSIEVE_BACKEND__PROMPT_CACHE_DIR": str(folder)}
        if not disk:
            env["PENSIEVE_BACKEND__PROMPT_CACHE_DISK_MB"] = "0"
        self.proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *args],
            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env,
        )
        for line in self.proc.stderr:
            if "pensieve is serving" in line:
                self.port = int(line.rsplit("127.0.0.1:", 1)[1].split()[0].strip('"'))
                break
        else:
            raise RuntimeError("pensieve did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def health(self):
        return json.load(urllib.request.urlopen(self.url("/health")))

    def stream(self, body, on_token=None):
        """``(seconds to the first text token, usage of message_start)``; ``on_token(time)``
        for every text event, until it returns True (the stream is then closed)."""
        req = urllib.request.Request(self.url("/v1/messages"), json.dumps(body).encode(), {"content-type": "application/json"})
        started = time.perf_counter()
        first = None
        usage = None
        try:
            res = urllib.request.urlopen(req)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{e.code}: {e.read().decode()}") from None
        with res:
            for raw in res:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event["type"] == "message_start":
                    usage = event["message"]["usage"]
                if event["type"] == "content_block_delta":
                    now = time.perf_counter()
                    first = first or now - started
                    if on_token and on_token(now):
                        break
        return first, usage

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def wait_for(what, check, timeout=120):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def spill_round(server, round_, gaps, disk=True, at_warning=lambda hold: None):
    """Takes memory out of Safe while a stream runs, then back. The largest inter-token gap in
    the window from the allocation that left Safe to the entry written (``disk``) or dropped
    (the disk tier off), and at least :data:`WINDOW` long, goes to ``gaps``; ``at_warning(hold)``
    runs after the stream, before memory is freed."""
    alloc = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", sys.executable, "-c", ALLOCATOR],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    # The session's next turn: an entry that is in memory only, for the spill to write.
    server.stream(request(round_, "now list the files"))
    times = []
    done = threading.Event()

    def on_token(t):
        times.append(t)
        return done.is_set()

    body = request(f"{round_}-stream", "write a long story", max_tokens=100_000)
    stream = threading.Thread(target=lambda: server.stream(body, on_token), daemon=True)
    stream.start()
    wait_for("the stream", lambda: len(times) > 20)
    spills = server.health()["backend"]["prompt_cache_disk"]["spills"]
    start = None
    backend = lambda: server.health()["backend"]  # noqa: E731
    while server.health()["memory"]["status"] == "Safe":
        start = time.perf_counter()  # the tier can change only after this allocation
        alloc.stdin.write("alloc 20\n")
        alloc.stdin.flush()
        alloc.stdout.readline()
    if disk:
        wait_for("the spill", lambda: backend()["prompt_cache_disk"]["spills"] > spills)
        wait_for("the write", lambda: backend()["prompt_cache_disk"]["pending_bytes"] == 0)
    else:
        wait_for("the drop", lambda: backend()["prompt_cache_bytes"] == 0)
    end = max(time.perf_counter(), start + WINDOW)
    stats = backend()["prompt_cache_disk"]
    time.sleep(max(0.0, end - time.perf_counter()) + 0.5)
    done.set()
    stream.join(timeout=30)

    def hold():
        while server.health()["memory"]["status"] == "Safe":
            alloc.stdin.write("alloc 20\n")
            alloc.stdin.flush()
            alloc.stdout.readline()
            time.sleep(0.2)
        return server.health()["memory"]["status"]

    at_warning(hold)
    alloc.stdin.write("free\n")
    alloc.stdin.flush()
    alloc.stdout.readline()
    alloc.stdin.close()
    alloc.wait()
    wait_for("Safe", lambda: server.health()["memory"]["status"] == "Safe")
    before = [b - a for a, b in zip(times, times[1:]) if b < start]
    during = [b - a for a, b in zip(times, times[1:]) if start <= b <= end + 0.05]
    gaps.append((statistics.median(before[-50:]), max(during) if during else 0.0, stats["write_seconds"], stats["spilled_bytes"]))


def main():
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: run `make build`")
    if not Path("/sys/fs/cgroup/memory").is_dir():
        sys.exit("needs cgroup v1 memory limits under /sys/fs/cgroup/memory (and root)")
    CGROUP.mkdir()
    (CGROUP / "memory.limit_in_bytes").write_text(str(LIMIT))
    results = {k: [] for k in ("cold", "memory", "restart", "left Safe")}
    gaps = []
    turns = []
    dropped = []
    hits = []
    try:
        for r in range(ROUNDS):
            with tempfile.TemporaryDirectory() as folder:
                s = Server(folder)
                cold, usage = s.stream(request(r))
                results["cold"].append(cold)
                results["memory"].append(s.stream(request(r))[0])
                s.stop()
                s = Server(folder)
                t, usage = s.stream(request(r))
                results["restart"].append(t)
                hits.append(usage["cache_read_input_tokens"])
                spill_round(s, r, gaps, at_warning=lambda hold, s=s, r=r: warning_turns(s, r, turns, hold))
                t, usage = s.stream(request(r))
                results["left Safe"].append(t)
                hits.append(usage["cache_read_input_tokens"])
                s.stop()
            with tempfile.TemporaryDirectory() as folder:
                # The control: the same steps with the disk tier off, the entry dropped.
                s = Server(folder, disk=False)
                s.stream(request(r))
                spill_round(s, r, dropped, disk=False)
                s.stop()
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1000:.1f} ms" for k, v in results.items()), flush=True)
    finally:
        for pid in (CGROUP / "cgroup.procs").read_text().split():
            os.kill(int(pid), 9)
        time.sleep(0.5)
        CGROUP.rmdir()
    cold = statistics.median(results["cold"])
    print(f"\nmodel {MODEL}; prompt {usage['input_tokens'] + usage['cache_read_input_tokens']} tokens; "
          f"tokens read from disk: {sorted(set(hits))}; medians of {ROUNDS} rounds")
    for k, v in results.items():
        m = statistics.median(v)
        print(f"  {k:10s} time to first token {m * 1000:8.1f} ms   {m / cold:6.3f} of cold")
    median_gap = statistics.median(g[0] for g in gaps)
    worst = statistics.median(g[1] for g in gaps)
    writing = statistics.median(g[2] for g in gaps)
    size = statistics.median(g[3] for g in gaps)
    control_gap = statistics.median(g[0] for g in dropped)
    control = statistics.median(g[1] for g in dropped)
    print(f"  a running stream's inter-token gap, median before / largest in the window from the allocation "
          f"that left Safe to the entry written or dropped (≥ {WINDOW:.1f} s):")
    print(f"    spilled to disk: {median_gap * 1000:.1f} / {worst * 1000:.1f} ms ({worst / median_gap:.2f}x); "
          f"the writer took {writing * 1000:.0f} ms for {size / 1e6:.1f} MB")
    print(f"    dropped (disk tier off): {control_gap * 1000:.1f} / {control * 1000:.1f} ms ({control / control_gap:.2f}x)")
    med = [statistics.median(t[i] for t in turns) for i in range(5)]
    print(f"  the next turn at Warning ({med[4]:.0f} tokens, after a turn with a {TOOL_RESULT_WORDS}-word tool result):")
    print(f"    its previous turn written to disk at Warning: {med[0] * 1000:.1f} ms, {med[1]:.0f} tokens read from disk")
    print(f"    only the prefix spilled on leaving Safe:      {med[2] * 1000:.1f} ms, {med[3]:.0f} tokens read "
          f"({med[2] / med[0]:.1f}x the time)")


if __name__ == "__main__":
    main()
