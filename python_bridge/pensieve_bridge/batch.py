"""Continuous batching with a prompt cache: what pensieve's backend thread drives.

Rust owns one :class:`Batcher` on its backend thread and runs a loop: :meth:`Batcher.add` for
each request that starts (rendering, prompt-cache lookup, insertion into mlx-lm's
``BatchGenerator``), :meth:`Batcher.step` for one decoding step of every running generation
(one call, one GIL crossing, for the whole batch), :meth:`Batcher.cancel` for clients that left
or an Emergency abort, and the engine's ``clear_cache`` whenever the batch is idle.

The prompt cache (:class:`~pensieve_bridge.prompt_cache.PromptCache`, over mlx-lm's
``LRUPromptCache``): the KV cache of each finished generation is kept under its tokens (prompt
and answer), and a new prompt starts from the longest cached prefix, trimmed to the point where
the two diverge. Entries own exactly the memory they count. It is capped in bytes, together
with the caches of the running generations, and :meth:`Batcher.drop_prompt_cache` releases all
of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, make_stop_sequences
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .engine import Engine, _replay, _script_in
from .prompt_cache import PromptCache
from .response import ResponseSplitter, initial_state

#: How many prompts are prefilled together.
PREFILL_BATCH = 8
#: Prompt tokens processed per model call while prefilling.
PREFILL_STEP = 2048
#: A cached prefix shorter than this many tokens is not used.
MIN_REUSE = 16


@dataclass
class _Running:
    splitter: ResponseSplitter
    detokenizer: object
    fault: bool = False
    produced: int = 0
    #: A scripted (test) answer: the prompt is processed for real (and cached), then this is
    #: replayed instead of sampling, one token per step.
    replay: Optional[Iterator[tuple]] = None
    prefilling: bool = False


@dataclass
class Batcher:
    """The running generations and the prompt cache. See the module docs."""

    engine: Engine
    max_concurrent: int = 8
    prompt_cache_bytes: int = 0
    _gen: BatchGenerator = field(init=False)
    _cache: Optional[PromptCache] = field(init=False)
    _running: dict = field(init=False, default_factory=dict)
    _caching: bool = field(init=False, default=True)

    def __post_init__(self):
        self._stops = make_stop_sequences(self.engine.tokenizer)
        self._cache = PromptCache(self.engine.path, self.prompt_cache_bytes) if self.prompt_cache_bytes > 0 else None
        self._new_generator()

    def _new_generator(self):
        self._gen = BatchGenerator(
            self.engine.model,
            completion_batch_size=self.max_concurrent,
            prefill_batch_size=min(self.max_concurrent, PREFILL_BATCH),
            prefill_step_size=PREFILL_STEP,
        )

    def add(self, chat_json: str, params_json: str, context_length: int) -> tuple[int, int, int]:
        """Renders a request and queues it in the batch.

        Returns ``(uid, input_tokens, cached_tokens)``; ``uid`` is -1 (and nothing is queued)
        when the prompt is longer than ``context_length`` (0: no limit).
        """
        engine = self.engine
        chat = json.loads(chat_json)
        params = json.loads(params_json)
        tokens = engine._render(chat)
        n = len(tokens)
        if context_length and n > context_length:
            return -1, n, 0
        max_tokens = int(params["max_tokens"])
        tools = chat.get("tools")
        prompt_text = None
        if engine._fault_marker or engine._scripts:
            prompt_text = engine.tokenizer.decode(tokens)
        running = _Running(
            splitter=ResponseSplitter(engine.tokenizer, tools, initial_state(engine.tokenizer, tokens)),
            detokenizer=engine.tokenizer.detokenizer,
            fault=engine._fault_marker is not None and engine._fault_marker in prompt_text,
        )
        script = _script_in(prompt_text) if engine._scripts else None
        if script is not None:
            running.replay = _replay(engine.tokenizer, script, max_tokens)
            running.prefilling = True
            max_tokens = 1

        cache, rest = None, tokens
        if self._cache is not None:
            cache, rest = self._cache.fetch(tokens)
            if cache is not None and not rest:
                # An exact hit: the last prompt token must go through the model again to give
                # the first logits, so the cache gives up one token.
                if can_trim_prompt_cache(cache):
                    trim_prompt_cache(cache, 1)
                    rest = tokens[-1:]
                else:
                    cache, rest = None, tokens
        if cache is not None and n - len(rest) < MIN_REUSE:
            # Copying a cached prefix this short costs more than processing it again.
            cache, rest = None, tokens
        cached = n - len(rest)
        sampler = make_sampler(
            temp=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p") or 0.0),
            top_k=int(params.get("top_k") or 0),
        )
        (uid,) = self._gen.insert_segments(
            [[rest]],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[tokens[:cached]],
            samplers=[sampler],
            stop_sequences=[self._stops],
        )
        del cache
        self._running[uid] = running
        self._fit_cache()
        return uid, n, cached

    def step(self) -> list[tuple[int, list[tuple[str, str]], Optional[str]]]:
        """One step of every running generation: ``[(uid, pieces, finish)]``.

        ``pieces`` are ``(kind, payload)`` from the response splitter (``text``, ``thinking``,
        ``tool``); ``finish`` is None while a generation runs, then ``stop``, ``tool_use`` or
        ``length``. A generation whose own processing raised reports ``[("error", message)]``
        with finish ``error`` and is removed; an exception from the model itself propagates
        (the whole batch has failed: the caller cancels everything and calls :meth:`reset`).
        Generations still prefilling report nothing.
        """
        out = []
        replaying = 0
        for uid, running in list(self._running.items()):
            if running.replay is not None and not running.prefilling:
                replaying += 1
                text, finish = next(running.replay)
                self._emit(out, uid, running, text, finish)
        if len(self._running) > replaying:
            _, responses = self._gen.next()
            for r in responses:
                running = self._running.get(r.uid)
                if running is None:
                    continue
                if running.prefilling:
                    # The one token sampled after a scripted prompt is not part of the answer.
                    running.prefilling = r.finish_reason is None
                    if not running.prefilling and self._cache is not None and self._caching:
                        self._cache.insert(r.all_tokens, r.prompt_cache)
                    continue
                detok = running.detokenizer
                if r.finish_reason != "stop":
                    detok.add_token(r.token)
                if r.finish_reason is not None:
                    detok.finalize()
                self._emit(out, r.uid, running, detok.last_segment, r.finish_reason)
                if r.finish_reason is not None and self._cache is not None and self._caching:
                    self._cache.insert(r.all_tokens, r.prompt_cache)
        self._release_if_idle()
        return out

    def _release_if_idle(self) -> None:
        """An idle batch starts afresh (5 µs): mlx-lm's generation batch keeps its last step's
        logits (vocabulary × 4 bytes a sequence) after its last sequence has left, and an idle
        server holds only the weights and the prompt cache."""
        if not self._running:
            self._gen.close()
            self._new_generator()

    def _emit(self, out, uid, running, text, finish):
        try:
            running.produced += 1
            if running.fault and running.produced > 2:
                raise RuntimeError("injected fault: the test asked this generation to fail")
            pieces = running.splitter.feed(text, finish)
            if finish == "stop" and running.splitter.made_tool_call:
                finish = "tool_use"
            out.append((uid, pieces, finish))
            if finish is not None:
                del self._running[uid]
        except Exception as e:  # this generation's own failure; the others go on
            out.append((uid, [("error", f"{type(e).__name__}: {e}")], "error"))
            self.cancel([uid])

    def cancel(self, uids: list[int], keep: bool = False) -> None:
        """Stops these generations and forgets them. With ``keep`` (a client that left, a stop
        sequence), what their KV cache holds so far goes into the prompt cache: an agent whose
        user interrupted a turn sends that prefix again next. Not after failures."""
        for uid in uids:
            self._running.pop(uid, None)
        if not uids:
            return
        keep = keep and self._cache is not None and self._caching
        caches = self._gen.remove(list(uids), return_prompt_caches=keep)
        for cache, tokens in caches.values():
            if len(tokens) >= MIN_REUSE:
                self._cache.insert(tokens, cache)
        if caches:
            self._fit_cache()
        self._release_if_idle()

    def reset(self) -> None:
        """After a failure of the model itself: forgets every generation, starts a new batch."""
        self._running.clear()
        self._gen.close()
        self._new_generator()

    def running(self) -> int:
        return len(self._running)

    def _fit_cache(self) -> None:
        """Keeps the prompt cache and the running generations' caches within the budget."""
        if self._cache is not None:
            self._cache.trim_to(self.prompt_cache_bytes - self._gen.prompt_cache_nbytes)

    def drop_prompt_cache(self) -> None:
        """Releases every cached prompt."""
        if self._cache is not None:
            self._cache.clear()
        mx.clear_cache()

    def set_caching(self, on: bool) -> None:
        """Whether finished generations are kept in the prompt cache; off also releases it all
        (memory has left Safe)."""
        self._caching = on
        if not on:
            self.drop_prompt_cache()

    def prompt_cache_stats(self) -> tuple[int, int]:
        """``(bytes, entries)`` of the prompt cache."""
        if self._cache is None:
            return 0, 0
        return self._cache.nbytes, len(self._cache)
