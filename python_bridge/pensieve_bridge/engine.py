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
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.utils import dequantize_model

from . import blas, cpu_attention, demo, disk_cache, disk_format, gguf, progress, tool_format
from .protocol import MemoryCounters

#: A model id starting with this is served by the test batcher of
#: :mod:`pensieve_bridge.testing` (scripted replies, injected faults); the rest is the model.
SCRIPTED = "scripted:"
#: How long an unload, or the server's stop, waits for the prompt cache's disk writes.
FLUSH_SECONDS = 8.0


def resolve_model(model: str) -> str:
    """``demo`` becomes the cached demo folder (built on first use); anything else is passed on.
    A ``scripted:`` prefix (tests) is dropped."""
    model = model.removeprefix(SCRIPTED)
    if model == "demo":
        return str(demo.ensure())
    return model


class Engine:
    """A loaded model and tokenizer, with the chat template and generation."""

    def __init__(self, model: str, cpu_float32_budget: int = 0):
        """Loads ``model`` (``demo``, a folder, a Hugging Face id or a GGUF file).

        On a CPU, quantised and half-precision weights are turned into float32 when they then
        take at most ``cpu_float32_budget`` bytes (0: never): MLX's quantised kernels do not
        use BLAS and float16 arithmetic is slow on x86 CPUs, so float32 through BLAS is several
        times faster there. Metal keeps the weights as they are."""
        self.model_id = model
        self.path = resolve_model(model)
        self.notes = []
        self.peak_before_reset = 0
        gguf_file = gguf.find_gguf(self.path)
        if gguf_file:
            self.model, self.tokenizer, ctx = gguf.load(gguf_file)
            self.notes.append(f"GGUF {gguf_file}")
        else:
            # Lazily, then read with progress reports.
            self.model, self.tokenizer = load(self.path, lazy=True)
            progress.evaluate(self.model)
            config = getattr(self.model, "args", None)
            ctx = getattr(config, "max_position_embeddings", None)
            if not ctx:
                ctx = getattr(self.tokenizer, "model_max_length", None)
        self.context_length = int(ctx) if ctx and ctx < 10**9 else 0
        self._float32_on_cpu(cpu_float32_budget)
        self.kv_bytes_per_token = kv_bytes_per_token(self.model)
        #: The most bytes one token stands for (its vocabulary's longest entry, UTF-8): a prompt of
        #: N bytes is at least N / this many tokens, which Rust checks against the context
        #: before anything is tokenised (an 8 MB prompt is refused without being read).
        self.max_token_bytes = max_token_bytes(self.tokenizer)
        #: How the model is shown tools and writes calls (:mod:`~pensieve_bridge.tool_format`).
        self.tool_format = tool_format.NATIVE
        self.tool_format = tool_format.detect(self.tokenizer, self.render_chat)
        self.identity = self._identity(gguf_file)
        if cpu_attention.install():
            self.notes.append("attention over long contexts computed by numpy on the CPU (MLX's exp is scalar there)")
        self.clear_cache()
        settle()

    def _identity(self, gguf_file) -> Optional[str]:
        """What the prompt cache's disk tier files this model's entries under
        (:func:`~pensieve_bridge.disk_format.model_identity`); None when its files are not found
        (the disk tier is then off for it). Sets :attr:`source`, the model as its tier's folder
        is marked: its resolved path, or its Hugging Face id (whose snapshots change)."""
        where = Path(gguf_file or self.path)
        self.source = str(where.resolve()) if where.exists() else self.path
        if not where.exists():
            try:
                from huggingface_hub import snapshot_download

                where = Path(snapshot_download(self.path, local_files_only=True))
            except Exception:
                self.notes.append("no disk tier for the prompt cache: the model's files were not found")
                return None
        files = [where] if where.is_file() else [f for f in where.iterdir() if f.is_file() and not f.name.startswith(".")]
        return disk_format.model_identity(files, disk_format.runtime_of(self.model))

    def _float32_on_cpu(self, budget: int) -> None:
        if mx.default_device() != mx.cpu:
            return
        quantised = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in self.model.named_modules())
        half = any(v.dtype in (mx.float16, mx.bfloat16) for _, v in tree_flatten(self.model.parameters()))
        if not (quantised or half):
            return
        need = float32_bytes(self.model)
        if need > budget:
            self.notes.append(
                f"weights kept as they are: float32 would take {need / 2**30:.2f} GB, over the budget of "
                f"{budget / 2**30:.2f} GB (backend.cpu_float32)"
            )
            return
        dequantize_model(self.model)
        self.model.set_dtype(mx.float32)
        mx.eval(self.model.parameters())
        self.notes.append(
            f"weights {'dequantised' if quantised else 'converted'} to float32 for the CPU "
            f"({need / 2**30:.2f} GB; faster through BLAS than quantised or float16 kernels)"
        )

    def describe(self) -> str:
        notes = "".join(f"; {n}" for n in self.notes)
        return (
            f"model {self.model_id} from {self.path}; tools in the {self.tool_format} format; python {sys.version.split()[0]}; "
            f"mlx {mx.__version__}; context {self.context_length}; {blas.chosen() or 'reference BLAS'}{notes}"
        )

    def render(self, chat_json: str) -> list[int]:
        """Applies the chat template to ``{"messages": [...], "tools": [...] | null}``."""
        return self.render_chat(json.loads(chat_json))

    def render_chat(self, chat: dict) -> list[int]:
        """The prompt's tokens. With ``continue_final`` the last (assistant) message is left
        open, so that the reply continues it (a prefill); otherwise a new assistant turn opens."""
        kwargs = {}
        if chat.get("tools") and self.tool_format == tool_format.GENERIC:
            chat = tool_format.rewrite(chat)
        elif chat.get("tools"):
            kwargs["tools"] = chat["tools"]
        if chat.get("continue_final"):
            kwargs["continue_final_message"] = True
        tokens = self.tokenizer.apply_chat_template(
            chat["messages"], add_generation_prompt=not chat.get("continue_final"), **kwargs
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

    def memory(self) -> MemoryCounters:
        """``(active, cache, peak)`` bytes as MLX counts them, the peak with attention's numpy
        arrays (:meth:`step_peak`); the peak since start-up, although the batcher resets the
        peak counters at every step it watches a memory limit."""
        return MemoryCounters(mx.get_active_memory(), mx.get_cache_memory(), max(self.peak_before_reset, self.step_peak()))

    def step_peak(self) -> int:
        """The peak since :meth:`reset_peak`: MLX's, or what MLX held and the numpy arrays of
        attention on a CPU (:mod:`cpu_attention`) took at once, when that was more."""
        return max(mx.get_peak_memory(), cpu_attention.peak)

    def reset_peak(self) -> None:
        """Restarts the peak counters, keeping the peak so far for :meth:`memory`."""
        self.peak_before_reset = max(self.peak_before_reset, self.step_peak())
        mx.reset_peak_memory()
        cpu_attention.reset_peak()


def max_token_bytes(tokenizer) -> int:
    """The longest vocabulary entry in UTF-8 bytes (0 when the tokenizer does not list one).
    For byte-level BPE an entry's characters stand for one byte each and take one or two in
    UTF-8, so this is at most twice the truth: a safe bound, never too small."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        vocab = hf.get_vocab()
    except Exception:
        return 0
    return max((len(t.encode()) for t in vocab), default=0)


def float32_bytes(model) -> int:
    """What the model's weights take as float32: a quantised layer counts its unpacked size."""
    total = 0
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            rows, packed = m.weight.shape[-2:]
            total += rows * packed * 32 // m.bits * 4
            if "bias" in m:
                total += m.bias.size * 4
        else:
            total += sum(v.size * 4 for _, v in tree_flatten(m.parameters()))
    return total


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token of one sequence takes (keys and values, every layer), in the
    dtype the model computes in; 0 when the model's shape does not say."""
    args = getattr(model, "args", None)
    layers = getattr(args, "num_hidden_layers", None)
    heads = getattr(args, "num_attention_heads", None)
    if not layers or not heads:
        return 0
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    dtype = next((v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)), mx.float32)
    return 2 * layers * kv_heads * head_dim * dtype.size


