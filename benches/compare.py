"""pensieve against mlx-lm's own server (``python -m mlx_lm server``) on the same model folder.

Run with ``make bench`` (or ``.venv/bin/python benches/compare.py`` after ``make build``). It
builds the demo model folder with ``python -m pensieve_bridge.demo``, starts both servers on it,
and measures them side by side in one run, alternating which goes first in every round:

- single stream: one request, 256 tokens, temperature 0; output tokens / wall time;
- 8 streams: eight such requests at once; all their output tokens / wall time of the slowest;
- agent-shaped prompt: a system prompt of ``AGENT_CHARS`` characters (default 40,000, about
  what Claude Code sends) in two blocks, the first a Claude Code billing header whose values
  change on every request; time to first token the first time the prompt is seen (cold) and
  on the next request with a new billing header and a new question (warm);
- long-prefill stall: a stream decodes, then a prompt of ``STALL_WORDS`` words (default 3,000,
  about 6,500 tokens) arrives; the longest gap between the stream's tokens from then until
  that prompt's first token, against the stream's median gap before it (the ratio the issue
  bounds at 10), and that prompt's time to first token. Lower is better for all three.

pensieve is asked over the Anthropic Messages API, mlx-lm over its OpenAI chat API, each with
the same messages. Medians are printed, and the ratios pensieve / mlx-lm (for tokens/s, higher
is better; for time to first token, lower is better). ``ROUNDS`` sets the rounds (default 5).

``PEER`` (``rapid-mlx`` or ``fusion-mlx``) compares against that server instead, installed
from PyPI (pinned, in ``PEERS``) into its own venv under ``.cache/peers/`` the first time, with
Debian's OpenBLAS loaded ahead of MLX's reference BLAS as pensieve loads it; ``make
bench-peers`` runs both. ``PEER_PRELOAD`` adds libraries to the peer's ``LD_PRELOAD`` (say
Debian's ``libjemalloc.so.2``, to give it the allocator the ``pensieve`` binary has built in),
and the peer inherits this environment (``OPENBLAS_THREAD_TIMEOUT=4``, as pensieve sets it).

``BASELINE`` names another pensieve binary to compare against instead of mlx-lm (an earlier
build: before and after a change), with ``BASELINE_BRIDGE`` the ``python_bridge`` folder it
was built with (put first on its ``PYTHONPATH``); ratios are then this build / the baseline.

``MODEL`` compares on another model instead of the demo: an MLX folder, or a GGUF file, which is
first written as an MLX folder (``benches/gguf_to_mlx.py``) so that both servers load the same
weights from the same folder. ``TOKENS`` sets the output tokens per request (default 256). For
SmolLM2 on a CPU: ``MODEL=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf TOKENS=64
AGENT_CHARS=2000 ROUNDS=3`` (mlx-lm's server prefills about 10 tokens/s there).
"""

import http.client
import itertools
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "pensieve"
PY = sys.executable
ROUNDS = int(os.environ.get("ROUNDS", "5"))
TOKENS = int(os.environ.get("TOKENS", "256"))
MODEL = os.environ.get("MODEL")
BASELINE = os.environ.get("BASELINE")
BASELINE_BRIDGE = os.environ.get("BASELINE_BRIDGE")
PEER = os.environ.get("PEER")
STREAMS = 8
AGENT_CHARS = int(os.environ.get("AGENT_CHARS", "40000"))
STALL_WORDS = int(os.environ.get("STALL_WORDS", "3000"))

WORDS = (
    "file read write edit tool call shell command test build commit branch merge diff patch "
    "function module crate package import export return error result option value type trait "
    "struct enum match loop async await future stream buffer cache memory thread lock queue "
    "request response header body status server client layer policy config setting path"
).split()


def agent_system(seed):
    """A long, stable system prompt (unique per ``seed``, so that every cold start is cold)."""
    rnd = random.Random(seed)
    out = [f"You are an agent for software engineering tasks (session {seed})."]
    size = len(out[0])
    while size < AGENT_CHARS:
        sentence = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(8, 20))).capitalize() + "."
        out.append(sentence)
        size += len(sentence) + 1
    return "\n".join(out)


