"""Constrained decoding: forced tool calls and structured outputs that hold, whatever the model.

A request may carry a constraint (Rust sends it in the request's parameters):

- ``{"type": "json_schema", "schema": {...}, "field": ...}`` (``output_config.format``, or
  OpenAI's ``response_format`` / ``text.format``; ``field`` is where the client put the schema,
  which an error names): the answer is JSON that validates against the schema;
- ``{"type": "tool", "names": [...]}`` (``tool_choice`` ``any`` or ``tool``): the answer is one
  call ``{"name": ..., "arguments": {...}}`` to one of these tools, whose arguments validate
  against that tool's ``input_schema``;
- ``{"type": "strict_tools", "strict": [...]}`` (``tool_choice`` ``auto`` with tools marked
  ``strict``): the model answers freely (text, thinking, calls), but each call, written in the
  model's own markers, is to a listed tool with valid input for the strict ones. This needs a
  model whose calls are JSON between markers that are single special tokens (mlx-lm's
  ``json_tools`` format: Hermes, Qwen2.5/3, the demo model); on another model the tools are
  not constrained (:meth:`Grammars.compile` returns ``None``, and the bridge says so in the log).

The grammar engine is llguidance (the engine behind structured outputs in llama.cpp, vLLM and
SGLang): it compiles a JSON schema to a grammar and, at each step, computes the set of tokens
that keep the output valid (about 50 µs of CPU). :class:`Constraint` is the per-sequence logits
processor that mlx-lm's ``BatchGenerator`` runs for that sequence alone: it masks every other
token, so other requests in the batch are untouched. Once the grammar is complete only the end
of sequence is allowed, and the generation stops there.

A forced call is generated as bare JSON, whatever the model's own tool-call markers are (there
is no marker to get wrong), and :class:`ConstrainedOutput` turns it into the tool call. JSON is
generated compact (no free whitespace between tokens), so that a model cannot spend its
``max_tokens`` on blanks. A generation cut by ``max_tokens`` is still cut: its JSON is then
incomplete, and the answer says ``max_tokens``.
"""

from __future__ import annotations

import json
from typing import Optional

import mlx.core as mx
import numpy as np

from .protocol import Finish, Piece

#: llguidance's options for every schema: compact JSON (no whitespace a model could loop on).
GUIDANCE = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """The constraint cannot be used (a 400 for the client): ``field`` is the request field at
    fault, ``problem`` what is wrong with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class Grammars:
    """The engine's grammar compiler: the llguidance view of its tokenizer, made once."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._llt = None

    def _lltokenizer(self):
        if self._llt is None:
            import llguidance.hf

            hf = getattr(self._tokenizer, "_tokenizer", self._tokenizer)
            self._llt = llguidance.hf.from_tokenizer(hf)
        return self._llt

    def compile(self, constraint: dict, tools: Optional[list]) -> Optional["Constraint"]:
        """The logits processor for ``constraint``; :class:`ConstraintError` when it cannot be
        used, with the field and llguidance's reason; ``None`` for strict tools on a model whose
        tool-call format cannot be constrained."""
        from llguidance import LLMatcher

        kind = constraint.get("type")
        if kind == "strict_tools":
            grammar = self._strict_tools(set(constraint.get("strict") or []), tools or [])
            if grammar is None:
                return None
            return self._matcher(grammar, "tools")
        if kind == "json_schema":
            where = constraint.get("field") or "output_config.format.schema"
            schema = constraint.get("schema")
            if not isinstance(schema, dict):
                raise ConstraintError(where, "must be a JSON schema object")
            schema = dict(schema)
        elif kind == "tool":
            where = "tools"
            schema = tool_call_schema(constraint.get("names") or [], tools or [])
        else:
            raise ConstraintError("constraint", f"unknown constraint type {kind!r}")
        schema["x-guidance"] = {**GUIDANCE, **(schema.get("x-guidance") or {})}
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema)
        except Exception as e:  # llguidance raises ValueError/RuntimeError with its reason
            raise ConstraintError(where, f"the schema cannot be used for constrained decoding: {e}") from None
        return self._matcher(grammar, where)

    def _matcher(self, grammar: str, where: str) -> "Constraint":
        from llguidance import LLMatcher

        llt = self._lltokenizer()
        error = LLMatcher.validate_grammar(grammar, llt)
        if error:
            raise ConstraintError(where, f"the schema cannot be used for constrained decoding: {error}")
        matcher = LLMatcher(llt, grammar)
        if matcher.is_error():
            raise ConstraintError(where, f"the schema cannot be used for constrained decoding: {matcher.get_error()}")
        return Constraint(matcher, llt.vocab_size)

    def _strict_tools(self, strict: set, tools: list) -> Optional[str]:
        """The grammar of a free answer whose calls (JSON between the model's special-token
        markers) are to the tools, the strict ones with valid input; ``None`` when the model's
        tool format is not that."""
        from llguidance import LLMatcher

        tok = self._tokenizer
        parser = getattr(tok, "tool_parser", None)
        start, end = getattr(tok, "tool_call_start", None), getattr(tok, "tool_call_end", None)
        if not (start and end and parser is not None and parser.__module__.endswith("json_tools")):
            return None
        hf = getattr(tok, "_tokenizer", tok)
        single = lambda text: (lambda ids: ids[0] if len(ids) == 1 else None)(hf.encode(text, add_special_tokens=False))  # noqa: E731
        start_id, end_id = single(start), single(end)
        if start_id is None or end_id is None:
            return None
        thinking = [single(t) for t in (getattr(tok, "think_start", None), getattr(tok, "think_end", None)) if t]
        options = []
        for t in tools:
            fn = t.get("function") or {}
            name = fn.get("name")
            arguments = (fn.get("parameters") or {"type": "object"}) if name in strict else {"type": "object"}
            options.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        schema = {"anyOf": options, "x-guidance": GUIDANCE}
        # Free text, the thinking markers, and calls, in any order; the end of sequence is
        # allowed wherever the answer may stop.
        parts = ["TEXT", *(f"<[{i}]>" for i in thinking if i is not None), "call"]
        lark = (
            f"start: ({' | '.join(parts)})*\n"
            "TEXT: /(.|\\n)+/\n"
            f'call: <[{start_id}]> "\\n"? body "\\n"? <[{end_id}]>\n'
            f"body: %json {json.dumps(schema)}\n"
        )
        try:
            return LLMatcher.grammar_from_lark(lark)
        except Exception as e:
            raise ConstraintError("tools", f"a strict tool's schema cannot be used for constrained decoding: {e}") from None


