"""Chats rendered to tokens, the long ones off the batch thread.

The batch thread runs every generation's next step; a long prompt rendered on it (the chat
template, then the tokenizer) stalls every running stream for as long as that takes: 0.4 to 1
ms per KB of text here (a 64 KB prompt, the size of a coding agent's, took 33 ms with the demo
model's tokenizer and 73 ms with SmolLM2's). The tokenizer releases the GIL while it encodes,
so a prompt of :data:`OFF_THREAD_BYTES` or more is rendered on a thread of its own instead, and
the batch thread is told to ask again (``None``): it keeps stepping the other generations
meanwhile (measured: 21 ms longest pause of a 5 ms ticker during a 900 KB render). What that
costs the prompt itself is a turn of the loop: a step when others decode, 2 ms when idle.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

#: A chat (its JSON) at least this long is rendered off the batch thread: 2-4 ms of rendering
#: here, a few decoding steps of a small model (it was 64 KB, 33-73 ms: in benches/prefill_stall.py
#: a 20 KB prompt's arrival was one of the stream's longest gaps).
OFF_THREAD_BYTES = 4 * 1024
#: Renders kept at most, done or not (a client that left never asks for its own again).
MAX_JOBS = 16
#: A finished render nobody asked for within this long is dropped.
UNCLAIMED_SECS = 60.0


class Renderer:
    """Renders ``{"messages": [...], "tools": ...}`` JSON with ``render`` (a chat → its tokens)."""

    def __init__(self, render: Callable[[dict], list[int]]):
        self._render = render
        self._pool: Optional[ThreadPoolExecutor] = None
        #: chat JSON → (the render, when it was asked for)
        self._jobs: dict[str, tuple[Future, float]] = {}

    def render(self, chat_json: str) -> Optional[tuple[dict, list[int]]]:
        """The chat and its tokens, or None while a long chat is rendered off this thread (ask
        again with the same JSON). A render's exception is raised here, as if it ran here."""
        if len(chat_json) < OFF_THREAD_BYTES:
            chat = json.loads(chat_json)
            return chat, self._render(chat)
        self._sweep()
        job = self._jobs.get(chat_json)
        if job is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pensieve-render")
            self._jobs[chat_json] = (self._pool.submit(self._work, chat_json), time.monotonic())
            while len(self._jobs) > MAX_JOBS:
                future, _ = self._jobs.pop(next(iter(self._jobs)))
                future.cancel()
            return None
        future, _ = job
        if not future.done():
            return None
        del self._jobs[chat_json]
        return future.result()

    def count(self, chat_json: str) -> int:
        """The chat's token count, or -1 while it is rendered off this thread (ask again)."""
        rendered = self.render(chat_json)
        return -1 if rendered is None else len(rendered[1])

    def pending(self) -> int:
        """Renders asked for and not yet taken."""
        return len(self._jobs)

    def _work(self, chat_json: str) -> tuple[dict, list[int]]:
        chat = json.loads(chat_json)
        return chat, self._render(chat)

    def _sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, (f, asked) in self._jobs.items() if f.done() and now - asked > UNCLAIMED_SECS]:
            del self._jobs[key]

    def close(self) -> None:
        """Drops every render; the thread ends once the one running finishes."""
        for future, _ in self._jobs.values():
            future.cancel()
        self._jobs.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
