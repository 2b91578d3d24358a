"""The loaded model: what pensieve's Rust backend loads on its thread.

Rust owns one :class:`Engine` (model, tokenizer, chat template, memory counters, cache
clearing) and one :class:`~pensieve_bridge.batch.Batcher` built on it (by
:func:`~pensieve_bridge.batch.open_batcher`), which runs the generations. :meth:`Engine.render` is also what ``count_tokens`` uses, so that counts match
generation exactly.
"""

from __future__ import annotations

import gc
import json
import sys

import mlx.core as mx
from mlx_lm import load

from . import demo

#: A model id starting with this is served by the test batcher of
#: :mod:`pensieve_bridge.testing` (scripted replies, injected faults); the rest is the model.
SCRIPTED = "scripted:"


def resolve_model(model: str) -> str:
    """``demo`` becomes the cached demo folder (built on first use); anything else is passed on.
    A ``scripted:`` prefix (tests) is dropped."""
    model = model.removeprefix(SCRIPTED)
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
        self.clear_cache()

    def describe(self) -> str:
        return (
            f"model {self.model_id} from {self.path}; python {sys.version.split()[0]}; "
            f"mlx {mx.__version__}; context {self.context_length}"
        )

    def render(self, chat_json: str) -> list[int]:
        """Applies the chat template to ``{"messages": [...], "tools": [...] | null}``."""
        return self.render_chat(json.loads(chat_json))

    def render_chat(self, chat: dict) -> list[int]:
        kwargs = {}
        if chat.get("tools"):
            kwargs["tools"] = chat["tools"]
        tokens = self.tokenizer.apply_chat_template(
            chat["messages"], add_generation_prompt=True, **kwargs
        )
        if isinstance(tokens, dict):  # some tokenizers return a BatchEncoding
            tokens = tokens["input_ids"]
        return list(tokens)

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
