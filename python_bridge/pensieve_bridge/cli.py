"""The wheel's ``pensieve`` command: the server's command line, run inside this interpreter.

``pip install pensieve`` puts this console script on the environment's PATH. It hands
``sys.argv`` to the extension module (``pensieve_bridge._pensieve``, the Rust server built by
maturin), which runs with the GIL released; the backend thread takes the GIL to call this
package, as it does in the ``pensieve`` binary. The interpreter is the one the user installed
into, so the environment's mlx and mlx-lm are the ones used, with no path of the machine the
wheel was built on.

On Linux with glibc on x86-64, the command first starts its interpreter again with the extension module
in ``LD_PRELOAD``: the module carries jemalloc and exports the C allocation functions, so that
the whole process (Python, MLX, the server) allocates with jemalloc, as the ``pensieve``
binary does (one stream of the demo model: ~1.3x the tokens/s of glibc's allocator; see the
extension's ``alloc.rs``). It does not when ``LD_PRELOAD`` is set already (the user's choice,
or when ``PENSIEVE_ALLOCATOR=system``. The restarted process removes the ``LD_PRELOAD`` it was
given from its environment at once, so that nothing it starts inherits it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import signal
import sys

#: ``PENSIEVE_ALLOCATOR=system`` keeps the C library's allocator.
ALLOCATOR = "PENSIEVE_ALLOCATOR"
#: What the restarted interpreter runs: the console script's own ``main``, without the current
#: folder in ``sys.path`` (``-c`` puts it first; a console script does not).
RESTART = "import sys; sys.path[:1] == [''] and sys.path.pop(0); from pensieve_bridge.cli import main; main()"
#: Set in the restarted interpreter's environment, with ``LD_PRELOAD``; both are removed there.
RESTARTED = "PENSIEVE_PRELOADED"


def with_jemalloc(args: list[str]) -> None:
    """Starts this interpreter again with the extension module preloaded (see the module docs),
    running the command with ``args``; returns when it does not."""
    if os.environ.get("LD_PRELOAD") or os.environ.get(ALLOCATOR) == "system":
        return
    # Where the extension module carries jemalloc (its Cargo.toml says why x86-64 only).
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or platform.machine() != "x86_64":
        return
    spec = importlib.util.find_spec("pensieve_bridge._pensieve")
    if spec is None or not spec.origin:
        return
    env = {**os.environ, "LD_PRELOAD": spec.origin, RESTARTED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-c", RESTART, *args], env)


def main() -> None:
    """Runs ``pensieve`` with this process's arguments and exits with its status."""
    if os.environ.pop(RESTARTED, None):
        # Preloaded from the start: what this process starts does not inherit it.
        os.environ.pop("LD_PRELOAD", None)
    else:
        with_jemalloc(sys.argv[1:])
    # SIGINT belongs to the server (a graceful shutdown), not to Python's KeyboardInterrupt:
    # with Python's handler in place the first Ctrl-C would never reach the server.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from . import _pensieve

    code = _pensieve.main(["pensieve", *sys.argv[1:]])
    sys.stdout.flush()
    sys.stderr.flush()
    # The server has stopped (streams finished, the prompt cache written): leave without
    # finalising the interpreter, whose MLX and tokenizer threads may still hold locks.
    os._exit(code)


if __name__ == "__main__":
    main()
