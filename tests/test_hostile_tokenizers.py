"""Hostile and broken tokenizer files (issue 15, items 3, 5, 6, 9): each is built here from the real
Llama 3 files, and each is refused with a TokenizerError naming the file and the field, within a
time and a memory bound -- or, where it is legal, loaded and used. No input makes encode or decode
raise anything else (a Rust panic is a BaseException that ``except Exception`` would miss)."""

import base64
import json
import os
import re
import time
import tracemalloc
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import llama3_tokenizer_dir, smollm2_path
from llama3 import load_tokenizer
from llama3.tokenizer import Llama3Tokenizer, TokenizerError, load_tokenizer_json, tokenizer_from_gguf
from test_tokenizer import write_llama3_vocab_gguf

MODEL = os.path.join(llama3_tokenizer_dir(), "tokenizer.model")
JSON = os.path.join(llama3_tokenizer_dir(), "tokenizer.json")


@contextmanager
def peak_memory():
    """How far the process's resident memory rose above where it started, at its peak (Linux: the
    VmHWM high-water mark, reset through /proc/self/clear_refs; elsewhere tracemalloc's peak of the
    Python allocations, which is slower and misses native ones)."""
    result = {}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        yield result
        result["bytes"] = (_status_kb("VmHWM") - base) << 10
    except OSError:
        tracemalloc.start()
        try:
            yield result
            result["bytes"] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def refused(load, *needles, seconds=5.0, max_growth=512 << 20):
    """``load()`` raises TokenizerError mentioning every needle, within ``seconds``, the process's
    memory growing less than ``max_growth`` (parsing the real Llama 3 files takes ~150 MB)."""
    with peak_memory() as peak:
        start = time.perf_counter()
        with pytest.raises(TokenizerError) as e:
            load()
        elapsed = time.perf_counter() - start
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    assert peak["bytes"] < max_growth, f"memory grew by {peak['bytes'] >> 20} MB"
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def meta_tok():
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory):
    return write_llama3_vocab_gguf(tmp_path_factory.mktemp("vocab") / "llama3-vocab.gguf")


