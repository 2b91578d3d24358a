"""Splits generated text into what the Anthropic API calls blocks: text, thinking, tool calls.

Built on mlx-lm's own machinery: ``make_text_state_machine`` knows the tokenizer's thinking
and tool-call markers (``<think>``, ``<tool_call>``, or whatever the model family uses), strips
them and holds back text that may be the start of one; the tokenizer's ``tool_parser`` (the one
mlx-lm selects for the chat template) turns the text of a call into a name and arguments.
"""

from __future__ import annotations

import json
from typing import Optional

from mlx_lm.generate import TextStateMachine, make_text_state_machine

from .calls import CallStream
from .protocol import Piece

TEXT, THINKING, TOOL = Piece.TEXT, Piece.THINKING, Piece.TOOL


def initial_state(tokenizer, prompt_tokens) -> str:
    """``reasoning`` when the prompt leaves the model inside a thinking block, as mlx-lm's server decides."""
    state = "normal"
    if tokenizer.has_thinking:
        think_start = tokenizer.rfind_think_start(prompt_tokens)
        think_end = tokenizer.rfind_think_end(prompt_tokens)
        if think_start > think_end:
            state = "reasoning"
    return tokenizer.response_initial_state or state


class ResponseSplitter:
    """Feed it decoded text; it returns ``(kind, payload)`` pieces in order.

    ``kind`` is a :class:`~pensieve_bridge.protocol.Piece` (text, thinking or tool); a tool payload is the JSON text of
    ``{"name": ..., "arguments": {...}}``, produced once the whole call has been generated.
    A call that the parser cannot read is returned as text, so nothing the model said is lost.
    A model whose calls are JSON (mlx-lm's ``json_tools`` parser) has them streamed as well:
    :attr:`Piece.TOOL_START` once the name is written, :attr:`Piece.TOOL_ARGS` as the
    arguments come (:class:`~pensieve_bridge.calls.CallStream`), then the whole call.
    """

    def __init__(self, tokenizer, tools=None, initial="normal"):
        self._parser = tokenizer.tool_parser
        self._tools = tools
        self._sm = make_text_state_machine(tokenizer)
        self._state = self._sm.make_state(initial)
        self._prev = initial
        self._tool_text = ""
        self._tool_start = getattr(tokenizer, "tool_call_start", None) or ""
        self._tool_end = getattr(tokenizer, "tool_call_end", None) or ""
        self._json_calls = self._parser is not None and self._parser.__module__.endswith("json_tools")
        self._stream: Optional[CallStream] = None
        self.made_tool_call = False
        self._last_kind = None
        self._held = ""

    def feed(self, text: str, finish=None) -> list[tuple[Piece, str]]:
        self._state, segments = TextStateMachine.split(self._state, text)
        if finish is not None:
            # Whatever was held back as a possible marker start is text after all.
            self._state, flushed, current = TextStateMachine.flush(self._state)
            segments.append((current, flushed))
        out: list[tuple[Piece, str]] = []
        for state, piece in segments:
            if self._prev == "tool" and state != "tool":
                out.extend(self._close_tool())
            if state == "tool":
                self._tool_text += piece
                if self._json_calls:
                    self._stream = self._stream or CallStream()
                    out.extend(self._stream.feed(piece))
            elif piece:
                kind = THINKING if state == "reasoning" else TEXT
                if kind != self._last_kind:
                    # A new block: drop the newlines that follow a marker ("<think>\n").
                    piece = piece.lstrip("\n")
                if piece:
                    out.append((kind, piece))
                    self._last_kind = kind
            self._prev = state
        if finish is not None and self._prev == "tool" and self._tool_text:
            out.extend(self._close_tool())
        return _merge(self._hold_trailing_space(out, finish is not None))

    def _hold_trailing_space(self, pieces, finished):
        """Text's trailing whitespace waits for what comes next: more text gets it, a tool call
        drops it (a text block before a call does not end in a newline), the end releases it."""
        out = []
        for kind, payload in pieces:
            if kind == TEXT:
                payload = self._held + payload
                body = payload.rstrip()
                self._held = payload[len(body):]
                if body:
                    out.append((TEXT, body))
                continue
            if kind in (TOOL, Piece.TOOL_START, Piece.TOOL_ARGS):
                self._held = ""
            elif self._held:
                out.append((TEXT, self._held))
                self._held = ""
            out.append((kind, payload))
        if finished and self._held:
            out.append((TEXT, self._held))
            self._held = ""
        return out

    def _close_tool(self) -> list[tuple[Piece, str]]:
        raw, self._tool_text = self._tool_text, ""
        stream, self._stream = self._stream, None
        if not raw.strip():
            return []
        try:
            parsed = self._parser(raw, self._tools) if self._parser else None
        except (ValueError, json.JSONDecodeError, KeyError, TypeError):
            parsed = None
        calls = parsed if isinstance(parsed, list) else [parsed] if parsed else []
        good = [c for c in calls if isinstance(c, dict) and isinstance(c.get("name"), str)]
        if stream is not None and stream.started and len(good) != 1:
            # The call has begun streaming: it ends as a call, its arguments completed if cut.
            self.made_tool_call = True
            self._last_kind = TOOL
            return [stream.finish()]
        if not good:
            return [(TEXT, f"{self._tool_start}{raw}{self._tool_end}")]
        self.made_tool_call = True
        self._last_kind = TOOL
        out = []
        for c in good:
            args = c.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = {"_raw": args}
            out.append((TOOL, json.dumps({"name": c["name"], "arguments": args}, ensure_ascii=False)))
        return out


def _merge(pieces):
    """Joins neighbouring pieces of the same text kind."""
    out = []
    for kind, payload in pieces:
        if out and kind in (TEXT, THINKING) and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + payload)
        else:
            out.append((kind, payload))
    return out
