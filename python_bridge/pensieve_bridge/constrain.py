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
is no marker to get wrong), and :class:`ConstrainedOutput` streams it as the tool call (on a
model in the generic tool format, :mod:`~pensieve_bridge.tool_format`, it is that format's
``{"tool_call": ...}``). JSON is generated compact (no free whitespace between tokens), so that
a model cannot spend its ``max_tokens`` on blanks, and every object that lists its properties
is closed (:func:`closed`). A generation cut by ``max_tokens`` is still cut: a JSON text is
then incomplete, and the answer says ``max_tokens``; a call is still a call, its arguments
completed where they were cut.
"""

from __future__ import annotations

import itertools
import json
from typing import Optional

import mlx.core as mx
import numpy as np

from . import tool_format
from .calls import CallStream
from .protocol import Piece

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

    def compile(self, constraint: dict, tools: Optional[list], generic: bool = False) -> Optional["Constraint"]:
        """The logits processor for ``constraint``; :class:`ConstraintError` when it cannot be
        used, with the field and llguidance's reason; ``None`` for strict tools on a model whose
        tool-call format cannot be constrained. With ``generic`` (the model uses the generic
        tool format, :mod:`~pensieve_bridge.tool_format`), a forced call is written in that
        format, and the ``generic`` constraint holds a free answer to it."""
        from llguidance import LLMatcher

        kind = constraint.get("type")
        if generic and kind in ("tool", "generic"):
            forced = kind == "tool"
            names = constraint.get("names") if forced else [(t.get("function") or {}).get("name") for t in tools or []]
            where = "tools"
            schema = tool_format.answer_schema(tool_call_schema(names or [], tools or []), forced)
            kind = "generic"
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
            schema = closed(schema)
        elif kind == "generic":
            pass
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
        return Constraint(matcher, llt.vocab_size, set(self._tokenizer.eos_token_ids))

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
            arguments = closed(fn.get("parameters") or {"type": "object"}) if name in strict else {"type": "object"}
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


#: Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
ONE_SCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames")
SCHEMAS = ("anyOf", "oneOf", "allOf", "prefixItems")
NAMED_SCHEMAS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def closed(schema):
    """``schema`` with every object that lists its ``properties`` closed to others
    (``additionalProperties: false``) unless it says otherwise, as OpenAI's strict mode reads a
    schema: the grammar then never invents a key, nor writes one twice (an open object admits
    any key, the same one again too, and a small model loops on that until ``max_tokens``).
    Returns a copy; the schema given is not changed."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ONE_SCHEMA or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = closed(value)
        elif key in SCHEMAS and isinstance(value, list):
            out[key] = [closed(s) for s in value]
        elif key in NAMED_SCHEMAS and isinstance(value, dict):
            out[key] = {name: closed(s) for name, s in value.items()}
        else:
            out[key] = value
    if isinstance(schema.get("properties"), dict) and not any(
        k in schema for k in ("additionalProperties", "patternProperties", "unevaluatedProperties")
    ):
        out["additionalProperties"] = False
    return out


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
                "properties": {"name": {"const": name}, "arguments": closed(fn.get("parameters") or {"type": "object"})},
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

    def __init__(self, matcher, vocab_size: int, eos: frozenset = frozenset()):
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        #: End-of-sequence tokens: never drafted, never consumed by :meth:`begin` (the grammar
        #: cannot take one back).
        self._eos = eos
        self._bitmask = allocate_token_bitmask(1, vocab_size)
        self._vocab = vocab_size
        self._started = False

    @property
    def started(self) -> bool:
        """Whether it has been called once (the first call sees the prompt's last token, which
        it does not consume)."""
        return self._started

    def allowed(self) -> np.ndarray:
        """The tokens the grammar allows next, as booleans over the tokenizer's vocabulary."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        return np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self._vocab].astype(np.bool_)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # The forward pass starts now, and the mask is computed while it runs: both wait only
        # for the token sampled last step.
        mx.async_eval(logits)
        if self._started:
            # The token sampled last step (the first call sees the prompt's last token).
            self._consume(int(tokens[-1].item()))
        self._started = True
        return mx.where(mx.array(widen(self.allowed(), logits.shape[-1])), logits, -mx.inf)

    def _consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"constrained decoding: token {token} refused: {self.matcher.get_error()}")

    def begin(self, first: int, draft: list[int], most: int) -> tuple[list[int], list[np.ndarray], int]:
        """A speculative step (:mod:`~pensieve_bridge.speculate`), in place of a call: consumes
        ``first`` (the token the step feeds), then the draft's tokens while the grammar allows
        them. A draft left empty becomes the tokens the grammar forces next, up to ``most`` (a
        forced call's ``{"name": "``, a schema's keys): verified, they are always kept. Returns
        the draft so cut, what the grammar allows after each token consumed (one more than the
        draft), and how many tokens were consumed: :meth:`rollback` gives back the draft
        tokens that verification refuses, or all of them when the step does not run.

        An end of sequence is never consumed here (the grammar cannot give one back): as
        ``first`` it ends the generation in this step, and a draft stops before one."""
        if first in self._eos:
            return [], [np.ones(self._vocab, dtype=np.bool_)], 0
        self._consume(first)
        draft = draft[: self.matcher.validate_tokens(draft)] if draft else []
        if not draft and most > 0:
            draft = self.matcher.compute_ff_tokens()[:most]
        draft = list(itertools.takewhile(lambda t: t < self._vocab and t not in self._eos, draft))
        masks = [self.allowed()]
        for t in draft:
            self._consume(t)
            masks.append(self.allowed())
        return draft, masks, 1 + len(draft)

    def rollback(self, n: int) -> None:
        """Forgets the last ``n`` tokens consumed."""
        if n > 0 and not self.matcher.rollback(n):
            raise RuntimeError(f"constrained decoding: rollback of {n} tokens failed: {self.matcher.get_error()}")


def widen(allowed: np.ndarray, width: int) -> np.ndarray:
    """``allowed`` over ``width`` logits: a model's output may be padded past the tokenizer's
    vocabulary, and those ids are never allowed."""
    if width > allowed.size:
        allowed = np.concatenate([allowed, np.zeros(width - allowed.size, dtype=allowed.dtype)])
    return allowed[:width]


class ConstrainedOutput:
    """In place of the response splitter for a constrained generation: JSON text streams as
    text; a forced call streams as a call (:class:`~pensieve_bridge.calls.CallStream`: its name,
    then its arguments as they come, then the whole call), and a call cut short (``max_tokens``)
    is still a call, its arguments completed."""

    def __init__(self, call: bool, names: Optional[list] = None):
        self._call = CallStream() if call else None
        self._names = names or []
        self.made_tool_call = False

    def feed(self, text: str, finish=None) -> list[tuple[Piece, str]]:
        if self._call is None:
            return [(Piece.TEXT, text)] if text else []
        out = self._call.feed(text) if text else []
        if finish is not None:
            call = self._call.finish(self._names)
            # A call cut before its name could be told (max_tokens of a few tokens) leaves
            # nothing: what was written is the grammar's scaffolding, not an answer.
            if call is not None:
                self.made_tool_call = True
                out.append(call)
        return out
