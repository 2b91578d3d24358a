"""The generic tool format: tools for a model whose chat template cannot show them.

A model whose chat template renders tools, and whose calls mlx-lm can parse (its tokenizer's
``tool_parser``), uses its own format: ``native``. Any other instruct model (SmolLM2's template
ignores ``tools``) would never see the tools, so it gets them the way llama.cpp's server does
for such templates: ``generic``.

- The tools are described in the system prompt (:func:`rewrite`), as JSON, with how to answer:
  ``{"tool_call": {"name": ..., "arguments": {...}}}`` to call one, ``{"response": "..."}`` to
  answer in words.
- The answer is constrained to exactly that (:func:`answer_schema`): one call to a listed tool
  with arguments valid against its schema, or a reply. A forced call (``tool_choice`` ``any``
  or ``tool``) allows only the call.
- Earlier turns are written in the same words, compact as the grammar writes them (so that a
  conversation's next turn finds the answer in the prompt cache): an assistant's reply as
  ``{"response": ...}``, its calls as ``{"tool_call": ...}``, a tool's result as a user message
  ``Result of <tool>: ...``. A final assistant message that the reply continues (a prefill) is
  left as it is, and that reply is not held to the format.

The answer is read by :class:`~pensieve_bridge.calls.GenericOutput`: a reply streams as text, a
call as a call.
"""

from __future__ import annotations

import json

NATIVE = "native"
GENERIC = "generic"

#: What the system prompt says after the tools' descriptions (llama.cpp's words, nearly: on
#: SmolLM2-135M at temperature 0.7, "What is the weather in Paris?" is a call 8 times in 10).
HOW_TO_ANSWER = (
    'Answer in JSON, either with "tool_call" (a request to call a tool) or with "response" (a reply '
    'to the user): {"tool_call": {"name": "<the tool\'s name>", "arguments": {<the arguments>}}} or '
    '{"response": "<your reply>"}. Call a tool when the user asks for something it does.'
)


def detect(tokenizer, render) -> str:
    """``native`` when the chat template shows tools (``render(chat)`` gives other tokens with a
    tool than without) and mlx-lm can parse the model's calls; else ``generic``."""
    if not getattr(tokenizer, "has_tool_calling", False) or getattr(tokenizer, "tool_parser", None) is None:
        return GENERIC
    messages = [{"role": "user", "content": "hello"}]
    probe = {"type": "function", "function": {"name": "pensieve_probe", "description": "a probe", "parameters": {"type": "object", "properties": {}}}}
    try:
        shown = render({"messages": messages, "tools": [probe]}) != render({"messages": messages})
    except Exception:  # a template that raises on tools cannot show them
        return GENERIC
    return NATIVE if shown else GENERIC


def describe(tools: list) -> str:
    """The system prompt's description of ``tools``."""
    listed = []
    for t in tools:
        fn = t.get("function") or {}
        entry = {"name": fn.get("name")}
        if fn.get("description"):
            entry["description"] = fn["description"]
        entry["parameters"] = fn.get("parameters") or {"type": "object"}
        listed.append(entry)
    return "You can call these tools:\n" + "\n".join(json.dumps(e, ensure_ascii=False) for e in listed) + "\n\n" + HOW_TO_ANSWER


def rewrite(chat: dict) -> dict:
    """``chat`` for a template without tools: the tools described in the system prompt, earlier
    calls and results as text; ``tools`` removed."""
    tools = chat.get("tools") or []
    messages = [dict(m) for m in chat["messages"]]
    names = {}
    out = []
    for i, m in enumerate(messages):
        calls = m.pop("tool_calls", None) or []
        prefill = chat.get("continue_final") and i == len(messages) - 1
        if m["role"] == "assistant" and not prefill:
            written = [_compact({"response": m["content"]})] if m.get("content") else []
            for c in calls:
                fn = c.get("function") or {}
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        pass
                names[c.get("id")] = fn.get("name")
                written.append(_compact({"tool_call": {"name": fn.get("name"), "arguments": args}}))
            m["content"] = "\n".join(written)
        elif m["role"] == "tool":
            name = names.get(m.pop("tool_call_id", None)) or "the tool"
            text = f"Result of {name}: {m.get('content') or ''}"
            if out and out[-1]["role"] == "user":
                out[-1]["content"] += "\n\n" + text
                continue
            m = {"role": "user", "content": text}
        out.append(m)
    system = describe(tools)
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{system}" if out[0].get("content") else system
    else:
        out.insert(0, {"role": "system", "content": system})
    rest = {k: v for k, v in chat.items() if k not in ("messages", "tools")}
    return {**rest, "messages": out}


def _compact(value) -> str:
    """JSON as the grammar writes it: no blanks, text as it is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def answer_schema(call: dict, forced: bool) -> dict:
    """The schema of a generic-format answer: ``{"tool_call": <call>}``, or (unless ``forced``)
    that or ``{"response": "..."}``. ``call`` is the schema of one call
    (:func:`~pensieve_bridge.constrain.tool_call_schema`)."""
    as_call = {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"], "additionalProperties": False}
    if forced:
        return as_call
    reply = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"], "additionalProperties": False}
    return {"anyOf": [as_call, reply]}
