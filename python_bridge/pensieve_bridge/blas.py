"""An optimised BLAS for MLX on a CPU, chosen before MLX is imported.

MLX's Linux CPU wheel bundles the reference BLAS (``mlx_cpu.libs/libblas-*.so``): measured on a
2-core x86-64 machine, a 512×576×1536 float32 matmul runs at 6 GFLOP/s with it and at about
190 GFLOP/s with OpenBLAS. Loading OpenBLAS with ``RTLD_GLOBAL`` before MLX is imported puts its
``cblas_*`` symbols first in the global scope, where MLX's calls resolve, with no change to MLX
and no ``LD_PRELOAD``. On macOS MLX uses Accelerate and Metal: nothing to do.

Two OpenBLAS builds are looked for, in this order:

1. ``scipy-openblas32`` (PyPI; a dependency of the wheel on Linux, so no root is needed). Its
   symbols carry a ``scipy_`` prefix, so the wheel's extension module exports the three
   ``cblas_*gemm`` functions MLX calls, forwards them to the prefixed ones, and is made global.
   The ``pensieve`` binary built from a checkout has no such module and skips this one.
2. The system's OpenBLAS (Debian's ``libopenblas0-pthread`` and the like).

OpenBLAS's idle threads spin for about 2^28 cycles (a tenth of a second) before they sleep, and
decoding calls BLAS every millisecond or so: they never sleep, and hold a core each that the
server's own threads (and everything else on the machine) then wait for. :func:`preload` sets
``OPENBLAS_THREAD_TIMEOUT`` to 4 (2^4 cycles, OpenBLAS's least) unless it is set already: on a
2-core x86 machine, the demo model streamed over HTTP went from 991 to 1,118 tokens/s, 200
identical requests' p50 from 287 to 225 ms and their p99/p50 from 2.27 to 1.49, and SmolLM2's
prefill and decoding in process stayed the same (250 and 19 tokens/s).

:func:`preload` must run before anything imports ``mlx``; this module imports nothing of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

#: Where Debian's and Ubuntu's OpenBLAS packages put their BLAS (libopenblas0-pthread first).
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]

#: ``OPENBLAS_THREAD_TIMEOUT``: idle OpenBLAS threads spin 2^4 cycles, not 2^28, before sleeping.
THREAD_TIMEOUT = "4"

_chosen: str | None = None


def preload(setting: str = "auto") -> str:
    """Loads an optimised BLAS for MLX per ``setting`` (``auto``, ``off`` or a library path);
    returns what was done, for the log."""
    global _chosen
    if "mlx.core" in sys.modules:
        return "BLAS: unchanged (MLX was imported first)"
    if setting == "off":
        return "BLAS: MLX's own (backend.blas = off)"
    if sys.platform != "linux":
        return "BLAS: MLX's own (Accelerate/Metal on macOS)"
    # Read by OpenBLAS when it is loaded, below: its idle threads sleep instead of spinning.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)
    if setting != "auto":
        candidates = [setting]
    else:
        wheel = _scipy_openblas()
        if wheel is not None:
            _chosen = wheel
            return f"BLAS: {wheel} (scipy-openblas32 from PyPI, loaded ahead of MLX's reference BLAS)"
        found = ctypes.util.find_library("openblas")
        candidates = CANDIDATES + ([found] if found else [])
    for path in candidates:
        if path and (Path(path).exists() or not path.startswith("/")):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                if setting != "auto":
                    raise OSError(f"backend.blas = {setting}: cannot load it: {e}") from e
                continue
            _chosen = path
            return f"BLAS: {path} (loaded ahead of MLX's reference BLAS)"
    if setting != "auto":
        raise OSError(f"backend.blas = {setting}: no such library")
    return "BLAS: MLX's bundled reference BLAS (no OpenBLAS found: `apt-get install libopenblas0-pthread` makes CPU matmuls ~30x faster)"


def _scipy_openblas() -> str | None:
    """Puts scipy-openblas32 behind MLX's ``cblas_*gemm`` calls when it and the wheel's
    extension module are both installed; returns the library's path, or None."""
    try:
        import scipy_openblas32

        from . import _pensieve
    except ImportError:
        return None
    path = str(Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True))
    try:
        lib = ctypes.CDLL(path)
        addresses = [
            ctypes.cast(getattr(lib, f"scipy_cblas_{name}"), ctypes.c_void_p).value
            for name in ("sgemm", "dgemm", "cgemm")
        ]
        _pensieve.forward_blas(*addresses)
        # Global from now on: MLX, imported after this, resolves cblas_*gemm here first.
        ctypes.CDLL(_pensieve.__file__, mode=ctypes.RTLD_GLOBAL)
    except (OSError, AttributeError, ValueError):
        return None
    _KEEP.append(lib)
    return path


#: The libraries loaded here stay loaded for the life of the process.
_KEEP: list = []


def chosen() -> str | None:
    """The library :func:`preload` loaded, if any."""
    return _chosen