def tool_call_schema(names: list[str], tools: list) -> dict:
    """The schema of one call to one of ``names``: ``{"name": <const>, "arguments": <its
    input_schema>}`` for each, any one of them."""
    by_name = {t["function"]["name"]: t["function"] for t in tools if "function" in t}
    options = []
    for name in names:
        fn = by_name.get(name)
        if fn is None:
            raise ConstraintError("tool_choice", f"no tool named {name!r} in tools")
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": fn.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not options:
        raise ConstraintError("tool_choice", "requires tools")
    return options[0] if len(options) == 1 else {"anyOf": options}


class Constraint:
    """The logits processor of one constrained sequence (mlx-lm calls it with the sequence's
    tokens so far and its logits, one row)."""

    def __init__(self, matcher, vocab_size: int):
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        self._bitmask = allocate_token_bitmask(1, vocab_size)
        self._vocab = vocab_size
        self._started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        from llguidance.numpy import fill_next_token_bitmask

        # The forward pass starts now, and the mask is computed while it runs: both wait only
        # for the token sampled last step.
        mx.async_eval(logits)
        if self._started:
            # The token sampled last step (the first call sees the prompt's last token).
            token = int(tokens[-1].item())
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"constrained decoding: token {token} refused: {self.matcher.get_error()}")
        self._started = True
        fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self._vocab]
        width = logits.shape[-1]
        if width > allowed.size:  # the model's output is padded past the tokenizer's vocabulary
            allowed = np.concatenate([allowed, np.zeros(width - allowed.size, dtype=allowed.dtype)])
        return mx.where(mx.array(allowed[:width].astype(np.bool_)), logits, -mx.inf)


class ConstrainedOutput:
    """In place of the response splitter for a constrained generation: JSON text streams as
    text; a forced call is held until it is complete, then given as one tool call."""

    def __init__(self, call: bool):
        self._call = call
        self._text = ""
        self.made_tool_call = False

    def feed(self, text: str, finish=None) -> list[tuple[Piece, str]]:
        if not self._call:
            return [(Piece.TEXT, text)] if text else []
        self._text += text
        if finish is None:
            return []
        if finish == Finish.STOP:
            try:
                call = json.loads(self._text)
            except ValueError:
                call = None
            if isinstance(call, dict) and "name" in call:
                self.made_tool_call = True
                return [(Piece.TOOL, json.dumps({"name": call["name"], "arguments": call.get("arguments", {})}))]
        # Cut short (max_tokens, a stop sequence): what was generated, as text.
        return [(Piece.TEXT, self._text)] if self._text else []
