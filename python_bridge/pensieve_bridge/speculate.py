"""Speculative decoding from the prompt (prompt lookup) in mlx-lm's batched generation.

Agents ask models to write again what their prompt holds: a file with one line changed, a
diff, a tool result quoted back. Each sequence's tokens (prompt and answer) are indexed by
their n-grams (:class:`Lookup`); at a step, the last tokens of a sequence are looked up and
the tokens that followed their latest earlier occurrence become its draft. One forward pass of
``[next token, draft…]`` for the whole batch gives the model's distribution at every draft
position, and the draft is verified against it (:func:`verify`):

- at temperature 0, draft tokens are kept while they are the model's argmax, and the first
  argmax that differs is the next token: the output is what decoding one token at a time
  gives;
- when sampling, draft token ``d`` is kept with probability ``p(d)`` (the drafter proposes
  one token with certainty, so the standard rule ``min(1, p/q)`` is ``p(d)``) and, when it is
  refused, the next token is drawn from ``p`` without ``d``, renormalised; after a kept
  draft, one more token is drawn from the last position. The output's distribution is the
  model's own (Leviathan et al., 2023; Chen et al., 2023).

A sequence whose prompt gives no draft gets one from the model's draft model, when it has one
(:mod:`~pensieve_bridge.draft`): its argmax, a certain draft too, verified the same way.

The positions of refused draft tokens leave the KV cache: trimmed when every sequence refused
as many, otherwise rolled to the left as padding, as mlx-lm does with right-padded prompts
(:meth:`BatchKVCache.finalize`). A step drafts only when the drafts hold at least one token per
sequence on average (padding is computed too), only while speculative steps have been the
faster (:class:`Pace`), and only over caches that can be trimmed (mlx-lm's ``BatchKVCache``:
not sliding-window or recurrent layers).

A sequence held to a grammar (:class:`~pensieve_bridge.constrain.Constraint`) speculates
through it: the grammar cuts its draft where it refuses a token, gives the tokens it forces
when there is no draft, and its masks apply at every position verified.

:class:`SpeculativeBatch` replaces mlx-lm's ``GenerationBatch`` in pensieve's
``BatchGenerator``; a step without drafts is mlx-lm's own (pipelined) step. It also decodes a
batch of one sequence without an attention mask (:func:`unmasked`), as mlx-lm's single-sequence
``generate_step`` does: one stream is the common case of a local server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from .constrain import widen
from .draft import MOST as DRAFT_MOST
from .prompt_batch import grow_ahead, merge, settle

#: n-gram lengths looked up, longest first.
NGRAMS = (3, 2)
#: Bits per token in an n-gram's key: an n-gram is one int, not a tuple (tuples are tracked by
#: Python's cycle collector, and thousands of them made its collections cost ~8% of a step at 8
#: streams on the demo model). Ids at or over 2**21 would share keys: a wrong draft, refused.
BITS = 21
#: Positions of a sequence indexed per step beyond its new ones: a long prompt's n-grams are
#: indexed newest first, this many a step (about half a millisecond here), not all in the step
#: it starts decoding in (6,500 tokens took 6 ms, one of the longest gaps of the streams
#: decoding beside it).
CATCH_UP = 512


def key(tokens) -> int:
    """The n-gram ``tokens`` as one int."""
    k = 0
    for t in tokens:
        k = (k << BITS) | t
    return k


def _make_mask(self, N: int, return_array: bool = False, **kwargs):
    """``BatchKVCache.make_mask``, except for a cache :func:`unmasked` marks: one token of one
    sequence without padding sees every position, and needs no mask (building one a step, a
    comparison over the whole sequence, costs ~4% of a small model's step here)."""
    if N == 1 and self.__dict__.get("unmasked") and not return_array and kwargs.get("window_size") is None:
        return None
    return _BATCH_MASK(self, N, return_array=return_array, **kwargs)


_BATCH_MASK = BatchKVCache.make_mask
BatchKVCache.make_mask = _make_mask


def unmasked(caches: list, sequences: int) -> None:
    """Marks ``caches`` (a generation batch's, one per layer) as needing no mask for one token
    when they hold one sequence without left padding, and unmarks them otherwise. Called where
    the batch's shape changes (mlx-lm reads the padding there too)."""
    for c in caches:
        if isinstance(c, BatchKVCache):
            c.unmasked = sequences == 1 and c.left_padding.tolist() == [0]


class Lookup:
    """The n-grams of one sequence's tokens (a list it shares with mlx-lm, which appends the
    tokens its KV cache takes), each to the position after its latest occurrence."""

    def __init__(self, tokens: list[int], most: int):
        self.tokens = tokens
        self.index: dict[int, dict[int, int]] = {n: {} for n in NGRAMS}
        #: Positions ``[older, indexed)`` are indexed; ``[1, older)`` are still to be, newest first.
        self.indexed = self.older = max(1, len(tokens) - CATCH_UP)
        self.most = most
        #: The draft length now: grows while drafts are kept whole, shrinks to what was kept.
        self.length = most

    def learn(self, drafted: int, kept: int) -> None:
        """A draft of ``drafted`` tokens had ``kept`` kept."""
        if kept == drafted:
            self.length = min(self.most, self.length + 2)
        else:
            self.length = max(1, (self.length + kept + 1) // 2)

    def missed(self) -> None:
        """Its last tokens had occurred before, but the next one gave no draft: a step waited
        for nothing. The length halves, and with it this sequence's weight in the next steps'
        decision to draft."""
        self.length = max(1, self.length // 2)

    def _sync(self) -> None:
        """Indexes the new positions (each the latest occurrence of its n-grams), then up to
        ``CATCH_UP`` older ones, newest first, where no later occurrence is indexed."""
        tokens, index = self.tokens, self.index
        for end in range(self.indexed, len(tokens)):
            for n in NGRAMS:
                if end >= n:
                    index[n][key(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, len(tokens))
        if self.older > 1:
            low = max(1, self.older - CATCH_UP)
            for end in range(self.older - 1, low - 1, -1):
                for n in NGRAMS:
                    if end >= n:
                        index[n].setdefault(key(tokens[end - n : end]), end)
            self.older = low

    def likely(self) -> bool:
        """Whether the tokens in the cache end with an n-gram seen before: a draft is likely
        for the next token (known only once the step computing it is waited for)."""
        self._sync()
        tokens = self.tokens
        return any(len(tokens) >= n and key(tokens[len(tokens) - n :]) in self.index[n] for n in NGRAMS)

    def draft(self, last: int, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the sequence's last
        n-gram, ``last`` (not in the cache yet) included; ``[]`` when it never occurred. An
        occurrence close to the end continues into the draft itself (a repeating pattern
        repeats)."""
        if k <= 0:
            return []
        self._sync()
        tokens = self.tokens
        for n in NGRAMS:
            if len(tokens) < n - 1:
                continue
            at = self.index[n].get((key(tokens[len(tokens) - (n - 1) :]) << BITS) | last)
            if at is None:
                continue
            end = len(tokens)
            if at + k <= end:
                return tokens[at : at + k]
            out = tokens[at:end] + [last]
            while len(out) < k:
                out.append(out[len(out) - (end + 1 - at)])
            return out[:k]
        return []


@dataclass
class Sampling:
    """A generation's sampling parameters (those pensieve gives mlx-lm's ``make_sampler``)."""

    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0


def target(logprobs: mx.array, s: Sampling) -> mx.array:
    """The distribution mlx-lm's sampler draws from, for rows of log-probabilities."""
    if 0 < s.top_p < 1.0:
        logprobs = apply_top_p(logprobs, s.top_p)
    if s.top_k > 0:
        logprobs = apply_top_k(logprobs, s.top_k)
    return mx.softmax(logprobs * (1 / s.temperature), axis=-1)


def verify(probs: np.ndarray, draft: list[int], rng: np.random.Generator) -> tuple[int, int]:
    """Rejection sampling of a certain draft: ``probs`` (len(draft) + 1 rows) is the model's
    distribution at each position. Returns how many draft tokens are kept and the token drawn
    after them; the tokens' distribution is the model's."""
    for j, d in enumerate(draft):
        p = probs[j]
        if rng.random() < p[d]:
            continue
        rest = p.astype(np.float64)
        rest[d] = 0.0
        total = rest.sum()
        if total <= 0:  # p was all on d, within rounding: d it is
            continue
        return j, int(rng.choice(len(rest), p=rest / total))
    last = probs[len(draft)].astype(np.float64)
    return len(draft), int(rng.choice(len(last), p=last / last.sum()))


@dataclass
class Stats:
    """What speculation did, since the batcher opened (``/metrics``)."""

    #: Steps that verified drafts.
    steps: int = 0
    #: Draft tokens proposed and kept.
    drafted: int = 0
    accepted: int = 0
    #: Decoding steps of one sequence, and the tokens they gave (tokens per sequence step).
    sequence_steps: int = 0
    tokens: int = 0


#: The most tokens a grammar's forced continuation drafts in a step.
FORCED = 16
#: Weight of the newest step in the rates' moving averages.
ALPHA = 0.2
#: While speculative steps are slower than plain ones, one step in this many still speculates,
#: to see whether they have become worth it (the text, or the batch, changed).
PROBE = 16


class Pace:
    """Tokens per second of speculative steps and of plain ones, for each batch size: a step
    speculates only while speculating has been the faster (or when probing). Where verifying a
    draft is almost free (a large model on a GPU, whose step is bound by reading the weights)
    speculation pays even with padding and refused drafts; on a CPU, where a step costs its
    tokens, a batch of eight verifying short drafts is slower than decoding them one by one.
    Measured, not assumed."""

    def __init__(self):
        self.rates: dict[tuple[int, bool], float] = {}
        self._waited: dict[int, int] = {}

    def worth_it(self, size: int) -> bool:
        spec, plain = self.rates.get((size, True)), self.rates.get((size, False))
        if spec is None:
            return True
        if plain is None:
            # A draft model always drafts: one plain step gives the rate to compare with.
            return False
        if spec >= plain:
            return True
        waited = self._waited.get(size, 0) + 1
        self._waited[size] = 0 if waited >= PROBE else waited
        return waited >= PROBE

    def record(self, size: int, speculative: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate, k = tokens / seconds, (size, speculative)
        old = self.rates.get(k)
        self.rates[k] = rate if old is None else (1 - ALPHA) * old + ALPHA * rate


@dataclass
class Speculation:
    """What the batch needs from the batcher: the most draft tokens a sequence gets in a step
    (0: off), the draft model if there is one, each generation's sampling, and the counters."""

    max_draft: int = 0
    #: A :class:`~pensieve_bridge.draft.DraftModel`, for generations whose prompt gives no draft.
    draft: Optional[object] = None
    sampling: dict = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    pace: Pace = field(default_factory=Pace)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)


class SpeculativeBatch(GenerationBatch):
    """mlx-lm's ``GenerationBatch`` with prompt-lookup speculation (see the module docs)."""

    speculation: Optional[Speculation] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lookups: list[Optional[Lookup]] = [None] * len(self.uids)
        self._drafters: list = [None] * len(self.uids)
        unmasked(self.prompt_cache, len(self.uids))

    def extend(self, batch):
        if self.prompt_cache and batch.prompt_cache:
            # One copy of each cache where mlx-lm makes two (then mlx-lm's extend takes ours).
            merge(self.prompt_cache, batch.prompt_cache)
            batch.prompt_cache = []
        super().extend(batch)
        settle(self.prompt_cache)
        self._lookups.extend([None] * len(batch.uids))
        self._drafters.extend([None] * len(batch.uids))
        unmasked(self.prompt_cache, len(self.uids))

    def filter(self, keep):
        super().filter(keep)
        settle(self.prompt_cache)
        self._lookups = [self._lookups[i] for i in keep]
        self._drafters = [self._drafters[i] for i in keep]
        unmasked(self.prompt_cache, len(self.uids))

    def next(self):
        if not self.uids:
            return []
        spec = self.speculation
        # The caches' growth, made ahead: taken before a step that could outgrow them (its
        # token, and a draft from the prompt, a draft model or a grammar's forced run).
        grow_ahead(self.prompt_cache, 1 if spec is None else 1 + max(spec.max_draft, FORCED, DRAFT_MOST))
        if spec is None:
            return super().next()
        on = spec.max_draft > 0 or spec.draft is not None
        size, started = len(self.uids), time.perf_counter()
        emitted = self._speculate() if on and spec.pace.worth_it(size) else None
        if emitted is None:
            responses = super().next()
            spec.stats.sequence_steps += len(responses)
            spec.stats.tokens += len(responses)
            if on:
                spec.pace.record(size, False, len(responses), time.perf_counter() - started)
            return responses
        spec.pace.record(size, True, sum(len(t) for t in emitted), time.perf_counter() - started)
        spec.stats.sequence_steps += len(emitted)
        responses, keep = [], []
        for i, tokens in enumerate(emitted):
            finish = None
            for token in tokens:
                spec.stats.tokens += 1
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish = "length"
                if self._matchers[i].advance(token):
                    finish = "stop"
                done = finish is not None
                responses.append(
                    self.Response(
                        uid=self.uids[i],
                        token=token,
                        logprobs=None,
                        finish_reason=finish,
                        prompt_cache=self.extract_cache(i) if done else None,
                        all_tokens=self.tokens[i] if done else None,
                    )
                )
                if done:
                    break
            if finish is None:
                keep.append(i)
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses

    def _speculate(self) -> Optional[list[list[int]]]:
        """One speculative step: the tokens each sequence gives (its next token, then the draft
        tokens kept), or None when this step is better run as usual."""
        spec = self.speculation
        if not all(isinstance(c, BatchKVCache) for c in self.prompt_cache):
            return None
        # A sequence held to a grammar takes part through its processor (pensieve's
        # ``Constraint``: it checks drafts and gives the masks to verify under); any other
        # processor keeps the batch on mlx-lm's step.
        grammars = []
        for processors in self.logits_processors or [()] * len(self.uids):
            if not processors:
                grammars.append(None)
            elif len(processors) == 1 and hasattr(processors[0], "begin") and processors[0].started:
                grammars.append(processors[0])
            else:
                return None
        for i, lookup in enumerate(self._lookups):
            if lookup is None:
                self._lookups[i] = Lookup(self.tokens[i], spec.max_draft)
                if spec.draft is not None:
                    self._drafters[i] = spec.draft.drafter(self.tokens[i])
        # Without a likely draft, mlx-lm's step runs: its next forward pass is queued before
        # the next token is known, which waiting for that token here would undo. The draft
        # lengths of the sequences likely to draft stand for the tokens a step would gain;
        # below one a sequence, the wait is not worth it. A sequence held to a grammar waits
        # for its token at every step anyway (its mask needs it), and the grammar may force
        # its next tokens: it counts one. A draft model always has a draft.
        likely = [lookup.likely() for lookup in self._lookups]
        weight = sum(lk.length for lk, yes in zip(self._lookups, likely) if yes)
        weight += sum(1 for g, yes in zip(grammars, likely) if g is not None and not yes)
        if spec.draft is None and weight < len(likely):
            return None
        mx.eval(self._next_tokens)
        nexts = self._next_tokens.tolist()
        # The tokens each sequence may still give after this step's next one.
        rooms = [most - n - 1 for most, n in zip(self.max_tokens, self._num_tokens)]
        drafts, proposed = [], {}
        for i, (y, room) in enumerate(zip(nexts, rooms)):
            lookup = self._lookups[i]
            d = lookup.draft(y, min(lookup.length, room)) if spec.max_draft > 0 else []
            if likely[i] and not d and room > 0:
                lookup.missed()
            if not d and self._drafters[i] is not None and room > 0:
                p = self._drafters[i].propose(y, room)
                if p is not None:
                    proposed[i] = p
            drafts.append(d)
        if proposed:
            mx.eval(*proposed.values())
            for i, p in proposed.items():
                drafts[i] = p.tolist()
        proposals = {i: drafts[i] for i in proposed}
        looked_up = {i for i, d in enumerate(drafts) if d and i not in proposed}
        masks, consumed = {}, {}
        for i, g in enumerate(grammars):
            if g is not None:
                drafts[i], masks[i], consumed[i] = g.begin(nexts[i], drafts[i], min(FORCED, rooms[i]))
        width = max(len(d) for d in drafts)
        # Padding is computed too: lookups draft when they hold a token per sequence on average
        # (a draft model's proposals, made already, are always verified).
        if width == 0 or (not proposed and sum(len(d) for d in drafts) < len(drafts)):
            for i, g in enumerate(grammars):
                if g is not None:
                    g.rollback(consumed[i])  # mlx-lm's step feeds them again
            for i, p in proposals.items():  # all cut by a grammar: the draft model's cache goes back
                self._drafters[i].kept(len(p), 0)
            return None
        inputs = mx.array([[y] + d + [y] * (width - len(d)) for y, d in zip(nexts, drafts)])
        logits = self.model(inputs, cache=self.prompt_cache)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampling = [spec.sampling.get(uid, Sampling()) for uid in self.uids]
        greedy = mx.argmax(logprobs, axis=-1).tolist() if any(s.temperature == 0 for s in sampling) else None
        kept, following = [], []
        for i, (d, s) in enumerate(zip(drafts, sampling)):
            rows = logprobs[i, : len(d) + 1]
            if i in masks:
                # Under its grammar: what the model would give with the grammar's mask.
                allowed = mx.array(np.stack([widen(m, rows.shape[-1]) for m in masks[i]]))
                rows = mx.where(allowed, rows, -mx.inf)
                rows = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
            if s.temperature == 0:
                row = mx.argmax(rows, axis=-1).tolist() if i in masks else greedy[i]
                n = 0
                while n < len(d) and row[n] == d[n]:
                    n += 1
                kept.append(n)
                following.append(row[n])
            else:
                probs = np.array(target(rows, s).astype(mx.float32))
                n, z = verify(probs, d, spec.rng)
                kept.append(n)
                following.append(z)
            if i in masks:
                grammars[i].rollback(len(d) - n)
        # The positions of refused (and padding) draft tokens leave the cache.
        refused = [width - n for n in kept]
        least = min(refused)
        for c in self.prompt_cache:
            if least:
                c.trim(least)
            if max(refused) > least:
                c.prepare(right_padding=[r - least for r in refused])
                c.finalize()
        emitted = []
        for i, (y, d, n) in enumerate(zip(nexts, drafts, kept)):
            tokens = [y] + d[:n]
            if i in proposals:
                # What its cache holds of the step's tokens: its proposal, as far as it matches
                # them (a grammar may have cut or replaced it).
                p, same = proposals[i], 0
                while same < min(len(p), n) and p[same] == d[same]:
                    same += 1
                self._drafters[i].kept(len(p), same)
            elif i in looked_up and d:
                self._lookups[i].learn(len(d), n)
            self.tokens[i].extend(tokens)
            emitted.append(tokens)
            spec.stats.drafted += len(d)
            spec.stats.accepted += n
        spec.stats.steps += 1
        self._next_tokens = mx.array(following, dtype=self._next_tokens.dtype)
        self._next_logprobs = [logprobs[i, n] for i, n in enumerate(kept)]
        return emitted
