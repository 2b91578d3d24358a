"""What crosses between pensieve's Rust backend and this bridge: small integer codes, one
meaning each, and records with named fields, under one protocol :data:`VERSION`.

Rust has the same codes and records (``src/backend/mlx/protocol.rs`` and ``python.rs``, which
reads every record by field name) and, when it loads the bridge, compares :func:`schema` with
its own: a bridge and a binary that disagree stop start-up with a message, instead of
misreading each other. ``protocol.json`` beside this file is the golden copy both test suites
read: a field renamed on either side fails a test on that side.

Records are ``NamedTuple`` classes: named for the other side, and still tuples here.
"""

from __future__ import annotations

import json
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple, Optional

#: Bumped whenever a code or a record changes.
VERSION = 3


class Piece(IntEnum):
    """What a piece of a step's output is."""

    #: Answer text.
    TEXT = 0
    #: Reasoning (``<think>…</think>`` or the model family's markers).
    THINKING = 1
    #: A whole tool call: the JSON text of ``{"name": ..., "arguments": {...}}``. It ends the
    #: streamed call that :attr:`TOOL_START` began, if one is open.
    TOOL = 2
    #: This generation failed; the payload says why. Its finish is :attr:`Finish.ERROR`.
    ERROR = 3
    #: A tool call begins (its arguments stream next): the payload is the tool's name.
    TOOL_START = 4
    #: The next fragment of the open call's arguments, as JSON text: the fragments joined are
    #: the arguments' JSON (cut short if the generation was).
    TOOL_ARGS = 5


class Finish(IntEnum):
    """Why a generation ended (``None`` while it runs)."""

    #: The model ended its turn (an end-of-sequence token, or a stop sequence mlx-lm caught).
    STOP = 0
    #: ``max_tokens`` was reached.
    LENGTH = 1
    #: The model called a tool and ended its turn.
    TOOL_USE = 2
    #: The generation failed (see its :attr:`Piece.ERROR` piece).
    ERROR = 3
    #: MLX went over its memory limit and this generation, the largest, was stopped (its
    #: :attr:`Piece.ERROR` piece says how much); the server answers 503, retry later.
    MEMORY = 4


class Added(IntEnum):
    """What :meth:`Batcher.add <pensieve_bridge.batch.Batcher.add>` did with a request."""

    #: Queued in the batch.
    STARTED = 0
    #: Not queued: the prompt is longer than the model's context.
    TOO_LONG = 1
    #: Not queued: its constraint (a schema, a forced tool) cannot be used; the message says why.
    REFUSED = 2
    #: Not queued yet: its prompt's cache is being read from disk; add it again later.
    READING = 3


class Caching(IntEnum):
    """Where finished generations' KV caches go (:meth:`Batcher.set_caching
    <pensieve_bridge.batch.Batcher.set_caching>`), by memory tier."""

    #: Dropped, and the prompt cache released (Critical, Emergency; an unload, a stop).
    OFF = 0
    #: Into the prompt cache in memory (Safe).
    MEMORY = 1
    #: Written to the disk tier, the prompt cache released (Warning): the next turn of a session
    #: reads its prefix from disk instead of processing it again.
    DISK = 2


class AddParams(NamedTuple):
    """Rust → bridge: how a request samples (the JSON object ``Batcher.add`` takes)."""

    #: At most this many tokens are generated.
    max_tokens: int
    #: 0 is greedy.
    temperature: float
    #: Nucleus sampling; None is off.
    top_p: Optional[float]
    #: Top-k sampling; None is off.
    top_k: Optional[int]
    #: Stop sequences.
    stop: list
    #: A constraint (:mod:`~pensieve_bridge.constrain`), or None.
    constraint: Optional[dict]

    @classmethod
    def from_json(cls, text: str) -> "AddParams":
        """Parses Rust's JSON; a missing or unknown field is a :class:`TypeError` naming it."""
        return cls(**json.loads(text))


class AddResult(NamedTuple):
    """Bridge → Rust: what ``Batcher.add`` did."""

    code: Added
    #: The generation's id in the batch (with :attr:`Added.STARTED`).
    uid: int
    #: Prompt tokens.
    input_tokens: int
    #: Of those, read from the prompt cache.
    cached_tokens: int
    #: Why it was refused (with :attr:`Added.REFUSED`), else "".
    message: str
    #: The request field it was refused for (with :attr:`Added.REFUSED`), else "".
    field: str


class Out(NamedTuple):
    """Bridge → Rust: one piece of a generation's output."""

    kind: Piece
    payload: str


class Stepped(NamedTuple):
    """Bridge → Rust: one generation's output from one step."""

    uid: int
    pieces: list  # of Out
    #: Set on its last step.
    finish: Optional[Finish]


class MemoryCounters(NamedTuple):
    """Bridge → Rust: MLX's memory, in bytes."""

    active: int
    cache: int
    peak: int


class CacheStats(NamedTuple):
    """Bridge → Rust: the prompt cache in memory."""

    bytes: int
    entries: int


class DiskStats(NamedTuple):
    """Bridge → Rust: the prompt cache's disk tier, for ``/health`` and ``/metrics``."""

    folder: str
    #: Why the tier turned itself off, else "".
    off_reason: str
    entries: int
    bytes: int
    max_bytes: int
    pending_bytes: int
    hits: int
    hit_tokens: int
    spills: int
    spilled_bytes: int
    writes: int
    removed: int
    read_seconds: float
    write_seconds: float


#: Every record that crosses, by name.
RECORDS = (AddParams, AddResult, Out, Stepped, MemoryCounters, CacheStats, DiskStats)


def schema() -> dict:
    """The protocol: version, codes and every record's fields, in order. What Rust compares
    with its own when it loads the bridge, and what ``protocol.json`` holds."""
    return {
        "version": VERSION,
        "codes": codes(),
        "records": {cls.__name__: list(cls._fields) for cls in RECORDS},
    }


def golden() -> dict:
    """``protocol.json``: the golden copy of :func:`schema` (and ``examples``: records as Rust
    sends them) that the Rust tests read too."""
    return json.loads((Path(__file__).parent / "protocol.json").read_text())


def codes() -> dict[str, int]:
    """Every code, as ``{"Piece.TEXT": 0, ...}``: what Rust checks at load time."""
    return {f"{cls.__name__}.{m.name}": int(m) for cls in (Piece, Finish, Added, Caching) for m in cls}