# ------------------------------------------------------------------ item 3: a tokenizer.json id of 10^9
def json_with(tmp_path, edit):
    spec = json.loads(open(JSON, encoding="utf-8").read())
    edit(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return path


def test_tokenizer_json_id_of_a_billion_is_refused(tmp_path):
    path = json_with(tmp_path, lambda s: s["model"]["vocab"].__setitem__("Ġthe", 10**9))
    message = refused(lambda: load_tokenizer(path), str(path), "model.vocab['Ġthe'] = 1000000000")
    assert "2097152" in message  # the bound: MAX_VOCAB_SIZE
    path = json_with(tmp_path, lambda s: s["added_tokens"][9].__setitem__("id", 10**9))
    refused(lambda: load_tokenizer(path), "added_tokens[9].id = 1000000000")
    path = json_with(tmp_path, lambda s: s["model"]["vocab"].__setitem__("Ġthe", "13"))
    refused(lambda: load_tokenizer(path), "model.vocab['Ġthe'] = '13'")


def test_tokenizer_json_with_holes_in_its_ids_is_legal(tmp_path):
    """Ids need not be contiguous: vocab_size is one more than the largest, and a hole decodes to ''."""
    path = json_with(tmp_path, lambda s: s["model"]["vocab"].__setitem__("Ġthe", 150_000))
    tok = load_tokenizer(path)
    assert tok.vocab_size == 150_001 and tok.encode(" the") == [150_000]
    assert tok.decode([279, 150_000]) == " the" and tok.token_bytes(279) == b""


def test_tokenizer_json_two_tokens_one_id_is_refused(tmp_path):
    path = json_with(tmp_path, lambda s: s["model"]["vocab"].__setitem__("Ġthe", 1820))  # the id of 'the'
    refused(lambda: load_tokenizer(path), "both have id 1820")


def test_broken_tokenizer_json_and_config(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("[" * 100_000)
    refused(lambda: load_tokenizer_json(path), str(path), "not a tokenizer.json")
    path.write_bytes(b'{"model": {"type": "BPE", "vocab": {"\xff": 0}, "merges": []}}')
    refused(lambda: load_tokenizer_json(path), str(path))
    path.write_text('{"model": {"type": "BPE", "vocab": {"\\ud800": 0}, "merges": []}}')  # a lone surrogate
    refused(lambda: load_tokenizer_json(path), str(path))
    path.write_text(open(JSON, encoding="utf-8").read())
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": "false"}')  # a string is not a bool
    refused(lambda: load_tokenizer_json(path), "add_bos_token must be true or false, got 'false'")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    refused(lambda: load_tokenizer_json(path), "tokenizer_config.json: expected a JSON object")


# ------------------------------------------------------------------ item 5: a duplicate token in a GGUF
def test_gguf_vocabulary_with_a_duplicate_token_is_refused(tmp_path, llama3_gguf):
    """One byte flipped in the file turns token 279 'Ġthe' into 'Ġtha', which is token 49588 too.
    llama.cpp refuses such a vocabulary ("duplicate token in vocabulary": text -> id must be one id);
    so do we, naming both ids."""
    data = bytearray(open(llama3_gguf, "rb").read())
    old, new = "Ġthe".encode(), "Ġtha".encode()  # both are tokens: 279 and 49588
    at = data.index(len(old).to_bytes(8, "little") + old)
    data[at + 8:at + 8 + len(old)] = new  # the last byte, e -> a
    path = tmp_path / "dup.gguf"
    path.write_bytes(bytes(data))
    refused(lambda: load_tokenizer(path), str(path), "tokenizer.ggml.tokens[49588] = 'Ġtha' repeats "
            "tokenizer.ggml.tokens[279]")


def test_gguf_vocabulary_fields_are_checked():
    good = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
            "tokenizer.ggml.merges": ["a b"]}
    tok = tokenizer_from_gguf(good, "x.gguf")
    assert tok.encode("abab") == [2, 2] and tok.special_tokens == {"<s>": 3}
    for key, value, needle in [
        ("tokenizer.ggml.tokens", "abc", "tokenizer.ggml.tokens is not an array"),
        ("tokenizer.ggml.tokens", ["a", 7], "tokenizer.ggml.tokens[1] = 7 is not a str"),
        ("tokenizer.ggml.tokens", [], "no tokenizer.ggml.tokens"),
        ("tokenizer.ggml.token_type", [1, 1], "token_type has 2 entries for 4 tokens"),
        ("tokenizer.ggml.token_type", [1, 1, 1.5, 3], "token_type[2] = 1.5 is not a int"),
        ("tokenizer.ggml.merges", ["ab"], "tokenizer.ggml.merges[0] = 'ab' is not two tokens"),
        ("tokenizer.ggml.merges", ["a c"], "cannot build the tokenizer"),  # 'c' is no token
        ("tokenizer.ggml.pre", 5, "unknown pre-tokenizer tokenizer.ggml.pre=5"),
        ("tokenizer.ggml.model", "bert", "unsupported tokenizer.ggml.model 'bert'"),
        ("tokenizer.ggml.add_bos_token", "true", "tokenizer.ggml.add_bos_token must be a bool"),
    ]:
        with pytest.raises(TokenizerError, match="x.gguf") as e:
            tokenizer_from_gguf(dict(good, **{key: value}), "x.gguf")
        assert needle in str(e.value), (key, value, str(e.value))
    # Out-of-range special ids are ignored (llama.cpp warns and ignores them too); an empty token gets
    # llama.cpp's name for it.
    tok = tokenizer_from_gguf(dict(good, **{"tokenizer.ggml.bos_token_id": 99,
                                            "tokenizer.ggml.tokens": ["a", "b", "ab", ""]}), "x.gguf")
    assert tok.bos_id is None and tok.decode([3]) == "[EMPTY_3]"


def test_sentencepiece_gguf_with_huge_tokens_is_refused_quickly():
    tokens = ["<unk>"] + ["x" * 20_000 + str(i) for i in range(300)]
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [2] + [1] * 300, "tokenizer.ggml.scores": [0.0] * 301}
    refused(lambda: tokenizer_from_gguf(md, "x.gguf"), "too long to derive merges", seconds=2.0)


# ------------------------------------------------------------------ item 6: the tokenizer against the embedding
def test_check_embedding(meta_tok):
    """A tokenizer that produces ids the embedding has no row for is refused; a smaller one is legal
    (padded embeddings), its extra rows never produced by encode."""
    meta_tok.check_embedding(128256)
    meta_tok.check_embedding(128512, "padded.gguf")
    with pytest.raises(TokenizerError, match=r"produces ids up to 128255, but x.gguf has only 128000 embedding rows"):
        meta_tok.check_embedding(128000, "x.gguf")
    smol = load_tokenizer(smollm2_path())
    smol.check_embedding(49152)
    with pytest.raises(TokenizerError):
        smol.check_embedding(49151)


# ------------------------------------------------------------------ item 9: tokenizer.model without byte tokens
def model_lines():
    return open(MODEL, "rb").read().splitlines()


