"""Tokenizers behind one interface: Llama 3's tiktoken BPE, ``tokenizer.json``, and GGUF vocabularies.

Every tokenizer here knows the exact bytes of each token, so decoding is one rule for all
of them (join the bytes, decode UTF-8 with replacement) and the streaming detokenizer keeps
its invariant by construction: the pieces it yields join to ``decode(all_ids)`` and no piece
ends inside a UTF-8 character.

Text from a user never becomes a special token: ``encode`` treats ``"<|eot_id|>"`` in its
input as plain text unless ``allow_special=True``.

Tokenizer files are untrusted input. Every reader checks what a file states before using it
(ids below ``MAX_VOCAB_SIZE``, no duplicate tokens, all 256 byte tokens where the BPE needs
them, files below ``MAX_TOKENIZER_FILE_BYTES``) and fails with a ``TokenizerError`` naming the
file, the field and the value. A panic inside a Rust tokenizer (pyo3's ``PanicException``, which
``except Exception`` does not catch) becomes a ``TokenizerError`` too. ``encode`` accepts any
``str``: lone surrogates become U+FFFD first, as tiktoken does.

A GGUF vocabulary is tokenized the way llama.cpp does it (llama-vocab.cpp): the regexes its
``tokenizer.ggml.pre`` names, one after the other, and for Llama 3's pre-tokenizers
(``ignore_merges``) a piece that is itself in the vocabulary is one token, merges or not.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import numbers
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property, lru_cache
from itertools import repeat
from pathlib import Path

# Meta's split regex (llama/tokenizer.py pat_str).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # Meta encodes in slices of this many characters...
MAX_NO_WHITESPACES_CHARS = 25_000  # ...and cuts runs of whitespace or non-whitespace longer than this.

# Bounds on what a tokenizer file may state. The largest published vocabularies have 262,144
# tokens (Gemma 3) and the largest tokenizer.json files about 33 MB.
MAX_VOCAB_SIZE = 1 << 21  # every token id must be below this
MAX_TOKENIZER_FILE_BYTES = 64 << 20  # tokenizer.model, tokenizer.json (parsed, ~10x this in memory)
MAX_CONFIG_FILE_BYTES = 16 << 20  # tokenizer_config.json, chat_template.jinja, params.json
# Deriving SentencePiece merges splits every token at every position: sum(len(token)^2) steps.
MAX_SPM_MERGE_WORK = 64_000_000

# Tokens that end a turn, by their text, as llama.cpp collects its end-of-generation ids.
END_OF_TURN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
                     "<end_of_turn>", "</s>", "<EOT>", "<|return|>")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used (names the file and the problem)."""


def llama3_special_tokens(version: str = "3.1") -> list[str]:
    """Meta's 256 special-token names in id order from 128000 (llama3 repo for 3.0; llama-models for 3.1+)."""
    if version == "3.0":
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        first_reserved = 5
    else:
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                 "<|image|>"]
        first_reserved = 2
    reserved = [f"<|reserved_special_token_{first_reserved + i}|>"
                for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(named))]
    return named + reserved


def _valid_text(text: str) -> str:
    """``text`` with lone surrogates (which no UTF-8 encoder accepts) replaced by U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@contextmanager
def _rust_errors(what: str) -> Iterator[None]:
    """Turn a failure inside tiktoken or tokenizers into a TokenizerError, a Rust panic included:
    pyo3's PanicException derives from BaseException, so ``except Exception`` would let it through."""
    try:
        yield
    except TokenizerError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the library raises, the input is what failed
        raise TokenizerError(f"{what}: {type(e).__name__}: {e}") from None
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise TokenizerError(f"{what}: the Rust tokenizer panicked: {e}") from None


def _read_bounded(path: str | os.PathLike, limit: int = MAX_TOKENIZER_FILE_BYTES) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise TokenizerError(f"{path}: {size} bytes is larger than any tokenizer file ({limit} bytes at most)")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e.strerror or e}") from None


