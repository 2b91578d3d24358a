"""The prompt cache: KV caches of earlier prompts, kept for reuse, that own what they count.

mlx-lm's ``LRUPromptCache`` does the bookkeeping (a trie of token prefixes, least recently used
out, a cap in bytes), and counts an entry as the ``nbytes`` of its arrays. What mlx-lm hands us
to cache does not own its memory, though:

- a sequence taken out of the continuous batch (``BatchKVCache.extract``) is a lazy
  ``contiguous`` of a slice of the whole batch's KV buffer: until it is evaluated, the graph keeps
  the batch buffer (every sequence, padded to the allocation step) alive;
- a single sequence's ``KVCache`` is allocated in steps of 256 tokens, and ``nbytes`` counts the
  whole allocation, not the tokens cached;
- a view of a larger buffer (a slice along the batch axis) keeps that buffer alive while its
  ``nbytes`` counts the slice, and ``copy.deepcopy`` of such a view copies the whole buffer.

Measured on the demo model before this module: after a few hundred batched requests, MLX's
active memory held 88 MB above the weights while the cache reported 17 MB. :func:`own` makes
an entry hold exactly what it reports: trimmed to the tokens it caches, copied out of any larger
buffer, evaluated. Its cost is one copy of the KV cache of a finished sequence (often none: an
extracted sequence is already a lazy copy, and evaluating it is that copy).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import (
    CacheList,
    KVCache,
    LRUPromptCache,
    PromptTrie,
    PromptTrieResult,
    QuantizedKVCache,
    can_trim_prompt_cache,
)

#: How many prompts are kept at most, whatever their size.
MAX_ENTRIES = 64


def own(prompt_cache: List[Any]) -> int:
    """Makes every layer of ``prompt_cache`` own exactly its arrays, evaluated; returns their bytes.

    In place: a layer keeps its type and offset, so mlx-lm uses it as before.
    """
    arrays: list = []
    for layer in prompt_cache:
        _own_layer(layer, arrays)
    mx.eval(arrays)
    return sum(a.nbytes for a in arrays)


def _own_layer(layer: Any, arrays: list) -> None:
    if isinstance(layer, CacheList):
        for sub in layer.caches:
            _own_layer(sub, arrays)
        return
    if type(layer) in (KVCache, QuantizedKVCache) and layer.keys is not None:
        # Allocated in steps: keep only the positions filled.
        n = layer.offset
        layer.keys = tree_map(lambda a: a[..., :n, :], layer.keys)
        layer.values = tree_map(lambda a: a[..., :n, :], layer.values)
    for name, value in list(vars(layer).items()):
        if not any(isinstance(a, mx.array) for _, a in tree_flatten(value)):
            continue
        # `contiguous` copies a view whose buffer is larger than itself, and gives the lazy
        # slice of a batch buffer its own allocation once evaluated.
        owned = tree_map(lambda a: mx.contiguous(a) if isinstance(a, mx.array) else a, value)
        setattr(layer, name, owned)
        arrays.extend(a for _, a in tree_flatten(owned) if isinstance(a, mx.array))


class Trie(PromptTrie):
    """mlx-lm's trie of cached prompts, with a search whose cost does not grow with the
    prompts cached beyond the point where a new prompt leaves them.

    mlx-lm's ``PromptTrie.search`` finds the shortest cached prompt that continues the tokens'
    longest cached path (``longer``) by walking every node below that point, copying the path
    so far at each node: for prompts that share a prefix and then go on for thousands of
    tokens each, that is quadratic in their length. An agent's prompts are exactly that (one
    system prompt, then each turn's own long text): in ``benches/compare.py`` the fifth
    6,500-token prompt's lookup took 120 ms on the batch thread, and every stream waited for
    it (its longest gap, growing by ~40 ms with each prompt cached). Here ``longer`` comes from
    the cached prompts themselves (:attr:`order`, mlx-lm's list of them), compared as lists:
    a C comparison per entry, at most :data:`MAX_ENTRIES` of them.
    """

    def __init__(self, order: "LRUPromptCache.CacheOrder"):
        super().__init__()
        #: The cache's entries, ``(model, tokens)``, by kind (mlx-lm's LRU order).
        self.order = order

    def search(self, model: Any, tokens: List[int]) -> PromptTrieResult:
        node = self._trie.get(model)
        if node is None:
            return PromptTrieResult(model, None, None, None, 0)
        if not tokens and "__value__" in node:
            return PromptTrieResult(model, [], None, None, 0)
        # The longest path of ``tokens`` in the trie, and the last entry on it.
        depth, last = 0, -1
        for t in tokens:
            node = node.get(t)
            if node is None:
                break
            depth += 1
            if "__value__" in node:
                last = depth - 1
        if last == len(tokens) - 1 >= 0:
            return PromptTrieResult(model, tokens, None, None, 0)
        shorter = tokens[: last + 1] if last > 0 else None
        longer = None
        if depth > 0:
            head = tokens[:depth]
            for lru in self.order._lrus.values():
                for m, cached in lru:
                    if m == model and len(cached) >= depth and (longer is None or len(cached) < len(longer)):
                        if cached[:depth] == head:
                            longer = list(cached)
        return PromptTrieResult(model, None, shorter, longer, depth)


#: Where an entry leaving memory goes (the disk tier), given its tokens and cache.
Spill = Callable[[List[int], List[Any]], Any]


class PromptCache:
    """mlx-lm's ``LRUPromptCache`` under one model key, with entries that own their memory.

    An entry evicted by the cap, or by :meth:`clear`, goes to ``spill`` (the disk tier) when
    there is one."""

    def __init__(self, key: str, max_bytes: int, spill: Optional[Spill] = None):
        self._key = key
        self._lru = LRUPromptCache(max_size=MAX_ENTRIES, max_bytes=max_bytes)
        self._lru._trie = Trie(self._lru._lru)
        self._spill = spill

    def fetch(self, tokens: List[int]):
        """``(cache, rest)``: a copy of the cache of the longest cached prefix of ``tokens``
        (or None) and the tokens it does not cover."""
        return self._lru.fetch_nearest_cache(self._key, tokens)

    def covered(self, tokens: List[int]) -> int:
        """How many of ``tokens`` :meth:`fetch` would give, without copying anything."""
        lru = self._lru
        result = lru._trie.search(self._key, tokens)
        if result.exact is not None:
            return len(tokens)
        short = len(result.shorter) if result.shorter is not None else 0
        if result.longer is not None and result.common_prefix > short:
            if can_trim_prompt_cache(lru._trie.get(result.model, result.longer).prompt_cache):
                return min(len(tokens) - 1, result.common_prefix)
        return short

    def insert(self, tokens: List[int], prompt_cache: List[Any]) -> None:
        """Keeps ``prompt_cache`` (the KV cache of ``tokens``), owned; may evict older entries."""
        nbytes = own(prompt_cache)
        if nbytes > self._lru.max_bytes:
            # Larger than the whole memory tier: straight to disk, when there is one.
            if self._spill is not None:
                self._spill(list(tokens), prompt_cache)
            return
        # Room first, through this cache's eviction (which spills), so that mlx-lm's own insert
        # has nothing left to evict.
        self._evict(self._lru.max_bytes - nbytes, MAX_ENTRIES - 1)
        self._lru.insert_cache(self._key, list(tokens), prompt_cache)

    def trim_to(self, n_bytes: int) -> None:
        """Evicts least recently used entries until the cache holds at most ``n_bytes``."""
        self._evict(n_bytes, MAX_ENTRIES)

    def clear(self) -> None:
        """Evicts every entry (to the disk tier, when there is one)."""
        self._evict(0, 0)

    def _evict(self, n_bytes: int, n_sequences: int) -> None:
        """``LRUPromptCache.trim_to``, handing each evicted entry to ``spill``."""
        lru = self._lru
        if self._spill is None:
            lru.trim_to(n_sequences=n_sequences, n_bytes=n_bytes)
            return
        while len(lru) and (len(lru) > max(0, n_sequences) or lru.nbytes > max(0, n_bytes)):
            model, tokens = lru._lru.pop()
            entry = lru._trie.pop(model, tokens)
            lru._n_bytes -= entry.nbytes
            lru._n_bytes_by_type[entry.cache_type] -= entry.nbytes
            self._spill(tokens, entry.prompt_cache)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def __len__(self) -> int:
        return len(self._lru)
