"""GGUF files (what Ollama, LM Studio and llama.cpp download) loaded as mlx-lm models.

- **Weights** through ``mx.load``, which reads GGUF itself: Q4_0, Q4_1 and Q8_0 arrive as MLX's
  own quantised triplets (weight, scales, biases; group size 32) and stay quantised (each layer
  with its own bits); F32/F16 as they are. (Whether a CPU runs them as float32 instead is the
  engine's choice, for every model: see :mod:`pensieve_bridge.engine`.)
- **The model** is mlx-lm's own class for the architecture (``llama`` for llama, SmolLM and
  Mistral; ``qwen2``; ``qwen3``), built from the file's metadata. llama.cpp's converter permutes
  the rows of llama-family Q and K projections for its rotary layout, so those models run with
  the traditional RoPE layout, which undoes it; Qwen files are not permuted.
- **The tokenizer** is built from the file's vocabulary and merges with the ``tokenizers``
  library (byte-level BPE: ``tokenizer.ggml.model = gpt2``), written as ``tokenizer.json`` with
  the file's chat template into a temporary folder, and loaded by mlx-lm's own
  ``load_tokenizer``, so that detokenising, tool parsing and thinking markers work as for a
  folder model. End of turn is the file's EOS and EOT tokens.

Anything else (another architecture, a SentencePiece vocabulary) is a clear error naming it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes, load_tokenizer

from . import progress

log = logging.getLogger("pensieve_bridge.gguf")

#: GGUF architecture → (mlx-lm model type, Q/K rows permuted by llama.cpp's converter).
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

#: GGUF tensor names → mlx-lm's (after the ``blk.N.`` prefix).
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

#: Pre-tokenizer regexes by ``tokenizer.ggml.pre`` (llama.cpp's names), for byte-level BPE.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class GGUFError(ValueError):
    """The file cannot be served; the message says what it holds and what is supported."""


def is_gguf(path) -> bool:
    """Whether the file starts with GGUF's magic (Ollama's blobs have no extension)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def find_gguf(path: str) -> str | None:
    """``path`` itself when it is a GGUF file, the one .gguf file in a folder, or None."""
    p = Path(path).expanduser()
    if p.is_file() and is_gguf(p):
        return str(p)
    if p.is_dir() and not (p / "config.json").exists():
        files = sorted(p.glob("*.gguf"))
        if len(files) == 1:
            return str(files[0])
        if len(files) > 1:
            raise GGUFError(f"{p} holds several .gguf files ({', '.join(f.name for f in files)}): name one")
    return None


def _scalar(meta, key, default=None):
    v = meta.get(key, default)
    if isinstance(v, mx.array):
        v = v.item()
    return v


def _read(path: str):
    """``(metadata, mlx-lm config, weights under mlx-lm's names, {module: bits})`` of the file."""
    weights, meta = mx.load(path, return_metadata=True)
    arch = _scalar(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{path}: architecture `{arch}` is not supported for GGUF files "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    model_type, permuted = ARCHITECTURES[arch]
    config = _config(meta, arch, model_type, weights, permuted)
    weights = _rename(weights)
    return meta, config, weights, _quantised_bits(weights)


def load(path: str):
    """``(model, tokenizer, context_length)`` for the GGUF file at ``path``."""
    meta, config, weights, bits = _read(path)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if bits:
        nn.quantize(
            model,
            group_size=32,
            bits=4,
            class_predicate=lambda name, m: {"group_size": 32, "bits": bits[name]} if name in bits else False,
        )
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    progress.evaluate(model)
    model.eval()
    tokenizer = _tokenizer(meta, path)
    return model, tokenizer, int(config["max_position_embeddings"])


def _config(meta, arch, model_type, weights, permuted) -> dict:
    g = lambda k, d=None: _scalar(meta, f"{arch}.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": int(g("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in weights,
        "head_dim": int(g("attention.key_length", hidden // heads)),
    }
    if permuted:
        config["rope_traditional"] = True
    if model_type == "qwen2":
        config["attention_bias"] = True
    return config


def _rename(weights: dict) -> dict:
    out = {}
    for key, value in weights.items():
        base, _, leaf = key.rpartition(".")  # leaf: weight, bias, scales, biases
        parts = base.split(".")
        if parts[0] == "blk":
            name = LAYER_NAMES.get(parts[2])
            if name is None:
                raise GGUFError(f"unexpected tensor `{key}` in the GGUF file")
            out[f"model.layers.{parts[1]}.{name}.{leaf}"] = value
        elif base in TOP_NAMES:
            out[f"{TOP_NAMES[base]}.{leaf}"] = value
        elif base == "rope_freqs":
            continue
        else:
            raise GGUFError(f"unexpected tensor `{key}` in the GGUF file")
    return out


def _quantised_bits(weights: dict) -> dict:
    """``{module path: bits}`` of the weights that arrived quantised: ``weight`` packs
    ``32 / bits`` values per uint32, and there is one scale per 32 values, so ``bits`` is the
    ratio of their widths."""
    return {
        key[: -len(".scales")]: weights[key[: -len(".scales")] + ".weight"].shape[-1] // value.shape[-1]
        for key, value in weights.items()
        if key.endswith(".scales")
    }


def write_tokenizer(meta, path, out) -> list[int]:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` for the file's vocabulary into
    ``out``; returns its end-of-turn token ids."""
    model = _scalar(meta, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(
            f"{path}: tokenizer `{model}` is not supported for GGUF files yet (supported: gpt2, the "
            "byte-level BPE of SmolLM, Qwen and Llama 3); a SentencePiece model can be served from its "
            "MLX or Hugging Face folder"
        )
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = _scalar(meta, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("smollm",):
        split = [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
        split = [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level]
    elif pre in ("qwen2", "qwen3", "deepseek-r1-qwen"):
        split = [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), byte_level]
    else:
        split = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
        if pre not in ("default", "gpt2", "gpt-2"):
            log.warning("GGUF pre-tokenizer `%s` is not known; using GPT-2's", pre)
    bpe.pre_tokenizer = pre_tokenizers.Sequence(split)
    bpe.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    name = lambda key: tokens[int(_scalar(meta, key))] if _scalar(meta, key) is not None else None  # noqa: E731
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _scalar(meta, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
    }
    bpe.save(str(Path(out) / "tokenizer.json"))
    (Path(out) / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return [int(_scalar(meta, k)) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if _scalar(meta, k) is not None]


def _tokenizer(meta, path):
    with tempfile.TemporaryDirectory(prefix="pensieve-gguf-") as d:
        eos_ids = write_tokenizer(meta, path, d)
        return load_tokenizer(Path(d), eos_token_ids=eos_ids)


def to_mlx_folder(path: str, out: str) -> None:
    """Writes the GGUF file at ``path`` as an MLX model folder (``config.json``, quantised
    safetensors, tokenizer files) that mlx-lm's own ``load`` reads: the same weights, for
    comparing with servers that cannot read GGUF."""
    meta, config, weights, bits = _read(path)
    if bits:
        common = max(set(bits.values()), key=list(bits.values()).count)
        config["quantization"] = {"group_size": 32, "bits": common}
        config["quantization"].update({m: {"group_size": 32, "bits": b} for m, b in bits.items() if b != common})
    Path(out).mkdir(parents=True, exist_ok=True)
    eos_ids = write_tokenizer(meta, path, out)
    config["eos_token_id"] = eos_ids
    (Path(out) / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(Path(out) / "model.safetensors"), weights, metadata={"format": "mlx"})
