"""The codes exchanged with pensieve's Rust backend: small integers, one meaning each.

Rust has the same enums (``src/backend/mlx/protocol.rs``) and, when it loads the bridge,
compares :func:`codes` with its own: a bridge and a binary that disagree stop start-up with a
message, instead of misreading each other.
"""

from __future__ import annotations

from enum import IntEnum


class Piece(IntEnum):
    """What a piece of a step's output is."""

    #: Answer text.
    TEXT = 0
    #: Reasoning (``<think>…</think>`` or the model family's markers).
    THINKING = 1
    #: A parsed tool call: the JSON text of ``{"name": ..., "arguments": {...}}``.
    TOOL = 2
    #: This generation failed; the payload says why. Its finish is :attr:`Finish.ERROR`.
    ERROR = 3


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


def codes() -> dict[str, int]:
    """Every code, as ``{"Piece.TEXT": 0, ...}``: what Rust checks at load time."""
    return {f"{cls.__name__}.{m.name}": int(m) for cls in (Piece, Finish, Added, Caching) for m in cls}