def test_tokenizer_model_missing_byte_tokens_is_refused_at_load(tmp_path):
    """The single-byte token '!' (rank 0) replaced by a new 4-byte token: the ranks stay 0..n-1 but the
    byte 0x21 has no token. tiktoken would load it, then panic on the first text holding a '!'."""
    lines = model_lines()
    token, rank = lines[0].split()
    assert len(base64.b64decode(token)) == 1
    lines[0] = base64.b64encode(b"zzqx") + b" " + rank
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n".join(lines))
    refused(lambda: load_tokenizer(path), str(path), "1 of the 256 single-byte tokens are missing (the first: 0x21)")


def test_broken_tokenizer_models(tmp_path):
    path = tmp_path / "tokenizer.model"
    for content, needle in [
        (b"", "no tokens (an empty file?)"),
        (b"\n\n  \n", "no tokens"),
        (b"IQ== 0\nIQ== 1\n", "line 2: token b'!' already has rank 0"),
        (b"IQ== 0\nIg== 0\n", "some rank appears twice"),
        (b"IQ== 5\n", "rank 5 is out of range"),
        (b"IQ== 99999999999999999999999\n", "out of range"),
        (b"IQ== x\n", "line 1 is not '<base64 token> <rank>'"),
        (b"@@@@ 0\n", "line 1 is not"),
        (b" 0\n", "line 1 is not"),
        (b"\xff\xfe 1 2\n", "line 1 is not"),
    ]:
        path.write_bytes(content)
        refused(lambda: Llama3Tokenizer(path), str(path), needle)


def test_tokenizer_model_is_read_afresh(tmp_path):
    """tiktoken's loader caches any file it reads by its path under the temp directory; ours reads the
    file each time, so a different file at the same path is a different tokenizer."""
    path = tmp_path / "tokenizer.model"
    path.write_bytes(open(MODEL, "rb").read())
    assert Llama3Tokenizer(path).encode(" Việt") == [101798]
    lines = model_lines()[:256]
    path.write_bytes(b"\n".join(lines))
    tok = Llama3Tokenizer(path)
    assert tok.vocab_size == 256 + 256 and len(tok.encode(" Việt")) == len(" Việt".encode())


def test_a_rust_panic_becomes_a_tokenizer_error():
    """The one place a panic could still come from (a library bug) is guarded: this builds the
    tiktoken encoding our checks refuse, to get a real PanicException."""
    import tiktoken

    from llama3.tokenizer import _rust_errors

    enc = tiktoken.Encoding("broken", pat_str=r"\S+", mergeable_ranks={b"a": 0}, special_tokens={})
    with pytest.raises(BaseException) as raw:
        enc.encode_ordinary("b")
    assert not isinstance(raw.value, Exception) and type(raw.value).__name__ == "PanicException"
    with pytest.raises(TokenizerError, match="panicked"):
        with _rust_errors("x"):
            enc.encode_ordinary("b")


# ------------------------------------------------------------------ any text, any tokenizer
@pytest.fixture(scope="module")
def every_kind(meta_tok, llama3_gguf):
    return [meta_tok, load_tokenizer(JSON), load_tokenizer(llama3_gguf), load_tokenizer(smollm2_path())]


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=60))
def test_encode_and_decode_take_any_text(every_kind, text):
    """Lone surrogates included (a JSON body may hold "\\ud800"): they become U+FFFD, as tiktoken does."""
    clean = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    for tok in every_kind:
        for allow_special in (False, True):
            ids = tok.encode(text, allow_special=allow_special)
            assert all(0 <= i < tok.vocab_size for i in ids)
            decoded = tok.decode(ids)
        if tok.path != smollm2_path():  # SmolLM2's vocabulary lacks a few control bytes (0x04, ...)
            assert decoded == clean
    assert "\ud800" not in every_kind[0].decode(every_kind[0].encode("a\ud800b"))


def test_decode_refuses_what_is_not_a_token(meta_tok):
    for ids, error in [([128256], ValueError), ([-1], ValueError), (["x"], ValueError), ([None], TypeError),
                       ([2**70], ValueError)]:
        with pytest.raises(error):
            meta_tok.decode(ids)


def test_peak_memory_sees_an_allocation():
    import mmap

    with peak_memory() as peak:
        # A fresh anonymous mapping, written page by page: its memory cannot have been resident before
        # (a heap allocation may reuse pages earlier tests freed, so that the high-water mark stays put).
        block = mmap.mmap(-1, 64 << 20)
        for i in range(0, len(block), mmap.PAGESIZE):
            block[i] = 1
        block.close()
    assert peak["bytes"] >= 60 << 20


def test_oversized_tokenizer_files_are_not_read(tmp_path):
    for name in ("tokenizer.model", "tokenizer.json"):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(65 << 20)  # sparse: 65 MB stated, nothing written
        refused(lambda: load_tokenizer(path), str(path), "larger than any tokenizer file", max_growth=16 << 20)
