"""Tokenizers behind one interface: Llama 3's tiktoken BPE, ``tokenizer.json``, and GGUF vocabularies.

Every tokenizer here knows the exact bytes of each token, so decoding is one rule for all
of them (join the bytes, decode UTF-8 with replacement) and the streaming detokenizer keeps
its invariant by construction: the pieces it yields join to ``decode(all_ids)`` and no piece
ends inside a UTF-8 character.

Text from a user never becomes a special token: ``encode`` treats ``"<|eot_id|>"`` in its
input as plain text unless ``allow_special=True``.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

# Meta's split regex (llama/tokenizer.py pat_str).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # Meta encodes in slices of this many characters...
MAX_NO_WHITESPACES_CHARS = 25_000  # ...and cuts runs of whitespace or non-whitespace longer than this.

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


class Tokenizer:
    """The interface every face uses. Subclasses fill in the backend and ``_token_bytes``."""

    path: str
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    special_tokens: dict[str, int]  # name -> id
    stop_ids: set[int]  # every id that ends a turn
    _token_bytes: list[bytes]
    _strip_leading_space = False  # SentencePiece-style vocabularies drop the prefix space when decoding

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; special-token names in it stay plain text unless ``allow_special``."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._encode(text, allow_special)
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path}: this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError(f"{self.path}: this tokenizer has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

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

    def detokenizer(self) -> "StreamingDetokenizer":
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
        from tiktoken.load import load_tiktoken_bpe

        self.path = str(model_path)
        try:
            ranks = load_tiktoken_bpe(self.path)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise TokenizerError(f"{self.path}: not a tiktoken BPE file: {e}") from None
        names = llama3_special_tokens(version)
        self.version = version
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(names)}
        self._enc = tiktoken.Encoding(name=Path(self.path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        by_id = {rank: token for token, rank in ranks.items()}
        if len(by_id) != len(ranks) or set(by_id) != set(range(len(ranks))):
            raise TokenizerError(f"{self.path}: ranks are not the contiguous ids 0..{len(ranks) - 1}")
        self._token_bytes = [by_id[i] for i in range(len(ranks))] + [n.encode() for n in names]
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.add_bos = True
        stops = ["<|end_of_text|>", "<|eot_id|>"] + (["<|eom_id|>"] if version != "3.0" else [])
        self.stop_ids = {self.special_tokens[s] for s in stops}

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                ids.extend(self._enc.encode(piece, allowed_special=allowed, disallowed_special=()))
        return ids


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
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (bytes_to_unicode), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (from ``tokenizer.json`` or built from a GGUF vocabulary)."""

    def __init__(self, backend, path: str, *, bos_id=None, eos_id=None, add_bos=False, extra_stop_ids=(),
                 byte_level=True, strip_leading_space=False):
        self.path = path
        self._plain = backend  # special-token names stay text
        self._plain.encode_special_tokens = True
        self._special = type(backend).from_str(backend.to_str())  # special-token names become tokens
        self._special.encode_special_tokens = False
        self._strip_leading_space = strip_leading_space
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens = {tok.content: i for i, tok in added.items() if tok.special}
        byte_decoder = _byte_decoder()
        table: list[bytes] = []
        for i in range(vocab_size):
            token = backend.id_to_token(i)
            if token is None:
                table.append(b"")
            elif i in added:
                table.append(added[i].content.encode("utf-8"))
            elif byte_level:
                table.append(bytes(byte_decoder[c] for c in token) if all(c in byte_decoder for c in token)
                             else token.encode("utf-8"))
            else:  # SentencePiece style: "▁" is a space, "<0xAB>" a raw byte
                m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
                table.append(bytes([int(m.group(1), 16)]) if m else token.replace("\u2581", " ").encode("utf-8"))
        self._token_bytes = table
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        stops = {i for i in (eos_id, *extra_stop_ids) if i is not None}
        stops |= {i for name, i in self.special_tokens.items() if name in END_OF_TURN_TEXTS}
        self.stop_ids = stops

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        backend = self._special if allow_special else self._plain
        return backend.encode(text, add_special_tokens=False).ids


