"""The wheel's ``pensieve`` command: the server's command line, run inside this interpreter.

``pip install pensieve`` puts this console script on the environment's PATH. It hands
``sys.argv`` to the extension module (``pensieve_bridge._pensieve``, the Rust server built by
maturin), which runs with the GIL released; the backend thread takes the GIL to call this
package, as it does in the ``pensieve`` binary. The interpreter is the one the user installed
into, so the environment's mlx and mlx-lm are the ones used, with no path of the machine the
wheel was built on.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    """Runs ``pensieve`` with this process's arguments and exits with its status."""
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
