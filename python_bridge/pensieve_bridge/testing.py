"""Test doubles for pensieve's own tests, chosen by a test-only model id: never by a request.

``--model scripted:demo`` (any model after ``scripted:``) serves that model through
:class:`ScriptedBatcher`, which adds two hooks to the real batcher:

- **Scripted replies.** A prompt whose last ``[[script]]…[[/script]]`` holds model-shaped output
  (tool calls, thinking) is answered by replaying that text token by token through the real
  tokenizer, detokenizer and block splitter, instead of sampling. The prompt itself is processed
  for real (and cached). The demo model's own text is random, so this is how a tool call
  reaches a client end to end.
- **Injected faults.** A generation whose prompt contains :data:`FAULT_MARKER` raises a Python
  exception after two tokens: a real exception in a real generation, which no client input can
  otherwise cause.

A production model id never loads this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from .batch import Batcher, Running
from .protocol import Finish

SCRIPT_OPEN, SCRIPT_CLOSE = "[[script]]", "[[/script]]"
#: A prompt containing this fails after two tokens.
FAULT_MARKER = "PLEASE-FAIL"


def script_in(prompt_text: str) -> Optional[str]:
    """The text of the prompt's last ``[[script]]…[[/script]]``, if any."""
    start = prompt_text.rfind(SCRIPT_OPEN)
    end = prompt_text.find(SCRIPT_CLOSE, start)
    if start < 0 or end < 0:
        return None
    return prompt_text[start + len(SCRIPT_OPEN) : end]


def replay(tokenizer, text: str, max_tokens: int) -> Iterator[tuple[str, Optional[Finish]]]:
    """``(segment, finish)`` per token of ``text``, as a generation would produce them."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = tokenizer.detokenizer
    detok.reset()
    for i, token in enumerate(ids[:max_tokens]):
        detok.add_token(token)
        if i + 1 == min(len(ids), max_tokens):
            detok.finalize()
            yield detok.last_segment, Finish.LENGTH if len(ids) > max_tokens else Finish.STOP
        else:
            yield detok.last_segment, None


@dataclass
class ScriptedRunning(Running):
    fault: bool = False
    produced: int = 0
    #: Replayed instead of sampling, one token per step, once the prompt is processed.
    replay: Optional[Iterator[tuple]] = None
    prefilling: bool = False


class ScriptedBatcher(Batcher):
    """The real batcher, with scripted replies and injected faults. See the module docs."""

    def _prepare(self, running, tokens, max_tokens):
        tokenizer = self.engine.tokenizer
        text = tokenizer.decode(tokens)
        running = ScriptedRunning(running.splitter, running.detokenizer, fault=FAULT_MARKER in text)
        script = script_in(text)
        if script is not None:
            running.replay = replay(tokenizer, script, max_tokens)
            running.prefilling = True
            # The prompt is processed (and cached) for real; the one token sampled is dropped.
            max_tokens = 1
        return running, max_tokens

    def step(self):
        out = []
        for uid, running in list(self._running.items()):
            if running.replay is not None and not running.prefilling:
                text, finish = next(running.replay)
                self._emit(out, uid, running, text, finish)
        return out + super().step()

    def _model_step_needed(self):
        return any(r.replay is None or r.prefilling for r in self._running.values())

    def _respond(self, out, r, running):
        if running.prefilling:
            running.prefilling = r.finish_reason is None
            if not running.prefilling:
                self._keep(r.all_tokens, r.prompt_cache)
            return
        super()._respond(out, r, running)

    def _pieces(self, running, text, finish):
        running.produced += 1
        if running.fault and running.produced > 2:
            raise RuntimeError("injected fault: the test asked this generation to fail")
        return super()._pieces(running, text, finish)
