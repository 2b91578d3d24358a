"""How much prompt a batch step may prefill while other generations are decoding.

mlx-lm's ``BatchGenerator`` runs, in each step, one decoding step of the generations already
decoding and then one prefill chunk of ``prefill_step_size`` tokens for each prompt being read.
With 2,048-token chunks, a stream waits for a whole chunk between two of its tokens: seconds on
a small CPU (SmolLM2 here reads ~115 prompt tokens/s: 18 s per chunk). :class:`StepBudget`
sizes the chunk so that one step's prefill takes about ``max_decode_stall_ms``, from the
prefill rate it has measured, whenever something is decoding; with nothing decoding, chunks
are full-size (a prompt alone is read as fast as it can be). The long prompt's own
time-to-first-token grows by the decoding steps interleaved with its chunks.
"""

from __future__ import annotations

from typing import Optional

#: The smallest chunk. Small chunks cost more per token (a model call's fixed cost): on the demo
#: model here 100-token chunks read prompts at a quarter of the rate of 2,048-token ones, but the
#: rate the budget learns is that of the chunks it uses, so a fast model keeps large chunks
#: (about 1,700 tokens for 500 ms on the demo model) and only a slow one gets small ones.
FLOOR = 32
#: Chunk while the prefill rate is not known yet (it is learnt from the first chunk).
FIRST = 64
#: A step that read fewer prompt tokens than this says little about the rate.
MIN_LEARN = 16
#: Weight of the newest measurement in the rate's moving average.
ALPHA = 0.3


class StepBudget:
    """Prompt tokens per step: ``full`` when nothing decodes, else about ``stall_ms`` of
    prefill at the measured rate (``stall_ms`` 0: always ``full``)."""

    def __init__(self, stall_ms: int, full: int):
        self.target = max(0, stall_ms) / 1000.0
        self.full = full
        #: Prompt tokens per second, a moving average; None until measured.
        self.rate: Optional[float] = None

    def tokens(self, decoding: bool, prompts: int = 1) -> int:
        """The chunk per prompt for the next step, with ``prompts`` prompts being read."""
        if not decoding or self.target <= 0:
            return self.full
        if self.rate is None:
            return min(FIRST, self.full)
        per_step = self.rate * self.target / max(1, prompts)
        return int(min(self.full, max(FLOOR, per_step)))

    def learn(self, tokens: int, seconds: float) -> None:
        """A step read ``tokens`` prompt tokens in ``seconds``."""
        if tokens < MIN_LEARN or seconds <= 0:
            return
        rate = tokens / seconds
        self.rate = rate if self.rate is None else (1 - ALPHA) * self.rate + ALPHA * rate
