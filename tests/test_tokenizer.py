"""Tokenizers against references: Meta's vectors, the real Llama 3.2 tokenizer.json through
`tokenizers`, and transformers' tokenizer built from the SmolLM2 GGUF."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import llama3_tokenizer_dir, smollm2_path
from llama3 import load_tokenizer
from llama3.tokenizer import TokenizerError, split_long_runs

TRICKY = [
    "", " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n \n", "\t\tindented\n\ttabs", "trailing spaces   ",
    "   leading spaces", "a  b   c    d", "12345678901234567890", "3.14159265358979", "1,000,000 and 1e-10",
    "don't", "I'M", "you're", "we've", "they'll", "she'd", "It's", "O'Neil's", "rock 'n' roll",
    "def f(x):\n    return x**2  # square\n", "if (a && b || !c) { return; }", "<html><body>hi</body></html>",
    "SELECT * FROM t WHERE id=1;", "x = [1, 2, 3]\ny = {'a': 1}", "https://example.com/path?q=1&r=2#frag",
    "你好，世界！", "東京は日本の首都です。", "안녕하세요", "مرحبا بالعالم", "שלום עולם", "Привет, мир!",
    "Ελληνικά", "हिन्दी भाषा", "café naïve résumé Zoë", "e\u0301 (combining accent)", "ß ẞ ﬁ",
    "👨‍👩‍👧‍👦 family", "👍🏽 thumbs", "🇫🇷🇯🇵 flags", "emoji😀in😀words", "∑∫∂√∞≈≠", "\u200b zero width",
    "\u00a0non-breaking\u00a0space", "a" * 1000, "ab " * 500, "\n" * 100, " " * 100 + "x",
    "a" * 100_000, "<|eot_id|>", "hello <|begin_of_text|> world", "<|start_header_id|>user<|end_header_id|>",
    "<|reserved_special_token_5|>", "Mixed 123 numbers 4567 and words8910",
]


@pytest.fixture(scope="module")
def meta_tok():
    return load_tokenizer(os.path.join(llama3_tokenizer_dir(), "tokenizer.model"))


@pytest.fixture(scope="module")
def reference():
    """The same vocabulary through `tokenizers` and the package's tokenizer.json, special
    tokens treated as plain text (as ours treat user text)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(llama3_tokenizer_dir(), "tokenizer.json"))
    tok.encode_special_tokens = True
    return tok


