"""Tool calls read as they are generated, so that their arguments stream.

A call is the JSON text ``{"name": "...", "arguments": {...}}``: what a forced call is
constrained to, what models of mlx-lm's ``json_tools`` family write between their markers, and
what the generic tool format (:mod:`~pensieve_bridge.tool_format`) wraps in
``{"tool_call": ...}``. :class:`CallStream` reads that text piece by piece: the name once it is
complete (:attr:`Piece.TOOL_START`), then the arguments' text as it comes
(:attr:`Piece.TOOL_ARGS`: fragments whose concatenation is the arguments' JSON), and at the end
the whole call (:attr:`Piece.TOOL`), parsed, or completed by :func:`complete_object` when the
generation was cut (``max_tokens``): a cut call is still a call, never text.

:class:`GenericOutput` reads the generic format's answer, ``{"response": "..."}`` (text,
decoded from its JSON string as it comes) or ``{"tool_call": {...}}`` (a streamed call).
"""

from __future__ import annotations

import json
import re
from typing import Optional

from .protocol import Piece

#: The head of a call, up to where its arguments begin.
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
#: The head of a generic-format answer, up to its value.
GENERIC_HEAD = re.compile(r'\s*\{\s*"(response|tool_call)"\s*:\s*')
#: One JSON string escape, complete.
ESCAPE = re.compile(r'\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})')


def call_piece(name: str, arguments) -> tuple[Piece, str]:
    """The :attr:`Piece.TOOL` of a whole call."""
    if not isinstance(arguments, dict):
        arguments = {}
    return Piece.TOOL, json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


class CallStream:
    """One call's JSON text, read as it comes (see the module docs)."""

    def __init__(self):
        self.text = ""
        #: The tool's name, once its head has been read.
        self.name: Optional[str] = None
        self._pos = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._args_began = False
        #: The arguments' object has been read to its end.
        self.args_done = False
        #: Streaming gave up (the arguments are not an object): the call comes whole at the end.
        self.whole = False

    @property
    def started(self) -> bool:
        """A :attr:`Piece.TOOL_START` has been given."""
        return self.name is not None

    def feed(self, text: str) -> list[tuple[Piece, str]]:
        """The pieces that ``text`` (the call's next text) completes."""
        self.text += text
        out: list[tuple[Piece, str]] = []
        if self.name is None:
            head = HEAD.match(self.text)
            if head is None:
                return out
            try:
                self.name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                self.whole = True
                return out
            out.append((Piece.TOOL_START, self.name))
            self._pos = head.end()
        if self.whole or self.args_done:
            return out
        start, i = self._pos, self._pos
        while i < len(self.text):
            c = self.text[i]
            i += 1
            if not self._args_began:
                if c.isspace():
                    start = i
                    continue
                if c != "{":
                    self.whole = True
                    return out
                self._args_began = True
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.args_done = True
                    break
        self._pos = i
        if i > start:
            out.append((Piece.TOOL_ARGS, self.text[start:i]))
        return out

    def arguments_text(self) -> str:
        """The arguments' text read so far."""
        head = HEAD.match(self.text)
        return self.text[head.end() : self._pos].strip() if head else ""

    def finish(self, names: Optional[list] = None) -> Optional[tuple[Piece, str]]:
        """The whole call, when the text has ended: parsed, or with its arguments completed
        when it was cut; ``None`` when not even its name can be told (``names``: the tools it
        may be, one of which a cut name can still single out)."""
        try:
            call = json.loads(self.text)
        except ValueError:
            call = None
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            return call_piece(call["name"], call.get("arguments"))
        name = self.name
        if name is None:
            name = _cut_name(self.text, names or [])
        if name is None:
            return None
        return call_piece(name, complete_object(self.arguments_text()))


def _cut_name(text: str, names: list) -> Optional[str]:
    """The tool a call cut inside its name is to, when the part written singles one out."""
    found = re.match(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)', text)
    if found:
        written = found.group(1)
    elif '{"name":"'.startswith(re.sub(r"\s+", "", text)):
        written = ""
    else:
        return None
    fits = [n for n in names if n.startswith(written)]
    return fits[0] if len(fits) == 1 else None


