"""The loaded model: what pensieve's Rust backend loads on its thread.

Rust owns one :class:`Engine` (model, tokenizer, chat template, memory counters, cache
clearing) and one :class:`~pensieve_bridge.batch.Batcher` built on it, which runs the
generations. :meth:`Engine.render` is also what ``count_tokens`` uses, so that counts match
generation exactly.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Iterator

import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler

from . import demo

#: Set in the environment (tests only) to make a generation whose prompt contains this text
#: raise after two tokens: a real Python exception in the middle of a real generation.
FAULT_MARKER_ENV = "PENSIEVE_FAULT_MARKER"


#: Set to "1" in the environment (tests only): a prompt whose last ``[[script]]...[[/script]]``
#: holds model-shaped output (tool calls, thinking) is answered by replaying that text token by
#: token through the real tokenizer, detokenizer and block splitter, instead of sampling. The
#: demo model's own text is random, so this is how a tool call reaches a client end to end.
SCRIPTS_ENV = "PENSIEVE_TEST_SCRIPTS"
SCRIPT_OPEN, SCRIPT_CLOSE = "[[script]]", "[[/script]]"


def _script_in(prompt_text):
    start = prompt_text.rfind(SCRIPT_OPEN)
    end = prompt_text.find(SCRIPT_CLOSE, start)
    if start < 0 or end < 0:
        return None
    return prompt_text[start + len(SCRIPT_OPEN) : end]


def _replay(tokenizer, text, max_tokens):
    """``(segment, finish_reason)`` per token of ``text``, as stream_generate would yield them."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = tokenizer.detokenizer
    detok.reset()
    for i, token in enumerate(ids[:max_tokens]):
        detok.add_token(token)
        last = i + 1 == min(len(ids), max_tokens)
        if last:
            detok.finalize()
            yield detok.last_segment, "length" if len(ids) > max_tokens else "stop"
        else:
            yield detok.last_segment, None


def resolve_model(model: str) -> str:
    """``demo`` becomes the cached demo folder (built on first use); anything else is passed on."""
    if model == "demo":
        return str(demo.ensure())
    return model


class Engine:
    """A loaded model and tokenizer, with the chat template and generation."""

    def __init__(self, model: str):
        self.model_id = model
        self.path = resolve_model(model)
        self.model, self.tokenizer = load(self.path)
        config = getattr(self.model, "args", None)
        ctx = getattr(config, "max_position_embeddings", None)
        if not ctx:
            ctx = getattr(self.tokenizer, "model_max_length", None)
        self.context_length = int(ctx) if ctx and ctx < 10**9 else 0
        self._fault_marker = os.environ.get(FAULT_MARKER_ENV) or None
        self._scripts = os.environ.get(SCRIPTS_ENV) == "1"
        self.clear_cache()

    def describe(self) -> str:
        return (
            f"model {self.model_id} from {self.path}; python {sys.version.split()[0]}; "
            f"mlx {mx.__version__}; context {self.context_length}"
        )

    def render(self, chat_json: str) -> list[int]:
        """Applies the chat template to ``{"messages": [...], "tools": [...] | null}``."""
        return self._render(json.loads(chat_json))

    def _render(self, chat: dict) -> list[int]:
        kwargs = {}
        if chat.get("tools"):
            kwargs["tools"] = chat["tools"]
        tokens = self.tokenizer.apply_chat_template(
            chat["messages"], add_generation_prompt=True, **kwargs
        )
        if isinstance(tokens, dict):  # some tokenizers return a BatchEncoding
            tokens = tokens["input_ids"]
        return list(tokens)

    def generate(self, tokens: list[int], params_json: str) -> Iterator[tuple]:
        """Yields ``(text, finish_reason)`` per token for prompt ``tokens``, one generation on its
        own with mlx-lm's ``stream_generate``: the reference the batched path
        (:class:`~pensieve_bridge.batch.Batcher`, what the server runs) is compared with."""
        params = json.loads(params_json)
        sampler = make_sampler(
            temp=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p") or 0.0),
            top_k=int(params.get("top_k") or 0),
        )
        try:
            for r in stream_generate(
                self.model, self.tokenizer, mx.array(tokens), max_tokens=int(params["max_tokens"]), sampler=sampler
            ):
                yield r.text, r.finish_reason
        finally:
            mx.clear_cache()

    def clear_cache(self) -> int:
        """Frees everything MLX holds in its cache; returns the cache bytes left (0).

        No ``gc.collect()`` here: it costs about 13 ms with mlx-lm and transformers loaded, on
        every response, and the generation's arrays are freed by reference counting when Rust
        drops the closed generator. ``collect_and_clear`` is the thorough version, for the
        rare case where the cheap one leaves bytes behind.
        """
        mx.clear_cache()
        return mx.get_cache_memory()

    def collect_and_clear(self) -> int:
        """Runs the cycle collector, then clears the cache; returns the cache bytes left."""
        gc.collect()
        mx.clear_cache()
        return mx.get_cache_memory()

    @staticmethod
    def memory() -> tuple[int, int, int]:
        """``(active, cache, peak)`` bytes as MLX counts them."""
        return mx.get_active_memory(), mx.get_cache_memory(), mx.get_peak_memory()
