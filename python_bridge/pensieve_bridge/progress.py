"""How far a model load has got: its weights are read (evaluated, which reads them from the
file) in groups, and each group reports the bytes done of the total to the reporter the server
set (:func:`set_reporter`; Rust shows it in ``/health``, ``/v1/models``, the dashboard and the
log). The total is the weights' bytes in memory as they load (for quantised weights, about the
file's size)."""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

#: Weights read between two reports.
STEP_BYTES = 8 << 20

_reporter: Optional[Callable[[int, int], None]] = None


def set_reporter(reporter: Optional[Callable[[int, int], None]]) -> None:
    """``reporter(done_bytes, total_bytes)`` hears of every load from now on (None: nobody)."""
    global _reporter
    _reporter = reporter


def evaluate(model) -> int:
    """Reads ``model``'s weights, reporting progress; returns their bytes."""
    params = [v for _, v in tree_flatten(model.parameters())]
    total = sum(v.nbytes for v in params)
    done, group, group_bytes = 0, [], 0
    _report(0, total)
    for v in params:
        group.append(v)
        group_bytes += v.nbytes
        if group_bytes >= STEP_BYTES:
            mx.eval(group)
            done += group_bytes
            _report(done, total)
            group, group_bytes = [], 0
    mx.eval(group)
    _report(total, total)
    return total


def _report(done: int, total: int) -> None:
    if _reporter is not None:
        _reporter(done, total)
