"""How much prompt a batch step may prefill while other generations are decoding.

mlx-lm's ``BatchGenerator`` runs, in each step, one decoding step of the generations already
decoding and then one prefill chunk of ``prefill_step_size`` tokens for each prompt being read.
With 2,048-token chunks, a stream waits for a whole chunk between two of its tokens: seconds on
a small CPU (SmolLM2 here reads ~115 prompt tokens/s: 18 s per chunk). :class:`StepBudget`
sizes the chunk so that one step's prefill takes about ``RELATIVE`` decoding steps, and never
more than ``max_decode_stall_ms``, from the prefill and decoding times it has measured,
whenever something is decoding; with nothing decoding, chunks are full-size (a prompt alone is
read as fast as it can be). A running stream's gap while a prompt is read is then a few times
its gap without one, whatever the model: the same ratio for a 1 ms step of the demo model here
as for a 40 ms one of a 30B model on a Mac. The long prompt's own time to first token grows by
the decoding steps interleaved with its chunks, and by what small chunks cost more per token
(little: see ``FLOOR``).
"""

from __future__ import annotations

from typing import Optional

#: The smallest chunk. Small chunks cost more per token (a model call's fixed cost), least at
#: long contexts, where attention over the context dominates: on the demo model here, at 6,000
#: tokens of context, 8-token chunks read 2,180 tokens/s, 32-token ones 2,560 and 2,048-token
#: ones 1,900; the rate the budget learns is that of the chunks it uses.
FLOOR = 8
#: A step's prefill, in decoding steps: a running stream's gap while a prompt is read stays
#: under ten times its gap without one (the chunk, the decoding step, and the step's overhead).
RELATIVE = 5
#: Chunk while the prefill rate or the decoding step is not known yet (each is learnt from the
#: first step that shows it).
FIRST = FLOOR
#: A step that read fewer prompt tokens than this (a prompt's last few) says little about the rate.
MIN_LEARN = FLOOR
#: Weight of the newest measurement in the rate's moving average.
ALPHA = 0.3
#: While something decodes, a chunk is at most this many times the one before: the rate a small
#: chunk shows at a short context overstates what a larger one reads further on (on the demo
#: model, with attention in base 2, 8-token chunks at the start of a 6,500-token prompt made
#: the next ones 140-250 tokens, 12-18 ms steps against a 3 ms target).
GROWTH = 2
#: Weight of a slower decoding step in the decoding step's average (a faster one is taken at
#: once): the stall is measured against the streams' usual gap, and a few slow steps (a long
#: prompt rendered on another thread, a collection) raised the average to 2-3 times it, and
#: with it every chunk of the next prompt.
DECODE_RISE = 0.05


class StepBudget:
    """Prompt tokens per step: ``full`` when nothing decodes, else about ``RELATIVE`` decoding
    steps of prefill, at most ``stall_ms``, at the measured rate (``stall_ms`` 0: always
    ``full``)."""

    def __init__(self, stall_ms: int, full: int):
        self.stall = max(0, stall_ms) / 1000.0
        self.full = full
        #: Prompt tokens per second, a moving average; None until measured.
        self.rate: Optional[float] = None
        #: Seconds of a step that only decodes, a moving average; None until measured.
        self.decode: Optional[float] = None
        #: The last chunk given while something decoded (0: none yet).
        self.last = 0

    @property
    def target(self) -> float:
        """Seconds of prefill a step may take while something decodes (once a decoding step
        was timed: until then, :meth:`tokens` gives ``FIRST``)."""
        assert self.decode is not None
        return min(self.stall, RELATIVE * self.decode)

    def tokens(self, decoding: bool, prompts: int = 1) -> int:
        """The chunk per prompt for the next step, with ``prompts`` prompts being read."""
        if not decoding or self.stall <= 0:
            return self.full
        if self.rate is None or self.decode is None:
            chunk = min(FIRST, self.full)
        else:
            per_step = self.rate * self.target / max(1, prompts)
            chunk = int(min(self.full, max(FLOOR, per_step), max(FLOOR, GROWTH * self.last)))
        self.last = chunk
        return chunk

    def learn(self, tokens: int, seconds: float) -> None:
        """A step read ``tokens`` prompt tokens in ``seconds``. The rate follows a slower step at
        once (a prompt reads slower as its context grows) and a faster one gradually."""
        if tokens < MIN_LEARN or seconds <= 0:
            return
        rate = tokens / seconds
        self.rate = min(rate, _average(self.rate, rate))

    def learn_decode(self, seconds: float) -> None:
        """A decoding step took ``seconds`` (a step that read no prompt; or, until one has, the
        part of a step besides its prompt). A faster step is followed at once, a slower one
        slowly (``DECODE_RISE``)."""
        if seconds <= 0:
            return
        if self.decode is None or seconds < self.decode:
            self.decode = seconds
        else:
            self.decode += DECODE_RISE * (seconds - self.decode)


def _average(old: Optional[float], new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new