def settle() -> None:
    """After a model loaded (or one was released): collects the garbage, then freezes what is
    left (``gc.freeze``), so that the cycle collector's full collections no longer walk the
    ~90,000 objects of the interpreter, mlx-lm, the tokenizer and the model. Such a collection
    took 20-40 ms on the batch thread here, at a moment no one chooses. (It was suspected of a
    stream's 48 ms longest gap beside a long prompt in ``benches/compare.py``; that gap stayed.)
    Frozen objects are still freed by reference counting; :func:`release` unfreezes them first,
    so that a dropped model's cycles are collected."""
    gc.collect()
    gc.freeze()


def release() -> int:
    """After a model was dropped (its engine and batcher unreferenced): frees what it held, for
    real. The cycle collector, MLX's cache, then the C allocator's free pages: glibc keeps freed
    heap memory in its arenas (MLX's CPU buffers come from ``malloc``), so without
    ``malloc_trim`` an unloaded model's memory stays in the process. First, the prompt cache's
    disk writes finish (for up to :data:`FLUSH_SECONDS`): what they hold is freed here. Returns
    MLX's active bytes.
    """
    disk_cache.flush_all(FLUSH_SECONDS)
    gc.unfreeze()  # the dropped model's objects were frozen when it loaded (``settle``)
    settle()
    mx.clear_cache()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass
    return mx.get_active_memory()
