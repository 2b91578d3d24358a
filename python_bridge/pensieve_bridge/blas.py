"""An optimised BLAS for MLX on a CPU, chosen before MLX is imported.

MLX's Linux CPU wheel bundles the reference BLAS (``mlx_cpu.libs/libblas-*.so``): measured on a
2-core x86-64 machine, a 512×576×1536 float32 matmul runs at 6 GFLOP/s with it and at about
190 GFLOP/s with OpenBLAS. Loading OpenBLAS with ``RTLD_GLOBAL`` before MLX is imported puts its
``cblas_*`` symbols first in the global scope, where MLX's calls resolve, with no change to MLX
and no ``LD_PRELOAD``. On macOS MLX uses Accelerate and Metal: nothing to do.

:func:`preload` must run before anything imports ``mlx``; this module imports nothing of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
    if setting != "auto":
        candidates = [setting]
    else:
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


def chosen() -> str | None:
    """The library :func:`preload` loaded, if any."""
    return _chosen