def complete_object(text: str) -> dict:
    """The longest start of ``text`` (a JSON object cut anywhere) that, closed, is valid: what
    a call cut by ``max_tokens`` had written of its arguments (``{"city": "Par`` gives
    ``{"city": "Par"}``); ``{}`` when nothing of it can be kept."""
    if not text.startswith("{"):
        return {}
    # The containers open, and whether a string is, after each character.
    closers: list[str] = []
    states: list[tuple[str, bool]] = []
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            closers.append("}")
        elif c == "[":
            closers.append("]")
        elif c in "}]" and closers:
            closers.pop()
        states.append(("".join(reversed(closers)), in_string))
    for end in range(len(text), 0, -1):
        if end < len(text) and text[end - 1] not in '"}],{[' and not text[end - 1].isalnum():
            continue
        shut, in_string = states[end - 1]
        head = text[:end].rstrip()
        if head.endswith(",") and not in_string:
            head = head[:-1]
        try:
            value = json.loads(head + ('"' if in_string else "") + shut)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def decode_string_part(raw: str) -> tuple[str, int, bool]:
    """Decodes the start of a JSON string's body (after its opening quote): ``(text, used,
    closed)``, where ``used`` characters of ``raw`` were decoded (an escape cut in the middle
    waits for the rest) and ``closed`` says the closing quote was reached."""
    out = []
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == '"':
            return "".join(out), i + 1, True
        if c != "\\":
            out.append(c)
            i += 1
            continue
        esc = ESCAPE.match(raw, i)
        if esc is None:
            break
        text = json.loads(f'"{esc.group(0)}"')
        if "\ud800" <= text <= "\udbff":  # the first half of a surrogate pair: wait for the second
            pair = ESCAPE.match(raw, esc.end())
            if pair is None:
                break
            text = json.loads(f'"{esc.group(0)}{pair.group(0)}"')
            i = pair.end()
        else:
            i = esc.end()
        out.append(text)
    return "".join(out), i, False


class GenericOutput:
    """The response splitter for the generic tool format under ``tool_choice: auto``: the answer
    is ``{"response": "..."}`` (its text streams as text) or ``{"tool_call": {"name": ...,
    "arguments": ...}}`` (a streamed call)."""

    def __init__(self, names: Optional[list] = None):
        self._names = names or []
        self._text = ""
        self._kind: Optional[str] = None
        #: Where the response's string body not yet decoded begins (once its quote is read).
        self._body: Optional[int] = None
        self._head = 0
        self._closed = False
        self._call: Optional[CallStream] = None
        self.made_tool_call = False

    def feed(self, text: str, finish=None) -> list[tuple[Piece, str]]:
        self._text += text
        out: list[tuple[Piece, str]] = []
        if self._kind is None:
            head = GENERIC_HEAD.match(self._text)
            if head is not None:
                self._kind, self._head = head.group(1), head.end()
                if self._kind == "tool_call":
                    self._call = CallStream()
                    text = self._text[head.end() :]
        if self._kind == "tool_call":
            out.extend(self._call.feed(text))
        elif self._kind == "response" and not self._closed:
            if self._body is None and self._text[self._head :].lstrip().startswith('"'):
                self._body = self._text.index('"', self._head) + 1
            if self._body is not None:
                decoded, used, self._closed = decode_string_part(self._text[self._body :])
                self._body += used
                if decoded:
                    out.append((Piece.TEXT, decoded))
        if finish is not None and self._kind == "tool_call":
            out.extend(self._finish())
        return out

    def _finish(self) -> list[tuple[Piece, str]]:
        try:
            whole = json.loads(self._text)
        except ValueError:
            whole = None
        call = whole.get("tool_call") if isinstance(whole, dict) else None
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            piece = call_piece(call["name"], call.get("arguments"))
        else:
            piece = self._call.finish(self._names)
        if piece is None:
            return []
        self.made_tool_call = True
        return [piece]