def test_meta_vectors(meta_tok):
    # <|begin_of_text|> This is a test sentence . <|end_of_text|>
    assert meta_tok.encode("This is a test sentence.", bos=True, eos=True) == \
        [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert meta_tok.encode("user") == [882]
    assert meta_tok.encode("system") == [9125]
    assert meta_tok.encode("assistant") == [78191]
    assert meta_tok.encode("\n\n") == [271]


def test_special_tokens_and_stops(meta_tok):
    s = meta_tok.special_tokens
    assert len(s) == 256 and min(s.values()) == 128000 and max(s.values()) == 128255
    assert s["<|begin_of_text|>"] == 128000 and s["<|end_of_text|>"] == 128001
    assert s["<|start_header_id|>"] == 128006 and s["<|end_header_id|>"] == 128007
    assert s["<|eom_id|>"] == 128008 and s["<|eot_id|>"] == 128009 and s["<|python_tag|>"] == 128010
    assert s["<|finetune_right_pad_id|>"] == 128004 and s["<|step_id|>"] == 128005
    assert meta_tok.stop_ids == {128001, 128008, 128009}
    assert meta_tok.vocab_size == 128256 and meta_tok.bos_id == 128000 and meta_tok.eos_id == 128001


def test_llama3_0_names(tmp_path):
    import json
    import shutil

    shutil.copy(os.path.join(llama3_tokenizer_dir(), "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4096, "use_scaled_rope": False}))
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert tok.special_tokens["<|reserved_special_token_4|>"] == 128008
    assert "<|eom_id|>" not in tok.special_tokens and tok.stop_ids == {128001, 128009}


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_tricky_strings_match_tokenizer_json(meta_tok, reference, text):
    ours = meta_tok.encode(text)
    assert ours == reference.encode(text, add_special_tokens=False).ids
    assert meta_tok.decode(ours) == text


def test_enough_tricky_strings():
    assert len(TRICKY) >= 50


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_unicode_matches_tokenizer_json(meta_tok, reference, text):
    ours = meta_tok.encode(text)
    assert ours == reference.encode(text, add_special_tokens=False).ids
    assert meta_tok.decode(ours) == text


def test_special_text_is_plain_unless_allowed(meta_tok):
    plain = meta_tok.encode("<|eot_id|>")
    assert 128009 not in plain and len(plain) > 1 and meta_tok.decode(plain) == "<|eot_id|>"
    assert meta_tok.encode("<|eot_id|>", allow_special=True) == [128009]


def test_long_runs_are_split_as_meta_does(meta_tok):
    # Meta cuts runs of over 25,000 same-class characters; the cut may change tokens at the seam.
    pieces = list(split_long_runs("ab" + " " * 60_000 + "cd", 25_000))
    assert [len(p) for p in pieces] == [25_002, 25_000, 10_002]
    text = "x" * 1_000_000  # a megabyte of one character encodes quickly and round-trips
    assert meta_tok.decode(meta_tok.encode(text)) == text


@pytest.mark.parametrize("text", ["Hello 👨‍👩‍👧‍👦 world", "你好，世界！東京", "🇫🇷🇯🇵" * 3, "e\u0301🙂x" * 5, "plain"])
def test_streaming_detokenizer_never_splits_characters(meta_tok, text):
    ids = meta_tok.encode(text)
    detok = meta_tok.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.finish()]
    assert "".join(pieces) == meta_tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # a token holding only part of a character yields nothing until the character is complete
    split = [i for i in ids if not _is_utf8(meta_tok.token_bytes(i))]
    assert (text.startswith(("Hello", "🇫")) and split) or not text.startswith(("Hello", "🇫"))
    if split:
        assert any(p == "" for p in pieces[:-1])


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_streaming_matches_decode_on_invalid_utf8(meta_tok):
    ids = [meta_tok.encode("😀")[0]] + meta_tok.encode("abc")  # a lone lead byte, then text
    detok = meta_tok.detokenizer()
    assert "".join([detok.add(i) for i in ids] + [detok.finish()]) == meta_tok.decode(ids)


def test_tokenizer_json_interface():
    tok = load_tokenizer(os.path.join(llama3_tokenizer_dir(), "tokenizer.json"))
    assert tok.bos_id == 128000 and tok.eos_id == 128001 and tok.add_bos
    assert {128001, 128008, 128009} <= tok.stop_ids
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13,
                                                                           128001]
    assert tok.encode("<|eot_id|>", allow_special=True) == [128009]
    assert 128009 not in tok.encode("<|eot_id|>")


def test_folder_prefers_tokenizer_json():
    tok = load_tokenizer(llama3_tokenizer_dir())
    assert tok.path.endswith("tokenizer.json")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not base64 at all\n")
    with pytest.raises(TokenizerError, match="tokenizer.model: not a tiktoken BPE file"):
        load_tokenizer(bad)


# ------------------------------------------------------------------------------- GGUF vocabularies
SMOL_STRINGS = ["Hello world", "The capital of France is Paris.", "def f(x):\n    return x + 1\n", "don't stop",
                "  spaces  and\ttabs\n\n", "你好，世界", "emoji 😀👍🏽", "café résumé", "<|im_start|>user",
                "MixedCASE words", "a.b,c;d", "x" * 300]


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer(smollm2_path())


def test_smollm2_gguf_tokenizer_interface(smol_tok):
    assert smol_tok.vocab_size == 49152
    assert smol_tok.bos_id == 1 and smol_tok.eos_id == 2 and not smol_tok.add_bos
    assert smol_tok.special_tokens["<|im_end|>"] == 2 and smol_tok.stop_ids == {0, 2}
    assert smol_tok.encode("<|im_end|>", allow_special=True) == [2]
    assert 2 not in smol_tok.encode("<|im_end|>")


@pytest.mark.parametrize("text", SMOL_STRINGS)
def test_smollm2_gguf_tokenizer_matches_transformers(smol_tok, hf_smollm2, text):
    _, hf_tok = hf_smollm2
    ours = smol_tok.encode(text)
    assert ours == hf_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert smol_tok.decode(ours) == text


def test_smollm2_digits_follow_llama_cpp(smol_tok, hf_smollm2):
    """transformers builds every gpt2-type GGUF tokenizer with the GPT-2 regex; llama.cpp's
    `smollm` pre-tokenizer first isolates every digit (\\p{N}), as SmolLM2's own tokenizer.json
    does (Digits(individual_digits=True)). For a digit run after a letter the two differ, and
    llama.cpp (and SmolLM2's training) is right: each digit is its own token."""
    _, hf_tok = hf_smollm2
    text = "abc123"
    ours = smol_tok.encode(text)
    theirs = hf_tok(text, add_special_tokens=False).input_ids
    digits = [smol_tok.encode(d) for d in "123"]
    assert all(len(d) == 1 for d in digits)
    assert ours[-3:] == [d[0] for d in digits]
    assert smol_tok.decode(ours) == smol_tok.decode(theirs) == text


def test_unknown_pre_tokenizer_is_an_error():
    from llama3.tokenizer import tokenizer_from_gguf

    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a", "b"],
          "tokenizer.ggml.merges": []}
    with pytest.raises(TokenizerError, match="unknown pre-tokenizer tokenizer.ggml.pre='mystery'"):
        tokenizer_from_gguf(md, "x.gguf")


def test_sentencepiece_style_gguf_vocab():
    """A tiny Llama-2-style (`llama`) vocabulary: byte fallback, ▁ for spaces, merges from scores."""
    from llama3.tokenizer import tokenizer_from_gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello", "▁w", "or", "▁wor", "▁world",
         "ld"]
    types = [2, 3, 3] + [6] * 256 + [1] * 18
    scores = [0.0] * 259 + [-float(i) for i in range(18)]
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0}
    tok = tokenizer_from_gguf(md, "tiny.gguf")
    ids = tok.encode("hello world")
    assert [tokens[i] for i in ids] == ["▁hello", "▁world"]
    assert tok.decode(ids) == "hello world"
    ids = tok.encode("hello é")  # é is not in the vocabulary: byte fallback
    assert [tokens[i] for i in ids][-2:] == ["<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "hello é"
    assert tok.add_bos and tok.bos_id == 1 and 2 in tok.stop_ids
    detok = tok.detokenizer()
    assert "".join([detok.add(i) for i in ids] + [detok.finish()]) == "hello é"
