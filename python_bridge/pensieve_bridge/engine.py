"""The MLX engine that pensieve's Rust backend drives, one generation at a time.

Rust owns one :class:`Engine` on a dedicated thread. For each request it calls
:meth:`Engine.render` to turn the normalised chat into prompt tokens, then iterates the
generator returned by :meth:`Engine.generate`. The generator clears the MLX cache in its
``finally``; Rust closes it, drops it and calls :meth:`Engine.clear_cache` once more, because
the generator's own locals are only released after its ``finally`` has run.
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
        self.clear_cache()

    def describe(self) -> str:
        return (
            f"model {self.model_id} from {self.path}; python {sys.version.split()[0]}; "
            f"mlx {mx.__version__}; context {self.context_length}"
        )

    def render(self, chat_json: str) -> list[int]:
        """Applies the chat template to ``{"messages": [...], "tools": [...] | null}``."""
        chat = json.loads(chat_json)
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
        """Yields ``(text, finish_reason)`` per token; finish_reason is None until the last one.

        ``finish_reason`` is ``"stop"`` (end of turn) or ``"length"`` (``max_tokens``).
        The MLX cache is cleared however the generator ends.
        """
        params = json.loads(params_json)
        sampler = make_sampler(
            temp=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p") or 0.0),
            top_k=int(params.get("top_k") or 0),
        )
        fault = self._fault_marker is not None and self._fault_marker in self.tokenizer.decode(
            tokens
        )
        try:
            n = 0
            for response in stream_generate(
                self.model,
                self.tokenizer,
                mx.array(tokens),
                max_tokens=int(params["max_tokens"]),
                sampler=sampler,
            ):
                n += 1
                if fault and n > 2:
                    raise RuntimeError("injected fault: the test asked this generation to fail")
                yield (response.text, response.finish_reason)
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