def load_tokenizer_json(path: str | os.PathLike) -> HFTokenizer:
    """A ``tokenizer.json`` with the ``tokenizer_config.json`` beside it (special tokens, BOS, stop ids)."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise TokenizerError(f"{path}: cannot read tokenizer.json: {e}") from None
    config = {}
    config_path = path.parent / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except ValueError as e:
            raise TokenizerError(f"{config_path}: invalid JSON: {e}") from None

    def token_id(key):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return backend.token_to_id(value) if isinstance(value, str) else None

    bos, eos = token_id("bos_token"), token_id("eos_token")
    model_type = json.loads(backend.to_str()).get("model", {})
    byte_level = not model_type.get("byte_fallback", False)
    # Llama 3's tokenizer.json prepends BOS through its post-processor; others say add_bos_token.
    add_bos = bool(config["add_bos_token"]) if "add_bos_token" in config else _post_processor_adds(backend, bos)
    tok = HFTokenizer(backend, str(path), bos_id=bos, eos_id=eos, add_bos=add_bos, byte_level=byte_level,
                      strip_leading_space=not byte_level)
    tok.chat_template = config.get("chat_template")
    return tok


def _post_processor_adds(backend, bos_id) -> bool:
    if bos_id is None:
        return False
    return bos_id in backend.encode("a", add_special_tokens=True).ids


# ----------------------------------------------------------------------------- GGUF vocabularies
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX_LLAMACPP = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regexes llama.cpp applies one after the other (llama-vocab.cpp).
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {}
for _names, _regexes in [
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), (_LLAMA3_REGEX_LLAMACPP,)),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", _GPT2_REGEX)),
    (("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code",
      "roberta-bpe", "mpt", "olmo", "jais"), (_GPT2_REGEX,)),
    (("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), (_QWEN2_REGEX,)),
]:
    for _name in _names:
        GGUF_PRE_TOKENIZERS[_name] = _regexes

GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_BYTE = 3, 4, 6


def tokenizer_from_gguf(metadata: dict, path: str) -> HFTokenizer:
    """Build a ``tokenizers`` tokenizer from a GGUF's ``tokenizer.ggml.*`` keys."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, Sequence) or isinstance(tokens, str) or not tokens \
            or not all(isinstance(t, str) for t in tokens):  # a list, or the GGUF reader's StringArray
        raise TokenizerError(f"{path}: the GGUF has no tokenizer.ggml.tokens list")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{path}: token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)

    def meta_id(key):
        value = metadata.get(key)
        return int(value) if isinstance(value, int) and 0 <= value < len(tokens) else None

    bos, eos, eot = meta_id("tokenizer.ggml.bos_token_id"), meta_id("tokenizer.ggml.eos_token_id"), \
        meta_id("tokenizer.ggml.eot_token_id")
    eom = meta_id("tokenizer.ggml.eom_token_id")

    if kind == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise TokenizerError(f"{path}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r} "
                                 f"(known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))})")
        merges = metadata.get("tokenizer.ggml.merges") or []
        pairs = []
        for m in merges:
            parts = m.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{path}: malformed merge {m!r}")
            pairs.append((parts[0], parts[1]))
        backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in GGUF_PRE_TOKENIZERS[pre]]
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        byte_level, strip = True, False
        default_add_bos = False
    elif kind == "llama":
        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = _merges_from_scores(tokens, scores, types)
        backend = Backend(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                     unk_token=tokens[meta_id("tokenizer.ggml.unknown_token_id") or 0]))
        prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        byte_level, strip = False, bool(prefix)
        default_add_bos = True
    else:
        raise TokenizerError(f"{path}: unsupported tokenizer.ggml.model {kind!r} (supported: 'gpt2', 'llama')")

    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(types) if t == GGUF_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == GGUF_USER_DEFINED]
    if specials:
        backend.add_special_tokens(specials)
    if user:
        backend.add_tokens(user)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos))
    return HFTokenizer(backend, path, bos_id=bos, eos_id=eos, add_bos=add_bos, extra_stop_ids=(eot, eom),
                       byte_level=byte_level, strip_leading_space=strip)


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps scores, not merges: every split of a token into two vocabulary
    pieces is a merge, ranked by the merged token's score (as transformers' converter does)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (1, 4)}
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
    with open(path, "rb") as f:
        magic = f.read(4)
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
            if not json.loads(params.read_text()).get("use_scaled_rope", False):
                return "3.0"
        except (OSError, ValueError, AttributeError):
            pass
    return "3.1"
