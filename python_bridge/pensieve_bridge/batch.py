"""Continuous batching with a prompt cache: what pensieve's backend thread drives.

Rust owns one :class:`Batcher` on its backend thread (made by :func:`open_batcher`) and runs a
loop: :meth:`Batcher.add` for each request that starts (rendering, prompt-cache lookup,
insertion into mlx-lm's ``BatchGenerator``), :meth:`Batcher.step` for one decoding step of
every running generation (one call, one GIL crossing, for the whole batch),
:meth:`Batcher.cancel` for clients that left or an Emergency abort, and the engine's
``clear_cache`` whenever the batch is idle. Results are tuples of small integer codes
(:mod:`pensieve_bridge.protocol`), never strings to match.

The prompt cache (:class:`~pensieve_bridge.prompt_cache.PromptCache`, over mlx-lm's
``LRUPromptCache``): the KV cache of each finished generation is kept under its tokens (prompt
and answer), and a new prompt starts from the longest cached prefix, trimmed to the point where
the two diverge. Entries own exactly the memory they count. It is capped in bytes, together
with the caches of the running generations, and :meth:`Batcher.drop_prompt_cache` releases all
of it, to the disk tier (:mod:`~pensieve_bridge.disk_cache`) when there is one: an entry
evicted from memory, or released when memory leaves Safe, is written to disk off this thread,
and a prompt that memory does not cover is read from disk when disk covers more. At Warning,
finished generations go straight to disk (:class:`~pensieve_bridge.protocol.Caching`), so that
a session's next turn reads its prefix from disk even while memory stays short.

A long prompt is rendered off this thread (:mod:`~pensieve_bridge.render`): :meth:`Batcher.add`
answers :attr:`~pensieve_bridge.protocol.Added.READING` (add it again) until its tokens are
ready, and :meth:`Batcher.count_tokens` answers -1, so that running streams keep flowing.

A request's stop sequences go to mlx-lm too, as token sequences, so that a sequence whose
tokens match stops inside the batch at once; Rust still matches the text (a stop string can be
tokenised another way) and names the sequence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, make_stop_sequences
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from . import disk_cache, tool_format
from .calls import GenericOutput
from .constrain import ConstrainedOutput, ConstraintError, Grammars
from .engine import SCRIPTED, Engine
from .prompt_batch import PromptBatch
from .prompt_cache import PromptCache, own
from .protocol import Added, AddParams, AddResult, CacheStats, Caching, DiskStats, Finish, Out, Piece, Stepped
from .render import Renderer
from .response import ResponseSplitter, initial_state
from .speculate import Sampling, Speculation, SpeculativeBatch
from .step_budget import StepBudget

log = logging.getLogger(__name__)

#: How many prompts are prefilled together.
PREFILL_BATCH = 8
#: Prompt tokens processed per model call while prefilling.
PREFILL_STEP = 2048
#: A cached prefix shorter than this many tokens is not used.
MIN_REUSE = 16
#: Rendered prompts kept for requests waiting for a disk read.
MAX_READING = 64
#: mlx-lm's finish reasons, as protocol codes.
FINISH = {"stop": Finish.STOP, "length": Finish.LENGTH}


def open_batcher(
    engine: Engine,
    max_concurrent: int,
    prompt_cache_bytes: int,
    disk_dir: str = "",
    disk_bytes: int = 0,
    max_decode_stall_ms: int = 0,
    prompt_lookup_tokens: int = 0,
    draft=None,
) -> "Batcher":
    """The batcher for ``engine``: the scripted test batcher for a ``scripted:`` model id. With
    ``disk_bytes``, its prompt cache has a disk tier of that size under ``disk_dir`` (``""``:
    the user's cache folder). ``max_decode_stall_ms`` bounds each step's prefill while other
    generations decode (:mod:`~pensieve_bridge.step_budget`; 0: full chunks always);
    ``prompt_lookup_tokens`` is the most tokens a generation drafts from its prompt in a step
    (:mod:`~pensieve_bridge.speculate`; 0: no lookup); ``draft``, a
    :class:`~pensieve_bridge.draft.DraftModel`, drafts for generations whose prompt does not."""
    cls = Batcher
    if engine.model_id.startswith(SCRIPTED):
        from .testing import ScriptedBatcher

        cls = ScriptedBatcher
    return cls(
        engine, max_concurrent, prompt_cache_bytes, disk_dir, disk_bytes, max_decode_stall_ms, prompt_lookup_tokens, draft
    )


@dataclass
class Running:
    """One generation in the batch, as the bridge sees it."""

    splitter: ResponseSplitter
    detokenizer: object
    #: Prompt and generated tokens so far: the size of its KV cache, in tokens.
    tokens: int = 0
    #: Prompt tokens in its KV cache while its prompt is read (from the prompt cache, then
    #: read by the model): :meth:`Batcher.prefill_progress`.
    prefilled: int = 0


@dataclass
class Batcher:
    """The running generations and the prompt cache. See the module docs."""

    engine: Engine
    max_concurrent: int = 8
    prompt_cache_bytes: int = 0
    disk_dir: str = ""
    disk_bytes: int = 0
    max_decode_stall_ms: int = 0
    prompt_lookup_tokens: int = 0
    #: A :class:`~pensieve_bridge.draft.DraftModel` (None: drafts come from the prompt only).
    draft: Optional[object] = None
    _gen: BatchGenerator = field(init=False)
    _cache: Optional[PromptCache] = field(init=False)
    _running: dict = field(init=False, default_factory=dict)
    _caching: Caching = field(init=False, default=Caching.MEMORY)
    #: MLX's memory limit in bytes (0: none); see :meth:`set_memory_limit`.
    _limit: int = field(init=False, default=0)

    def __post_init__(self):
        self._eos = set(self.engine.tokenizer.eos_token_ids)
        self._disk = None
        self._cache = None
        #: Prompts waiting for a disk read, rendered: ``{chat_json: (chat, tokens)}``.
        self._reading = {}
        if self.prompt_cache_bytes > 0:
            if self.disk_bytes > 0 and self.engine.identity:
                self._disk = disk_cache.open_tier(
                    self.disk_dir, self.engine.identity, self.disk_bytes, self.engine.source
                )
            spill = self._disk.spill if self._disk is not None else None
            self._cache = PromptCache(self.engine.path, self.prompt_cache_bytes, spill)
        self._grammars = Grammars(self.engine.tokenizer)
        self._renderer = Renderer(self.engine.render_chat)
        self._budget = StepBudget(self.max_decode_stall_ms, PREFILL_STEP)
        self._speculation = Speculation(self.prompt_lookup_tokens, self.draft)
        self._new_generator()

    def _new_generator(self):
        self._gen = BatchGenerator(
            self.engine.model,
            completion_batch_size=self.max_concurrent,
            prefill_batch_size=min(self.max_concurrent, PREFILL_BATCH),
            prefill_step_size=PREFILL_STEP,
        )
        # Prompts' caches are allocated once for the whole prompt, not grown 256 tokens at a time.
        self._gen._prompt_batch = PromptBatch.empty(self.engine.model, self._gen.sampler, prefill_step_size=PREFILL_STEP)
        # Decoding steps may verify drafts from the prompt (mlx-lm's own step otherwise).
        batch = SpeculativeBatch.empty(self.engine.model, self._gen.sampler)
        batch.speculation = self._speculation
        self._gen._generation_batch = batch

    def add(self, chat_json: str, params_json: str, context_length: int) -> AddResult:
        """Renders a request and queues it in the batch.

        ``params`` is an :class:`~pensieve_bridge.protocol.AddParams` in JSON. Returns an
        :class:`~pensieve_bridge.protocol.AddResult`; with
        :attr:`Added.TOO_LONG` nothing is queued (the prompt is longer than ``context_length``;
        0: no limit), nor with :attr:`Added.REFUSED` (the constraint cannot be used: ``message``
        says why), nor with :attr:`Added.READING` (its prompt's cache is being read from disk,
        off this thread: add it again).
        """
        engine = self.engine
        rendered = self._reading.pop(chat_json, None) or self._renderer.render(chat_json)
        if rendered is None:
            # A long prompt, being rendered off this thread: the others keep stepping.
            return AddResult(Added.READING, 0, 0, 0, "", "")
        chat, tokens = rendered
        params = AddParams.from_json(params_json)
        n = len(tokens)
        if context_length and n > context_length:
            return AddResult(Added.TOO_LONG, 0, n, 0, "", "")
        on_disk = None
        if self._disk is not None:
            hit = self._disk.lookup(tokens, lambda: self._cache.covered(tokens))
            if hit is not None:
                ready, on_disk = self._disk.read(hit)
                if not ready:
                    self._reading[chat_json] = (chat, tokens)
                    while len(self._reading) > MAX_READING:  # requests that left while waiting
                        del self._reading[next(iter(self._reading))]
                    return AddResult(Added.READING, 0, n, 0, "", "")
        processors = None
        constraint = params.constraint or {}
        # A prefill is continued as it is, not held to the format.
        generic = bool(chat.get("tools")) and engine.tool_format == tool_format.GENERIC and not chat.get("continue_final")
        if generic and constraint.get("type") in (None, "strict_tools"):
            # Tools in the generic format: the answer is held to a call or a reply.
            constraint = {"type": "generic"}
        if constraint:
            try:
                processor = self._grammars.compile(constraint, chat.get("tools"), generic)
            except ConstraintError as e:
                return AddResult(Added.REFUSED, 0, n, 0, e.problem, e.field)
            if processor is None:
                log.warning("strict tools are not enforced: this model's tool calls are not JSON between special tokens")
            else:
                processors = [processor]
        running = Running(
            splitter=ResponseSplitter(engine.tokenizer, chat.get("tools"), initial_state(engine.tokenizer, tokens)),
            detokenizer=engine.tokenizer.detokenizer,
        )
        running, max_tokens = self._prepare(running, tokens, int(params.max_tokens))
        running.tokens = n
        if generic and constraint["type"] in ("tool", "generic"):
            running.splitter = GenericOutput(constraint.get("names"))
        elif processors is not None and constraint["type"] in ("tool", "json_schema"):
            # A strict-tools answer is free text with calls in the model's markers: the usual
            # splitter reads it.
            running.splitter = ConstrainedOutput(call=constraint["type"] == "tool", names=constraint.get("names"))
        cache, rest = None, tokens
        if on_disk is not None:
            cache, rest = on_disk, tokens[hit.covered :]
        elif self._cache is not None:
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
        running.prefilled = cached
        sampling = Sampling(float(params.temperature), float(params.top_p or 0.0), int(params.top_k or 0))
        sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        (uid,) = self._gen.insert_segments(
            [[rest]],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[tokens[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[make_stop_sequences(engine.tokenizer, params.stop or [])],
        )
        del cache
        self._running[uid] = running
        self._speculation.sampling[uid] = sampling
        self._fit_cache()
        return AddResult(Added.STARTED, uid, n, cached, "", "")

    def count_tokens(self, chat_json: str) -> int:
        """The prompt's token count; -1 while a long prompt is rendered off this thread (ask
        again with the same chat)."""
        return self._renderer.count(chat_json)

    def _prepare(self, running: Running, tokens: list[int], max_tokens: int) -> tuple[Running, int]:
        """What a generation starts as, and its ``max_tokens`` in mlx-lm (for subclasses)."""
        return running, max_tokens

    def prefill_progress(self, uids: list[int]) -> list[int]:
        """For each of ``uids``: its prompt tokens read so far, cached ones included (-1: not
        running)."""
        return [r.prefilled if (r := self._running.get(uid)) is not None else -1 for uid in uids]

    def step(self) -> list[Stepped]:
        """One step of every running generation: a :class:`~pensieve_bridge.protocol.Stepped`
        each (``uid``, ``pieces``, ``finish``).

        ``pieces`` are :class:`~pensieve_bridge.protocol.Out` (``kind``, ``payload``) from the
        response splitter; ``finish`` is None while
        a generation runs, then a :class:`~pensieve_bridge.protocol.Finish`. A generation whose
        own processing raised reports ``[(Piece.ERROR, message)]`` with ``Finish.ERROR`` and is
        removed; an exception from the model itself propagates (the whole batch has failed: the
        caller cancels everything and calls :meth:`reset`). Generations still prefilling
        report nothing.
        """
        out: list = []
        if self._running and self._model_step_needed():
            if self._limit:
                self.engine.reset_peak()
            gen = self._gen
            # While streams decode, a step reads only as much prompt as the budget allows.
            # Decoding: generations already, or a prompt read to its last token, which starts
            # decoding in this step (before this step's prefill).
            decoding = len(gen._generation_batch) > 0 or any(
                len(seq[0]) == 1 and len(seq[0][0]) == 1 for seq in gen._currently_processing
            )
            gen.prefill_step_size = self._budget.tokens(decoding, len(gen._currently_processing))
            if gen._currently_processing or gen._unprocessed_sequences:
                remaining = {uid: seq[2] - seq[1] for uid, seq in zip(gen._prompt_batch.uids, gen._currently_processing)}
                remaining.update((seq[0], sum(len(s) for s in seq[1])) for seq in gen._unprocessed_sequences)
                gen._prompt_batch.remaining = remaining
                gen._prompt_batch.decoding = decoding
                if len(remaining) == 1 and len(gen._generation_batch):
                    # One prompt, moving into the decoding batch after its last chunk: the
                    # buffers of that move are made in the steps before it.
                    (left,) = remaining.values()
                    gen._prompt_batch.reserve(gen._generation_batch, -(-(left - 1) // max(1, gen.prefill_step_size)))
            before = (gen._counters.prompt_tokens, gen._counters.prompt_time, time.perf_counter())
            prompts, responses = gen.next()
            wall, read = time.perf_counter() - before[2], gen._counters.prompt_tokens - before[0]
            if read:
                spent = gen._counters.prompt_time - before[1]
                self._budget.learn(read, spent)
                if decoding and self._budget.decode is None:
                    # Streams have decoded only beside prompts so far: what this step spent
                    # besides its prompt stands in for a decoding step until one is timed alone.
                    self._budget.learn_decode(wall - spent)
            elif decoding:
                self._budget.learn_decode(wall)
            for p in prompts:
                running = self._running.get(p.uid)
                if running is not None:
                    # ``progress`` counts the tokens given to the model; the cached ones come first.
                    running.prefilled = running.tokens - p.progress[1] + p.progress[0]
            for r in responses:
                running = self._running.get(r.uid)
                if running is not None:
                    running.tokens += 1
                    self._respond(out, r, running)
            if self._limit:
                self._enforce_limit(out)
        if self._disk is not None:
            self._disk.poll()
        self._release_if_idle()
        return out

    def set_memory_limit(self, limit: int) -> None:
        """Sets MLX's memory limit (and, on Metal, its wired limit) to ``limit`` bytes, and
        watches it: a step whose peak goes over it stops the largest running generation
        (:attr:`Finish.MEMORY`). MLX treats its limit as a guideline (it waits for pending work
        to free memory, and releases its cache, before it allocates more; it does not refuse an
        allocation), so the step's peak is the line pensieve holds."""
        self._limit = int(limit)
        if self._limit:
            mx.set_memory_limit(self._limit)
            if mx.metal.is_available():
                most = int(mx.metal.device_info().get("max_recommended_working_set_size", self._limit))
                mx.set_wired_limit(min(self._limit, most))

    def _enforce_limit(self, out: list) -> None:
        """After a step: when MLX's peak went over the limit, the largest running generation
        ends with :attr:`Finish.MEMORY` and leaves the batch."""
        peak = self.engine.step_peak()
        if peak <= self._limit or not self._running:
            return
        uid, running = max(self._running.items(), key=lambda item: item[1].tokens)
        gib = 1024**3
        message = (
            f"MLX went over its memory limit: {peak / gib:.2f} GB at the peak of a step, over the limit of "
            f"{self._limit / gib:.2f} GB (backend.mlx_memory_limit_mb, or the memory left above "
            f"memory.emergency_gb); this generation, the largest running ({running.tokens} tokens), was stopped "
            "to bring memory back: retry when memory is free, or send a shorter prompt"
        )
        out[:] = [o for o in out if o.uid != uid]
        out.append(Stepped(uid, [Out(Piece.ERROR, message)], Finish.MEMORY))
        # Rust clears MLX's cache as this failed generation settles, before its last event.
        self.cancel([uid])

    def _model_step_needed(self) -> bool:
        return True

    def _respond(self, out: list, r, running: Running) -> None:
        """Turns mlx-lm's response for one generation into its pieces."""
        detok = running.detokenizer
        finish = FINISH.get(r.finish_reason) if r.finish_reason is not None else None
        if finish != Finish.STOP or r.token not in self._eos:
            # An end-of-sequence token is not text; the last token of a stop sequence is,
            # so that Rust sees the whole sequence and names it.
            detok.add_token(r.token)
        if finish is not None:
            detok.finalize()
        self._emit(out, r.uid, running, detok.last_segment, finish)
        if finish is not None:
            self._keep(r.all_tokens, r.prompt_cache)

    def _keep(self, tokens, prompt_cache) -> None:
        """A finished (or kept cancelled) generation's cache, where :attr:`_caching` says."""
        if not self._keeping():
            return
        if self._caching == Caching.MEMORY:
            self._cache.insert(tokens, prompt_cache)
        else:
            own(prompt_cache)  # evaluated, contiguous: what the writer thread writes as it is
            self._disk.spill(list(tokens), prompt_cache)

    def _keeping(self) -> bool:
        """Whether finished generations' caches are kept anywhere now."""
        if self._caching == Caching.MEMORY:
            return self._cache is not None
        return self._caching == Caching.DISK and self._disk is not None

    def _emit(self, out: list, uid: int, running: Running, text: str, finish: Optional[Finish]) -> None:
        try:
            pieces = self._pieces(running, text, finish)
            if finish == Finish.STOP and running.splitter.made_tool_call:
                finish = Finish.TOOL_USE
            out.append(Stepped(uid, [Out(*p) for p in pieces], finish))
            if finish is not None:
                del self._running[uid]
                self._speculation.sampling.pop(uid, None)
        except Exception as e:  # this generation's own failure; the others go on
            out.append(Stepped(uid, [Out(Piece.ERROR, f"{type(e).__name__}: {e}")], Finish.ERROR))
            self.cancel([uid])

    def _pieces(self, running: Running, text: str, finish: Optional[Finish]) -> list:
        return running.splitter.feed(text, finish)

    def _release_if_idle(self) -> None:
        """An idle batch starts afresh (5 µs): mlx-lm's generation batch keeps its last step's
        logits (vocabulary × 4 bytes a sequence) after its last sequence has left, and an idle
        server holds only the weights and the prompt cache."""
        if not self._running:
            self._gen.close()
            self._new_generator()

    def cancel(self, uids: list[int], keep: bool = False) -> None:
        """Stops these generations and forgets them. With ``keep`` (a client that left, a stop
        sequence), what their KV cache holds so far goes into the prompt cache: an agent whose
        user interrupted a turn sends that prefix again next. Not after failures."""
        for uid in uids:
            self._running.pop(uid, None)
            self._speculation.sampling.pop(uid, None)
        if not uids:
            return
        keep = keep and self._keeping()
        caches = self._gen.remove(list(uids), return_prompt_caches=keep)
        for cache, tokens in caches.values():
            if len(tokens) >= MIN_REUSE:
                self._keep(tokens, cache)
        if caches:
            self._fit_cache()
        self._release_if_idle()

    def reset(self) -> None:
        """After a failure of the model itself: forgets every generation, starts a new batch."""
        self._running.clear()
        self._speculation.sampling.clear()
        self._gen.close()
        self._new_generator()

    def _fit_cache(self) -> None:
        """Keeps the prompt cache and the running generations' caches within the budget."""
        if self._cache is not None:
            self._cache.trim_to(self.prompt_cache_bytes - self._gen.prompt_cache_nbytes)

    def drop_prompt_cache(self) -> None:
        """Releases every cached prompt from memory (to the disk tier, when there is one)."""
        if self._cache is not None:
            self._cache.clear()
        mx.clear_cache()

    def set_caching(self, mode: int) -> None:
        """Where finished generations go (a :class:`~pensieve_bridge.protocol.Caching`): the
        prompt cache in memory (Safe), the disk tier (Warning) or nowhere (Critical, Emergency;
        an unload, a stop). Out of memory, the prompt cache is released, to disk when there
        is a disk tier."""
        self._caching = Caching(mode)
        if self._caching != Caching.MEMORY:
            self.drop_prompt_cache()

    def speculation_stats(self) -> tuple[int, int, int, int, int]:
        """Speculation's counters: ``(steps, drafted, accepted, sequence_steps, tokens)``
        (:class:`~pensieve_bridge.speculate.Stats`)."""
        s = self._speculation.stats
        return (s.steps, s.drafted, s.accepted, s.sequence_steps, s.tokens)

    def prompt_cache_stats(self) -> CacheStats:
        """``(bytes, entries)`` of the prompt cache."""
        if self._cache is None:
            return CacheStats(0, 0)
        return CacheStats(self._cache.nbytes, len(self._cache))

    def disk_stats(self) -> Optional[DiskStats]:
        """The disk tier's :meth:`~pensieve_bridge.disk_cache.DiskTier.stats` (None: no disk
        tier); frees what finished writes held."""
        return self._disk.stats() if self._disk is not None else None