def _read_json_object(path: Path) -> dict:
    data = _read_bounded(path, MAX_CONFIG_FILE_BYTES)
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise TokenizerError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class Tokenizer:
    """The interface every face uses. Subclasses fill in ``_encode`` and ``_token_bytes``."""

    path: str
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    special_tokens: dict[str, int]  # name -> id
    stop_ids: set[int]  # every id that ends a turn
    chat_template: str | None = None
    _token_bytes: list[bytes]  # id -> the token's bytes (b"" for an id no token has)
    _strip_leading_space = False  # SentencePiece-style vocabularies drop the prefix space when decoding

    @property
    def vocab_size(self) -> int:
        """One more than the largest id this tokenizer can produce; every id below it decodes."""
        return len(self._token_bytes)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; special-token names in it stay plain text unless ``allow_special``."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        text = _valid_text(text)
        if allow_special and self.special_tokens:
            ids: list[int] = []
            start = 0
            for m in self.special_pattern.finditer(text):
                ids += self._encode(text[start:m.start()])
                ids.append(self.special_tokens[m.group()])
                start = m.end()
            ids += self._encode(text[start:])
        else:
            ids = self._encode(text)
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path}: this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError(f"{self.path}: this tokenizer has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def _encode(self, text: str) -> list[int]:
        """Ids of plain text (special-token names in it are text)."""
        raise NotImplementedError

    @cached_property
    def special_pattern(self) -> re.Pattern:
        """Matches any special-token name, the longest first (never matches without special tokens)."""
        names = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names)) or "(?!)")

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self._token_bytes):
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {len(self._token_bytes)})")
        return self._token_bytes[token_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids (special tokens as their names); invalid UTF-8 becomes U+FFFD."""
        text = b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def check_embedding(self, rows: int, source: str = "the model") -> None:
        """Refuse (``TokenizerError``) a tokenizer that can produce ids the model's embedding has no
        row for. One smaller than the embedding is fine: padded embeddings are common, ``encode``
        never produces the extra ids, and whoever samples must mask their logits (``vocab_size``)."""
        if self.vocab_size > rows:
            raise TokenizerError(f"{self.path}: the tokenizer produces ids up to {self.vocab_size - 1}, but "
                                 f"{source} has only {rows} embedding rows (vocab_size {rows}): they do not "
                                 "belong together")

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (feed ids one at a time)."""
        return StreamingDetokenizer(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class StreamingDetokenizer:
    """Feed ids one at a time; each call returns the text that is now complete.

    Holds back the bytes of an unfinished UTF-8 character (an emoji or CJK character split
    across tokens), so pieces never end inside one; ``finish()`` returns what is left.
    Joined, the pieces equal ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False

    def add(self, token_id: int) -> str:
        text = self._decoder.decode(self.tokenizer.token_bytes(int(token_id)))
        return self._strip(text)

    def finish(self) -> str:
        return self._strip(self._decoder.decode(b"", final=True))

    def _strip(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            if self.tokenizer._strip_leading_space and text.startswith(" "):
                text = text[1:]
        return text


# ----------------------------------------------------------------------------- Llama 3 tiktoken
class Llama3Tokenizer(Tokenizer):
    """Meta's ``tokenizer.model`` (tiktoken BPE ranks) with Meta's special tokens and chunking."""

    def __init__(self, model_path: str | os.PathLike, version: str = "3.1"):
        import tiktoken

        self.path = str(model_path)
        ranks = read_tiktoken_ranks(self.path)
        names = llama3_special_tokens(version)
        self.version = version
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(names)}
        with _rust_errors(f"{self.path}: tiktoken cannot use these ranks"):
            self._enc = tiktoken.Encoding(name=Path(self.path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        table = [b""] * len(ranks)
        for token, rank in ranks.items():
            table[rank] = token
        self._token_bytes = table + [n.encode() for n in names]
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.add_bos = True
        stops = ["<|end_of_text|>", "<|eot_id|>"] + (["<|eom_id|>"] if version != "3.0" else [])
        self.stop_ids = {self.special_tokens[s] for s in stops}

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        with _rust_errors(f"{self.path}: tiktoken failed to encode"):
            for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
                for piece in split_long_runs(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                    ids += self._enc.encode_ordinary(piece)
        return ids


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken BPE file (one ``<base64 token> <rank>`` per line), checked so that tiktoken can
    encode any text with it: the ranks are the ids 0..n-1, each once; no token is empty; and all
    256 single bytes are tokens (tiktoken panics on a byte it has no token for).

    Read here rather than with ``tiktoken.load``, which caches any path it reads under the temp
    directory by name, so a changed file at the same path would not be seen."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(_read_bounded(path).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError(f"{len(fields)} fields")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path}: line {number} is not '<base64 token> <rank>' ({e}): not a tiktoken "
                                 "BPE file") from None
        if token in ranks:
            raise TokenizerError(f"{path}: line {number}: token {token!r} already has rank {ranks[token]}")
        if not token:
            raise TokenizerError(f"{path}: line {number}: an empty token")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: no tokens (an empty file?): not a tiktoken BPE file")
    if len(ranks) > MAX_VOCAB_SIZE - NUM_RESERVED_SPECIAL_TOKENS:
        raise TokenizerError(f"{path}: {len(ranks)} tokens is more than any vocabulary "
                             f"({MAX_VOCAB_SIZE - NUM_RESERVED_SPECIAL_TOKENS} at most)")
    values = set(ranks.values())
    if len(values) != len(ranks) or min(values) != 0 or max(values) != len(ranks) - 1:
        odd = next((r for r in sorted(values) if not 0 <= r < len(ranks)), None)
        detail = f"rank {odd} is out of range" if odd is not None else "some rank appears twice"
        raise TokenizerError(f"{path}: the ranks are not the ids 0..{len(ranks) - 1}, each once ({detail})")
    missing = [b for b in range(256) if bytes((b,)) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} of the 256 single-byte tokens are missing (the first: "
                             f"0x{missing[0]:02X}), so some text could not be encoded")
    return ranks


_RUNS = re.compile(r"\s+|\S+")


def split_long_runs(text: str, max_run: int) -> Iterator[str]:
    """Meta's ``_split_whitespaces_or_nonwhitespaces``: cut every run of whitespace or of
    non-whitespace characters after each ``max_run`` characters (so BPE never sees a huge piece)."""
    start = 0
    for run in _RUNS.finditer(text):
        cut = run.start() + max_run
        while cut < run.end():
            yield text[start:cut]
            start = cut
            cut += max_run
    yield text[start:]


# ----------------------------------------------------------------------------- tokenizers-backed
class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (from ``tokenizer.json`` or built from a GGUF vocabulary) and the
    bytes of every id, which its builder works out from the vocabulary."""

    def __init__(self, backend, path: str, token_bytes: list[bytes], special_tokens: dict[str, int], *,
                 bos_id: int | None, eos_id: int | None, add_bos: bool, stop_ids: set[int],
                 strip_leading_space: bool = False, n_ids: int | None = None):
        """``n_ids``: ids at or past it are placeholders the builder added to the backend (bytes the
        vocabulary lacks, which must stay apart in BPE but yield no token): dropped from ``encode``."""
        self.path = path
        self._n_ids = n_ids
        self._backend = backend
        self._backend.encode_special_tokens = True  # special-token names are text; encode() splits them out
        self._token_bytes = token_bytes
        self.special_tokens = special_tokens
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.stop_ids = stop_ids
        self._strip_leading_space = strip_leading_space

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        with _rust_errors(f"{self.path}: the tokenizer failed to encode"):
            # encode_batch_fast tracks no character offsets: 1.5-2x faster on long text than encode
            ids = self._backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
        return ids if self._n_ids is None else [i for i in ids if i < self._n_ids]


@lru_cache(maxsize=1)
def _byte_level_translation() -> dict[int, int]:
    """For ``str.translate``: each of GPT-2's printable stand-ins for a byte (``bytes_to_unicode``)
    -> the character U+00XX of that byte, every other character below U+0100 -> U+FFFF. So
    ``token.translate(t).encode("latin-1")`` is a byte-level token's bytes, and fails for other text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {c: 0xFFFF for c in range(256)}
    table.update({c: c for c in printable})
    others = [b for b in range(256) if b not in printable]  # bytes 0-32, 127-160, 173 stand as U+0100...
    table.update({256 + n: b for n, b in enumerate(others)})
    return table


@lru_cache(maxsize=1)
def _byte_level_chars() -> tuple[str, ...]:
    """The 256 characters byte-level BPE writes the bytes 0..255 as (GPT-2's ``bytes_to_unicode``)."""
    chars = {b: chr(c) for c, b in _byte_level_translation().items() if b != 0xFFFF}
    return tuple(chars[b] for b in range(256))


def _byte_level_bytes(token: str) -> bytes:
    """A byte-level BPE token's bytes; a token that is not byte-level text is its own UTF-8."""
    try:
        return token.translate(_byte_level_translation()).encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8", "replace")


_SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _sentencepiece_bytes(token: str) -> bytes:
    """A SentencePiece token's bytes: "▁" is a space, "<0xAB>" a raw byte."""
    m = _SPM_BYTE.fullmatch(token)
    return bytes([int(m.group(1), 16)]) if m else token.replace("\u2581", " ").encode("utf-8", "replace")


def _stop_ids(special_tokens: Mapping[str, int], *ids: int | None) -> set[int]:
    return {i for i in ids if i is not None} | {i for name, i in special_tokens.items() if name in END_OF_TURN_TEXTS}


def load_tokenizer_json(path: str | os.PathLike) -> HFTokenizer:
    """A ``tokenizer.json`` with the ``tokenizer_config.json`` beside it (special tokens, BOS, stop ids,
    chat template)."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    data = _read_bounded(path)
    try:
        text = data.decode("utf-8")
        spec = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise TokenizerError(f"{path}: not a tokenizer.json: {e}") from None
    _check_json_ids(spec, path)
    with _rust_errors(f"{path}: cannot read tokenizer.json"):
        backend = Backend.from_str(text)
        vocab = backend.get_vocab(with_added_tokens=True)  # token -> id
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
    if not vocab:
        raise TokenizerError(f"{path}: the vocabulary is empty")
    size = max(vocab.values()) + 1
    if size > MAX_VOCAB_SIZE:  # tokenizers may number added tokens itself: check what it did
        raise TokenizerError(f"{path}: token id {size - 1} is beyond the largest vocabulary ({MAX_VOCAB_SIZE})")
    if len(set(vocab.values())) != len(vocab):
        seen: dict[int, str] = {}
        for token, i in vocab.items():
            if i in seen:
                raise TokenizerError(f"{path}: tokens {seen[i]!r} and {token!r} both have id {i}")
            seen[i] = token
    byte_level = _mentions(spec.get("decoder"), "ByteLevel") or _mentions(spec.get("pre_tokenizer"), "ByteLevel")
    table = [b""] * size
    for token, i in vocab.items():
        if i in added:
            table[i] = added[i].content.encode("utf-8", "replace")
        else:
            table[i] = _byte_level_bytes(token) if byte_level else _sentencepiece_bytes(token)
    special = {tok.content: i for i, tok in added.items() if tok.special and i < size}

    config_path = path.parent / "tokenizer_config.json"
    config = _read_json_object(config_path) if config_path.is_file() else {}

    def token_id(key):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if isinstance(value, str) else None

    bos, eos = token_id("bos_token"), token_id("eos_token")
    if "add_bos_token" in config:
        if not isinstance(config["add_bos_token"], bool):
            raise TokenizerError(f"{config_path}: add_bos_token must be true or false, got {config['add_bos_token']!r}")
        add_bos = config["add_bos_token"]
    else:  # Llama 3's tokenizer.json prepends BOS through its post-processor
        with _rust_errors(f"{path}: the tokenizer failed to encode"):
            add_bos = bos is not None and bos in backend.encode("a", add_special_tokens=True).ids
    tok = HFTokenizer(backend, str(path), table, special, bos_id=bos, eos_id=eos, add_bos=add_bos,
                      stop_ids=_stop_ids(special, eos), strip_leading_space=not byte_level)
    tok.chat_template = _chat_template(config, path.parent)
    tok.encode("Probe: ça marche? 123 😀 <|x|>\n")  # a file that makes the library panic fails here, at load
    return tok


def _check_json_ids(spec, path: Path) -> None:
    """Every id a tokenizer.json states is an integer below MAX_VOCAB_SIZE (tokenizers itself would
    take 10**9 and leave us a table of that size to build)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise TokenizerError(f"{path}: not a tokenizer.json (no 'model' object)")
    vocab = spec["model"].get("vocab")
    named = vocab.items() if isinstance(vocab, dict) else ()
    if isinstance(vocab, list) and len(vocab) > MAX_VOCAB_SIZE:  # Unigram: ids are positions
        raise TokenizerError(f"{path}: model.vocab has {len(vocab)} tokens, more than {MAX_VOCAB_SIZE}")
    for token, i in named:
        if not _is_int(i) or not 0 <= i < MAX_VOCAB_SIZE:
            raise TokenizerError(f"{path}: model.vocab[{token!r}] = {i!r} is not a token id in [0, {MAX_VOCAB_SIZE})")
    added = spec.get("added_tokens") or []
    if not isinstance(added, list):
        raise TokenizerError(f"{path}: added_tokens is not a list")
    for k, entry in enumerate(added):
        i = entry.get("id") if isinstance(entry, dict) else None
        if not _is_int(i) or not 0 <= i < MAX_VOCAB_SIZE:
            raise TokenizerError(f"{path}: added_tokens[{k}].id = {i!r} is not a token id in [0, {MAX_VOCAB_SIZE})")


def _mentions(node, type_name: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) has ``"type": type_name``."""
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_mentions(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, type_name) for v in node)
    return False


def _chat_template(config: dict, folder: Path) -> str | None:
    """tokenizer_config.json's chat template (a string, or the one named "default" in a list), else a
    chat_template.jinja beside it (where newer transformers save it)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if isinstance(template, str):
        return template
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return _read_bounded(jinja, MAX_CONFIG_FILE_BYTES).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{jinja}: not UTF-8 text: {e}") from None
    return None


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- GGUF vocabularies
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX_LLAMACPP = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")
# tokenizer.ggml.pre -> the regexes llama.cpp applies one after the other (llama-vocab.cpp).
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {}
for _names, _regexes in [
    (_LLAMA3_PRE, (_LLAMA3_REGEX_LLAMACPP,)),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", _GPT2_REGEX)),
    (("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code",
      "roberta-bpe", "mpt", "olmo", "jais"), (_GPT2_REGEX,)),
    (("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), (_QWEN2_REGEX,)),
]:
    for _name in _names:
        GGUF_PRE_TOKENIZERS[_name] = _regexes
# llama.cpp's `ignore_merges`: a pre-tokenized piece that is itself a token is that token, whatever
# the merges say (as tiktoken does). Without it ' Việt' is 3 tokens in Llama 3, not 101798.
GGUF_IGNORE_MERGES_PRE = frozenset(_LLAMA3_PRE)

GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_BYTE = 1, 3, 4, 6


def tokenizer_from_gguf(metadata: Mapping, path: str) -> HFTokenizer:
    """Build a tokenizer from a GGUF's ``tokenizer.ggml.*`` keys, as llama.cpp reads them.

    The arrays may be any sequence (a list, a numpy array, a compact string array)."""
    from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    kind = metadata.get("tokenizer.ggml.model")
    tokens = _gguf_array(metadata, "tokenizer.ggml.tokens", path, str)
    if not tokens:
        raise TokenizerError(f"{path}: the GGUF has no tokenizer.ggml.tokens (or an empty one)")
    n = len(tokens)
    if n > MAX_VOCAB_SIZE:
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens has {n} tokens, more than {MAX_VOCAB_SIZE}")
    types = _gguf_array(metadata, "tokenizer.ggml.token_type", path, int, n) or [GGUF_NORMAL] * n
    if "" in tokens:
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # llama.cpp's name for an empty token
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != n:
        _refuse_duplicate(tokens, path)

    def meta_id(key):
        value = _scalar(metadata.get(key))
        return int(value) if _is_int(value) and 0 <= value < n else None

    bos, eos, eot, eom = (meta_id(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "eom"))
    what = f"{path}: cannot build the tokenizer from tokenizer.ggml.*"
    lacking: list[str] = []
    if kind == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str) or pre not in GGUF_PRE_TOKENIZERS:
            raise TokenizerError(f"{path}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r} "
                                 f"(known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))})")
        merges = _gguf_merges(metadata, path)
        # A byte the vocabulary lacks stays one symbol that no merge joins (llama.cpp: it splits the merges
        # around it, then yields nothing for it): a placeholder id past the vocabulary, dropped by encode.
        lacking = [c for c in _byte_level_chars() if c not in vocab]
        bpe_vocab = {**vocab, **{c: n + k for k, c in enumerate(lacking)}} if lacking else vocab
        with _rust_errors(what):
            backend = Backend(models.BPE(vocab=bpe_vocab, merges=merges, ignore_merges=pre in GGUF_IGNORE_MERGES_PRE))
            splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in GGUF_PRE_TOKENIZERS[pre]]
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        to_bytes, strip = _byte_level_bytes, False
        default_add_bos = pre in _LLAMA3_PRE  # llama.cpp: add_bos = true for Llama 3's pre-tokenizers
    elif kind == "llama":
        scores = _gguf_array(metadata, "tokenizer.ggml.scores", path, float, n) or [0.0] * n
        prefix = _gguf_bool(metadata, "tokenizer.ggml.add_space_prefix", path, True)
        unk = tokens[meta_id("tokenizer.ggml.unknown_token_id") or 0]
        merges = _merges_from_scores(tokens, scores, types, path)
        with _rust_errors(what):
            backend = Backend(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                         unk_token=unk))
            steps = [normalizers.Prepend("\u2581")] if prefix else []
            backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
        to_bytes, strip = _sentencepiece_bytes, prefix
        default_add_bos = True
    else:
        raise TokenizerError(f"{path}: unsupported tokenizer.ggml.model {kind!r} (supported: 'gpt2', 'llama')")

    specials = [tokens[i] for i, t in enumerate(types) if t == GGUF_CONTROL]
    user = [tokens[i] for i, t in enumerate(types) if t == GGUF_USER_DEFINED]
    with _rust_errors(what):
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    # Control and user-defined tokens are their text; the others are byte-level or SentencePiece text.
    table = list(map(to_bytes, tokens))
    for t in specials + user:
        table[vocab[t]] = t.encode("utf-8", "replace")
    special = {t: vocab[t] for t in specials}
    add_bos = _gguf_bool(metadata, "tokenizer.ggml.add_bos_token", path, default_add_bos)
    return HFTokenizer(backend, path, table, special, bos_id=bos, eos_id=eos, add_bos=add_bos,
                       stop_ids=_stop_ids(special, eos, eot, eom), strip_leading_space=strip,
                       n_ids=n if lacking else None)


def _scalar(value):
    """A numpy scalar as the Python number it holds; anything else as it is."""
    return value.item() if getattr(value, "shape", None) == () and hasattr(value, "item") else value


def _gguf_array(metadata: Mapping, key: str, path: str, kind: type, length: int | None = None) -> list | None:
    """``metadata[key]`` as a list of ``kind`` (None if absent), from any sequence or numpy array."""
    value = metadata.get(key)
    if value is None:
        return None
    if hasattr(value, "tolist") and getattr(value, "ndim", 1) == 1:  # numpy: Python numbers, in one call
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TokenizerError(f"{path}: {key} is not an array (got {type(value).__name__})")
    items = list(value)
    allowed = {str} if kind is str else {int} if kind is int else {int, float}
    if not set(map(type, items)) <= allowed:  # the common case costs one pass in C
        bad = next(i for i, v in enumerate(items) if type(v) not in allowed)
        raise TokenizerError(f"{path}: {key}[{bad}] = {items[bad]!r} is not a {kind.__name__}")
    if length is not None and len(items) != length:
        raise TokenizerError(f"{path}: {key} has {len(items)} entries for {length} tokens")
    return items


def _gguf_bool(metadata: Mapping, key: str, path: str, default: bool) -> bool:
    value = _scalar(metadata.get(key, default))
    if not isinstance(value, bool):
        raise TokenizerError(f"{path}: {key} must be a bool, got {value!r}")
    return value


def _gguf_merges(metadata: Mapping, path: str) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` as pairs, split as llama.cpp does: at the first space after the first
    character (byte-level tokens hold no spaces, so one "a b" string is one pair)."""
    merges = _gguf_array(metadata, "tokenizer.ggml.merges", path, str) or []
    # Fast path, in C: when every merge holds exactly one space, not first, and no newline.
    joined = "\n".join(merges)
    if set(map(str.count, merges, repeat(" "))) <= {1} and joined.count("\n") == len(merges) - 1 \
            and "\n " not in joined and not joined.startswith(" "):
        flat = joined.replace(" ", "\n").split("\n")
        return list(zip(flat[0::2], flat[1::2]))
    pairs = []
    for k, m in enumerate(merges):
        cut = m.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"{path}: tokenizer.ggml.merges[{k}] = {m!r} is not two tokens separated by a space")
        pairs.append((m[:cut], m[cut + 1:]))
    return pairs


def _refuse_duplicate(tokens: list[str], path: str) -> None:
    """Two ids with one text: llama.cpp refuses such a vocabulary too (text -> id must be one id)."""
    first: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in first:
            raise TokenizerError(f"{path}: tokenizer.ggml.tokens[{i}] = {t!r} repeats tokenizer.ggml.tokens"
                                 f"[{first[t]}]: a vocabulary cannot hold one token twice")
        first[t] = i


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int], path: str) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps scores, not merges: every split of a token into two vocabulary
    pieces is a merge, ranked by the merged token's score (as transformers' converter does)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (GGUF_NORMAL, GGUF_USER_DEFINED)}
    work = sum(len(t) ** 2 for t in vocab)
    if work > MAX_SPM_MERGE_WORK:
        raise TokenizerError(f"{path}: the tokens of tokenizer.ggml.tokens are too long to derive merges from "
                             f"(sum of squared lengths {work} > {MAX_SPM_MERGE_WORK})")
    found = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                found.append((-scores[i], vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


# ----------------------------------------------------------------------------- entry point
def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a ``tokenizer.model``, a ``tokenizer.json``, a ``.gguf`` file, or a checkpoint folder."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise TokenizerError(f"{path}: no such file or directory")
    if path.is_dir():
        for candidate in (path / "tokenizer.json", path / "tokenizer.model", path / "original" / "tokenizer.model"):
            if candidate.is_file():
                if candidate.name == "tokenizer.model":
                    return Llama3Tokenizer(candidate, version=_llama_version(candidate.parent))
                return load_tokenizer_json(candidate)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(ggufs[0])
        raise TokenizerError(f"{path}: no tokenizer.json, tokenizer.model or .gguf file in this folder")
    if path.suffix == ".json":
        return load_tokenizer_json(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e.strerror or e}") from None
    if magic == b"GGUF":
        from .weights.gguf import check_header

        return tokenizer_from_gguf(check_header(str(path)).metadata, str(path))
    return Llama3Tokenizer(path, version=_llama_version(path.parent))


def _llama_version(folder: Path) -> str:
    """'3.0' when the folder's params.json shows a Llama 3.0 model (no scaled RoPE); else '3.1'
    (the names 3.1 gave to reserved tokens; the token ids are the same either way)."""
    params = folder / "params.json"
    if params.is_file():
        try:
            if not _read_json_object(params).get("use_scaled_rope", False):
                return "3.0"
        except TokenizerError:
            pass  # a broken params.json is the checkpoint reader's to report
    return "3.1"