def billing(value):
    return f"x-anthropic-billing-header: cc_version=2.1.328.{value}; cc_entrypoint=sdk-cli; cch={value:05x};"


# --- the two servers, one client function each -----------------------------------------------


class Pensieve:
    def __init__(self, model_dir, binary=BIN, name="pensieve", bridge=None):
        self.name = name
        env = {**os.environ, "PENSIEVE_LOG__LEVEL": "warn,pensieve::server=info",
               # No disk tier: each run starts cold, as mlx-lm's server does.
               "PENSIEVE_BACKEND__PROMPT_CACHE_DISK_MB": "0"}
        if bridge:
            env["PYTHONPATH"] = str(bridge)
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--port", "0", "--model", str(model_dir)],
            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env,
        )
        for line in self.proc.stderr:
            m = re.search(r"pensieve is serving.*127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        else:
            raise RuntimeError("pensieve did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def body(self, system_blocks, question, max_tokens, stream):
        return "/v1/messages", {
            "model": "demo", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "system": [{"type": "text", "text": t} for t in system_blocks],
            "messages": [{"role": "user", "content": question}],
        }

    @staticmethod
    def tokens(reply):
        return reply["usage"]["output_tokens"]

    @staticmethod
    def is_content(data):
        return data.get("type") == "content_block_delta"


class MlxLm:
    name = "mlx-lm"

    def __init__(self, model_dir):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [PY, "-m", "mlx_lm", "server", "--model", str(model_dir), "--port", str(self.port),
             "--log-level", "WARNING"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.wait_ready()

    def wait_ready(self, log=None):
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited" + (f"; its log: {log}" if log else ""))
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v1/models", headers=getattr(self, "headers", {}))
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"{self.name} server did not start" + (f"; its log: {log}" if log else ""))


#: Other MLX servers people pick, each installed from PyPI into its own venv under
#: .cache/peers/ (``PEER=rapid-mlx``): the pinned requirement, how its server starts, and
#: whether it takes a folder of model folders (fusion-mlx serves a local model that way, and
#: wants an API key). fusion-mlx imports mlx-vlm without declaring it.
PEERS = {
    "rapid-mlx": (["rapid-mlx==0.16.10"], ["-m", "rapid_mlx.cli", "serve"], False),
    "fusion-mlx": (["fusion-mlx==0.10.24", "mlx-vlm==0.7.2"], ["-m", "fusion_mlx.cli", "serve"], True),
}
#: Loaded into a peer ahead of MLX's reference BLAS, as pensieve loads it (the same library).
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def peer_python(name):
    """The peer's venv's interpreter, installing it the first time (it downloads a lot)."""
    venv = ROOT / ".cache" / "peers" / name
    python = venv / "bin" / "python"
    requirements = PEERS[name][0] + (["mlx[cpu]"] if platform.system() == "Linux" else [])
    marker = venv / ".installed"
    if not marker.exists() or marker.read_text().split() != requirements:
        if not python.exists():
            subprocess.run([PY, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
        marker.write_text("\n".join(requirements) + "\n")
    return python


class Peer(MlxLm):
    """A peer's OpenAI-compatible server on the same model folder."""

    def __init__(self, name, model_dir):
        self.name = name
        self.port = free_port()
        _, module, folder_of_models = PEERS[name]
        env = dict(os.environ)
        preload = ([OPENBLAS] if Path(OPENBLAS).exists() else []) + [p for p in os.environ.get("PEER_PRELOAD", "").split(":") if p]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        if folder_of_models:
            models = Path(tempfile.mkdtemp(prefix=f"{name}-models-"))
            (models / "default_model").symlink_to(Path(model_dir).resolve())
            where = ["--model-dir", str(models)]
            env["FUSION_MLX_API_KEY"] = "bench"
            self.headers = {"authorization": "Bearer bench"}
        else:
            where = [str(model_dir), "--served-model-name", "default_model"]
        self.log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self.proc = subprocess.Popen(
            [str(peer_python(name)), *module, *where, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env,
        )
        self.wait_ready(self.log)

    def body(self, system_blocks, question, max_tokens, stream):
        return "/v1/chat/completions", {
            "model": "default_model", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": t} for t in system_blocks]},
                {"role": "user", "content": question},
            ],
        }

    @staticmethod
    def tokens(reply):
        return reply["usage"]["completion_tokens"]

    @staticmethod
    def is_content(data):
        choices = data.get("choices") or [{}]
        return bool((choices[0].get("delta") or {}).get("content"))


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(server, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **getattr(server, "headers", {})})
    return conn, conn.getresponse()


# --- the measurements ---------------------------------------------------------------------------

SHORT_SYSTEM = ["You are a helpful assistant."]


#: Every request's question is new: a server that answers a repeated request from a cache of
#: responses (fusion-mlx does) would otherwise measure its cache.
REQUESTS = itertools.count()


def single(server, i=0):
    """``(output tokens, seconds)`` of one non-streamed request."""
    path, body = server.body(SHORT_SYSTEM, f"Tell me about memory, part {i}, question {next(REQUESTS)}.", TOKENS, False)
    t0 = time.perf_counter()
    conn, res = post(server, path, body)
    reply = json.loads(res.read())
    took = time.perf_counter() - t0
    conn.close()
    if res.status != 200:
        raise RuntimeError(f"{server.name}: {res.status} {reply}")
    return server.tokens(reply), took


def concurrent(server):
    """Aggregate tokens/s of ``STREAMS`` requests at once."""
    results = [None] * STREAMS

    def run(i):
        results[i] = single(server, i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    return sum(n for n, _ in results) / took


def first_token(server, system_blocks, question):
    """Seconds to the first generated text of a streamed request."""
    path, body = server.body(system_blocks, question, 8, True)
    t0 = time.perf_counter()
    conn, res = post(server, path, body)
    if res.status != 200:
        raise RuntimeError(f"{server.name}: {res.status} {res.read()[:300]}")
    first = None
    for raw in res:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        if first is None and server.is_content(json.loads(line[6:])):
            first = time.perf_counter() - t0
    conn.close()
    if first is None:
        raise RuntimeError(f"{server.name}: no text in the stream")
    return first


def agent(server, trial):
    """Cold then warm time to first token for an agent-shaped prompt."""
    system = agent_system(f"{server.name}-{trial}")
    cold = first_token(server, [billing(2 * trial + 1), system], "List the files in this folder.")
    warm = first_token(server, [billing(2 * trial + 2), system], "Now open the README.")
    return cold, warm


def stall(server, trial):
    """``(longest gap, median gap before, time to first token)`` of a long prompt arriving while
    a stream decodes: the gaps are between the stream's text events, the longest from the
    moment the prompt is sent until its first token (that moment closes the window when the
    stream still runs), the median from before it was sent."""
    stamps, stop = [], threading.Event()

    def run():
        path, body = server.body(SHORT_SYSTEM, f"Count from 1 to 9000, question {next(REQUESTS)}.", 8000, True)
        conn, res = post(server, path, body)
        for raw in res:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]" and server.is_content(json.loads(line[6:])):
                stamps.append(time.perf_counter())
            if stop.is_set():
                break
        conn.close()

    streaming = threading.Thread(target=run, daemon=True)
    streaming.start()
    deadline = time.perf_counter() + 120
    while len(stamps) < 20:
        if time.perf_counter() > deadline or not streaming.is_alive():
            raise RuntimeError(f"{server.name}: the running stream gave {len(stamps)} tokens")
        time.sleep(0.01)
    words = " ".join(f"w{(i * 7 + trial) % 97}" for i in range(STALL_WORDS))
    sent = time.perf_counter()
    ttft = first_token(server, SHORT_SYSTEM, f"Summarise, question {next(REQUESTS)}: {words}")
    ran_through = streaming.is_alive()
    stop.set()
    before = [t for t in stamps if t < sent]
    window = before[-1:] + [t for t in stamps if t >= sent] + ([sent + ttft] if ran_through else [])
    gaps = [b - a for a, b in zip(window, window[1:])]
    pace = statistics.median(b - a for a, b in zip(before, before[1:]))
    if not ran_through:
        print(f"{server.name}: the running stream ended before the long prompt's first token", file=sys.stderr)
    streaming.join(timeout=60)
    return max(gaps), pace, ttft


def main():
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: run `make build` first")
    with tempfile.TemporaryDirectory() as tmp:
        if MODEL and MODEL.endswith(".gguf"):
            model_dir = Path(tmp) / Path(MODEL).stem
            subprocess.run([PY, str(ROOT / "benches" / "gguf_to_mlx.py"), MODEL, str(model_dir)], check=True,
                           cwd=ROOT, stdout=subprocess.DEVNULL)
        elif MODEL:
            model_dir = Path(MODEL)
        else:
            model_dir = Path(tmp) / "demo"
            subprocess.run([PY, "-m", "pensieve_bridge.demo", str(model_dir)], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
        if BASELINE:
            other = Pensieve(model_dir, Path(BASELINE), "baseline", BASELINE_BRIDGE)
        elif PEER:
            other = Peer(PEER, model_dir)
        else:
            other = MlxLm(model_dir)
        servers = [Pensieve(model_dir), other]
        results = {s.name: {"single": [], "concurrent": [], "cold": [], "warm": [], "tokens": [],
                            "stall": [], "pace": [], "stall_ratio": [], "stall_ttft": []}
                   for s in servers}
        try:
            for s in servers:  # warm-up: load kernels, fill caches
                single(s), concurrent(s), agent(s, -1)
            for r in range(ROUNDS):
                order = servers if r % 2 == 0 else servers[::-1]
                for s in order:
                    n, took = single(s, r)
                    results[s.name]["tokens"].append(n)
                    results[s.name]["single"].append(n / took)
                for s in order:
                    results[s.name]["concurrent"].append(concurrent(s))
                for s in order:
                    cold, warm = agent(s, r)
                    results[s.name]["cold"].append(cold)
                    results[s.name]["warm"].append(warm)
                for s in order:
                    longest, pace, ttft = stall(s, r)
                    for key, value in (("stall", longest), ("pace", pace), ("stall_ratio", longest / pace),
                                       ("stall_ttft", ttft)):
                        results[s.name][key].append(value)
                print(f"round {r + 1}/{ROUNDS} done", file=sys.stderr)
        finally:
            for s in servers:
                s.proc.terminate()
                s.proc.wait()
    med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in results.items()}
    p, m = med["pensieve"], med[other.name]
    print(f"model {model_dir.name}, {ROUNDS} alternating rounds, medians; "
          f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}")
    print(f"{'':34}{'pensieve':>12}{other.name:>12}{'ratio':>9}")
    rows = [
        (f"single stream, tokens/s ({TOKENS} tok)", "single", "{:12.0f}"),
        (f"{STREAMS} streams, aggregate tokens/s", "concurrent", "{:12.0f}"),
        ("agent prompt cold, first token s", "cold", "{:12.3f}"),
        ("agent prompt warm, first token s", "warm", "{:12.3f}"),
        ("stream's gap before long prompt, s", "pace", "{:12.4f}"),
        ("longest gap during its prefill, s", "stall", "{:12.3f}"),
        ("longest gap / gap before", "stall_ratio", "{:12.1f}"),
        (f"long prompt ({STALL_WORDS} words) TTFT s", "stall_ttft", "{:12.2f}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:34}{fmt.format(p[key])}{fmt.format(m[key])}{p[key] / m[key]:9.2f}")
    print(f"{'warm / cold':34}{p['warm'] / p['cold']:12.3f}{m['warm'] / m['cold']:12.3f}")
    print(f"(agent system prompt: {AGENT_CHARS} characters; output tokens per single request: "
          f"pensieve {p['tokens']:.0f}, {other.name} {m['tokens']:.0f})")


if __name__ == "__main__":
    main()
