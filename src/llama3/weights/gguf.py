"""GGUF files (llama.cpp's format).

GGUF's q/k are already in Meta's RoPE layout: llama.cpp's converter undoes the HF
permutation. Llama 3.1 files carry their RoPE scaling only as a ``rope_freqs`` tensor
(one divisor per frequency band), which we use as it is.

``check_header`` walks the header with explicit bounds: every count, string and array length,
tensor dimension, offset and size is checked against the file's real size (cf. llama.cpp's
2024-2026 GGUF parser fixes), duplicate keys and tensor names are refused, and metadata arrays
stay compact (numbers as one numpy array, strings as one blob decoded on demand), so a hostile
file is refused, or read, without allocating much more than its header's size.

Tensors are then read in place: a block kind the kernels run (``llama3.kernels.SUPPORTED_KINDS``)
becomes a ``QuantTensor`` view of the file's memory map; F32 stays a view; anything else is
dequantized, one tensor at a time, as a last resort (and listed in ``Checkpoint.dequantized``).
"""

from __future__ import annotations

import dataclasses
import mmap
import operator
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelArgs
from .common import (MAX_CONTEXT, QUANTIZE_CHUNK, Checkpoint, CheckpointError, FileMap, ReadOptions, check_finite,
                     check_layers, check_shapes, finish_tensor, need_bool, need_float, need_int, need_str, show)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (name, size in bytes, numpy dtype).
_SCALARS = {0: ("uint8", 1, "<u1"), 1: ("int8", 1, "<i1"), 2: ("uint16", 2, "<u2"), 3: ("int16", 2, "<i2"),
            4: ("uint32", 4, "<u4"), 5: ("int32", 4, "<i4"), 6: ("float32", 4, "<f4"), 7: ("bool", 1, "?"),
            10: ("uint64", 8, "<u8"), 11: ("int64", 8, "<i8"), 12: ("float64", 8, "<f8")}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

# GGUF tensor name -> Meta name ("{i}" is the block number).
GGUF_TO_META = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
}

# Where each block kind keeps its float16 scale (and min) inside a block, for the NaN/inf check:
# kind -> (block bytes, byte offsets of the float16 fields). From ggml-common.h's block_* structs
# (e.g. block_q4_K = {d, dmin, scales[12], qs[128]}; block_q6_K = {ql[128], qh[64], scales[16], d}).
BLOCK_SCALES = {"Q4_0": (18, (0,)), "Q4_1": (20, (0, 2)), "Q5_0": (22, (0,)), "Q5_1": (24, (0, 2)),
                "Q8_0": (34, (0,)), "Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)),
                "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,)), "IQ4_NL": (18, (0,)), "IQ4_XS": (136, (0,))}
_FLOAT_VIEWS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def meta_name(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        target = GGUF_TO_META.get(".".join(["blk", "{i}"] + parts[2:]))
        return target.format(i=int(parts[1])) if target else None
    return GGUF_TO_META.get(name)


# ------------------------------------------------------------------------------ compact arrays
class NumberArray(Sequence):
    """A numeric GGUF metadata array, kept as one numpy array (the file's size, not 30 bytes per
    element as a list of Python numbers). Reads as a sequence of Python numbers; ``numpy()`` is free."""

    __slots__ = ("_array",)

    def __init__(self, array: np.ndarray):
        self._array = array

    def numpy(self) -> np.ndarray:
        return self._array

    def __array__(self, dtype=None, copy=None):
        return self._array if dtype is None else self._array.astype(dtype)

    @property
    def nbytes(self) -> int:
        return self._array.nbytes

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return NumberArray(self._array[i])
        return self._array[operator.index(i)].item()

    def __iter__(self):
        for start in range(0, len(self._array), 65536):  # Python numbers a chunk at a time
            yield from self._array[start:start + 65536].tolist()

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"NumberArray({len(self)} x {self._array.dtype})"


class StringArray(Sequence):
    """A GGUF string array kept as the file stores it: one bytes blob in which each string follows
    its 8-byte length, and the offset of each entry. A string is decoded (UTF-8) when it is read."""

    __slots__ = ("_blob", "_starts")

    def __init__(self, blob: bytes, starts: np.ndarray):
        self._blob, self._starts = blob, starts  # starts: len + 1 offsets; entry i = blob[starts[i]:starts[i+1]]

    @property
    def nbytes(self) -> int:
        return len(self._blob) + self._starts.nbytes

    def __len__(self) -> int:
        return len(self._starts) - 1

    def raw(self, i: int) -> bytes:
        return self._blob[int(self._starts[i]) + 8:int(self._starts[i + 1])]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.raw(j).decode("utf-8", "replace") for j in range(*i.indices(len(self)))]
        n, i = len(self), operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"string array index {i} out of range ({n} strings)")
        return self.raw(i % n).decode("utf-8", "replace")

    def __iter__(self):
        blob = self._blob
        for start in range(0, len(self), 65536):  # decoded a chunk at a time
            offsets = self._starts[start:start + 65537].tolist()
            yield from [blob[a + 8:b].decode("utf-8", "replace") for a, b in zip(offsets, offsets[1:])]

    def first_invalid_utf8(self) -> int | None:
        """The index of the first string that is not valid UTF-8, or None. One strict decode of the
        whole blob with each 8-byte length overwritten by NULs: a NUL is a whole character, so a
        string's bytes are valid in that context exactly when they are valid alone."""
        if len(self) == 0:
            return None
        blob, lengths_at = np.frombuffer(self._blob, dtype=np.uint8).copy(), self._starts[:-1]
        for i in range(8):
            blob[lengths_at + i] = 0
        try:
            blob.tobytes().decode("utf-8")
        except UnicodeDecodeError as e:
            return int(np.searchsorted(self._starts, e.start, side="right")) - 1
        return None

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings, {len(self._blob)} bytes)"


# ------------------------------------------------------------------------------ header
@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order: (out, in)
    type_id: int
    kind: str  # the GGML type's name: "F32", "Q4_K", ...
    offset: int  # absolute, in the file
    n_bytes: int


@dataclass
class Header:
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    data_offset: int


def _type_name(type_id: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


class _Reader:
    """Bounds-checked reads from a mapped header: nothing is taken that the file does not hold."""

    def __init__(self, path: str, buf: mmap.mmap, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, problem: str):
        raise CheckpointError(self.path, problem)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"{what} runs past the end of the file (truncated or corrupt header)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        self.pos += 4
        return _U32.unpack_from(self.buf, self.pos - 4)[0]

    def u64(self, what: str) -> int:
        self.need(8, what)
        self.pos += 8
        return _U64.unpack_from(self.buf, self.pos - 8)[0]

    def raw_string(self, what: str) -> bytes:
        n = self.u64(what + " length")
        if n > self.size - self.pos:
            self.fail(f"{what} length {n} is larger than the rest of the file ({self.size - self.pos} bytes)")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def string(self, what: str) -> str:
        return self.raw_string(what).decode("utf-8", "replace")

    def value(self, type_id: int, what: str):
        if type_id in _SCALARS:
            _, n, dtype = _SCALARS[type_id]
            self.need(n, what)
            self.pos += n
            return np.frombuffer(self.buf, dtype=dtype, count=1, offset=self.pos - n)[0].item()
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY:
            return self.array(what)
        self.fail(f"{what}: unknown value type {type_id}")

    def array(self, what: str):
        elem = self.u32(what + " element type")
        count = self.u64(what + " length")
        if elem == _ARRAY:
            self.fail(f"{what}: arrays of arrays are not supported")
        if elem not in _SCALARS and elem != _STRING:
            self.fail(f"{what}: unknown array element type {elem}")
        min_size = 8 if elem == _STRING else _SCALARS[elem][1]  # a string is at least its length
        if count * min_size > self.size - self.pos:
            self.fail(f"{what}: array length {count} is larger than the file could hold")
        if elem in _SCALARS:
            _, n, dtype = _SCALARS[elem]
            array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * n
            return NumberArray(array)
        # Strings: walk the lengths (each checked), then copy the whole run of entries at once.
        first, buf, size, unpack = self.pos, self.buf, self.size, _U64.unpack_from
        starts = np.empty(count + 1, dtype=np.int64)
        pos = first
        for i in range(count):
            starts[i] = pos - first
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"{what}[{i}] length")
            pos += 8 + unpack(buf, pos)[0]
            if pos > size:
                self.fail(f"{what}[{i}] runs past the end of the file (truncated or corrupt header)")
        starts[count] = pos - first
        self.pos = pos
        return StringArray(buf[first:pos], starts)


def check_header(path: str) -> Header:
    """Parse and bounds-check a GGUF header without trusting any number in it."""
    import gguf

    size = os.path.getsize(path)
    if size < 24:
        raise CheckpointError(path, f"file is truncated: {size} bytes is too short for a GGUF header")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        r = _Reader(path, buf, size)
        r.pos = 4
        if buf[:4] != GGUF_MAGIC:
            raise CheckpointError(path, "not a GGUF file (wrong magic; expected b'GGUF')")
        version = r.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0:
                raise CheckpointError(path, "big-endian GGUF files are not supported")
            raise CheckpointError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("metadata count")
        # Each metadata entry takes at least 13 bytes, each tensor info at least 28.
        if n_kv * 13 > size - r.pos:
            raise CheckpointError(path, f"metadata count {n_kv} is larger than the file could hold")
        if n_tensors * 28 > size - r.pos:
            raise CheckpointError(path, f"tensor count {n_tensors} is larger than the file could hold")

        metadata = {}
        for _ in range(n_kv):
            key = r.string("metadata key")
            if key in metadata:
                raise CheckpointError(path, f"metadata key {show(key)} appears twice")
            metadata[key] = r.value(r.u32(f"type of {show(key)}"), f"metadata {show(key)}")

        infos = []
        for _ in range(n_tensors):
            name = r.string("tensor name")
            n_dims = r.u32(f"dimension count of {show(name)}")
            if not 1 <= n_dims <= 4:
                raise CheckpointError(path, f"tensor {show(name)} has {n_dims} dimensions (1 to 4 allowed)")
            dims = [r.u64(f"dimensions of {show(name)}") for _ in range(n_dims)]
            infos.append((name, dims, r.u32(f"type of {show(name)}"), r.u64(f"offset of {show(name)}")))

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1):
            raise CheckpointError(path, f"general.alignment {show(alignment)} is not a power of two")
        data_offset = -(-r.pos // alignment) * alignment

        tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in infos:
            if name in tensors:
                raise CheckpointError(path, f"duplicate tensor name {show(name)}")
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CheckpointError(path, f"tensor {show(name)} has unknown type {type_id}") from None
            if any(d <= 0 for d in dims):
                raise CheckpointError(path, f"tensor {show(name)} has a zero dimension {dims}")
            if dims[0] % block:
                raise CheckpointError(path, f"tensor {show(name)}: row length {dims[0]} is not a multiple of "
                                            f"{qtype.name}'s block of {block}")
            n_bytes = type_size * (dims[0] // block)
            for d in dims[1:]:
                n_bytes *= d
            if offset % alignment:
                raise CheckpointError(path, f"tensor {show(name)} offset {offset} is not aligned to {alignment}")
            start = data_offset + offset
            if n_bytes > size or start + n_bytes > size:
                raise CheckpointError(path, f"tensor {show(name)} ({n_bytes} bytes at offset {start}) runs past the "
                                            f"end of the file ({size} bytes): truncated or corrupt")
            tensors[name] = TensorInfo(name, tuple(reversed(dims)), type_id, qtype.name, start, n_bytes)
        # Tensor data may not overlap (llama.cpp requires them laid out one after the other).
        spans = sorted((i.offset, i.offset + i.n_bytes, i.name) for i in tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise CheckpointError(path, f"tensors {show(a)} and {show(b)} overlap in the file")
        return Header(version, metadata, tensors, data_offset)
    finally:
        buf.close()


# ------------------------------------------------------------------------------ config
def args_from_metadata(path: str, header: Header, **overrides) -> ModelArgs:
    """ModelArgs from the ``llama.*`` keys, each checked for its type and range, and cross-checked
    against the tensors present (the layer count before anything is sized by it)."""
    md, tensors = header.metadata, header.tensors
    arch = md.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(path, f"general.architecture is {show(arch)}; only 'llama' is supported")

    def integer(key, default=None, high=None):
        if key not in md:
            if default is None:
                raise CheckpointError(path, f"metadata key {key!r} is missing")
            return default
        return need_int(path, f"metadata {key}", md[key], **({"high": high} if high else {}))

    def number(key, default):
        return need_float(path, f"metadata {key}", md.get(key, default))

    if "token_embd.weight" not in tensors:
        raise CheckpointError(path, "missing tensor 'token_embd.weight'")
    n_layers = integer("llama.block_count")
    check_layers(path, "metadata llama.block_count", n_layers, filter(None, map(meta_name, tensors)))
    n_heads = integer("llama.attention.head_count")
    vocab = integer("llama.vocab_size", default=tensors["token_embd.weight"].shape[0])
    fields = dict(
        dim=integer("llama.embedding_length"), n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=integer("llama.attention.head_count_kv", default=n_heads), vocab_size=vocab,
        ffn_hidden_dim=integer("llama.feed_forward_length"),
        norm_eps=number("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=number("llama.rope.freq_base", 10000.0),
        max_seq_len=integer("llama.context_length", default=2048, high=MAX_CONTEXT),
        tie_word_embeddings="output.weight" not in tensors, source=str(path),
    )
    fields.update(overrides)
    try:
        args = ModelArgs(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"invalid llama.* metadata: {e}") from None
    rope_dims = integer("llama.rope.dimension_count", default=args.head_dim)
    if rope_dims != args.head_dim:
        raise CheckpointError(path, f"llama.rope.dimension_count {rope_dims} != head_dim {args.head_dim} "
                                    "(partial rotary embeddings are not Llama)")
    if "llama.rope.scaling.type" in md:
        scaling = need_str(path, "metadata llama.rope.scaling.type", md["llama.rope.scaling.type"])
        if scaling not in ("none", "llama3"):
            raise CheckpointError(path, f"rope scaling type {show(scaling)} is not supported")
    if "rope_freqs.weight" in tensors:
        shape = tensors["rope_freqs.weight"].shape
        if shape != (args.head_dim // 2,):
            raise CheckpointError(path, f"tensor 'rope_freqs.weight' has shape {shape}, expected ({args.head_dim // 2},)")
    return args


_TOKEN_IDS = ("bos", "eos", "eot", "eom", "unknown", "padding")


def check_tokenizer_metadata(path: str, md: dict, n_vocab: int) -> None:
    """The ``tokenizer.ggml.*`` keys, checked for type, length and range against the embedding
    (llama.cpp refuses a vocabulary whose size differs from token_embd's rows, and so do we). What
    they *mean* (duplicates, merges that name no token) is the tokenizer's to check."""
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is None:
        return  # no vocabulary: the tokenizer says so
    if not isinstance(tokens, StringArray):
        raise CheckpointError(path, f"tokenizer.ggml.tokens must be an array of strings, got {show(tokens)}")
    if len(tokens) != n_vocab:
        raise CheckpointError(path, f"tokenizer.ggml.tokens has {len(tokens)} tokens but token_embd has "
                                    f"{n_vocab} rows: the vocabulary and the embedding must match")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        value = md.get(key)
        if key in md and not isinstance(value, StringArray):
            raise CheckpointError(path, f"{key} must be an array of strings, got {show(value)}")
        bad = value.first_invalid_utf8() if key in md else None
        if bad is not None:
            raise CheckpointError(path, f"{key}[{bad}] is not valid UTF-8: {show(value.raw(bad))}")
    for key, kinds in (("tokenizer.ggml.scores", "fiu"), ("tokenizer.ggml.token_type", "iu")):
        value = md.get(key)
        if key in md and not (isinstance(value, NumberArray) and value.numpy().dtype.kind in kinds
                              and len(value) == len(tokens)):
            raise CheckpointError(path, f"{key} must be an array of {len(tokens)} numbers (one per token), "
                                        f"got {show(value)}")
    for name in _TOKEN_IDS:
        key = f"tokenizer.ggml.{name}_token_id"
        if key in md:
            need_int(path, f"metadata {key}", md[key], low=0, high=len(tokens) - 1)
    for key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        if f"tokenizer.ggml.{key}" in md:
            need_bool(path, f"metadata tokenizer.ggml.{key}", md[f"tokenizer.ggml.{key}"])
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if key in md:
            need_str(path, f"metadata {key}", md[key])


# ------------------------------------------------------------------------------ tensors
def _supported_types() -> set[str]:
    import gguf.quants

    return {"F32", "F16"} | {t.name for t in gguf.quants._type_traits}


SUPPORTED_TYPES = _supported_types()  # every type we can read (the last resort: gguf-py's dequantize)


def check_scales(path: str, name: str, kind: str, raw: np.ndarray, shape: tuple[int, ...]) -> None:
    """Refuse NaN/inf in a tensor still in its blocks: the float16 scales and mins are where they
    would be (the integer parts cannot hold one). F16/BF16/F32 are checked whole."""
    if kind in _FLOAT_VIEWS:
        check_finite(path, name, _float_view(raw, kind))
    elif kind in BLOCK_SCALES:
        block, offsets = BLOCK_SCALES[kind]
        halves = torch.from_numpy(raw).view(torch.float16)  # every block size and scale offset is even
        for off in offsets:  # (n_blocks,) float16 scales, a strided view: read in place, nothing gathered
            scales = halves.as_strided((raw.size // block,), (block // 2,), halves.storage_offset() + off // 2)
            check_finite(path, name, scales)
    else:
        check_finite(path, name, _dequantize(path, name, kind, raw, shape))


def _float_view(raw: np.ndarray, kind: str) -> torch.Tensor:
    """An F32/F16/BF16 tensor's bytes as a flat torch tensor of that dtype, sharing the bytes."""
    return torch.from_numpy(raw).view(_FLOAT_VIEWS[kind])


def _dequantize(path: str, name: str, kind: str, raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf-py's dequantization to float32, a few rows at a time into the result (gguf-py makes several
    temporaries of its input's size: unchunked, a 2 GB embedding would briefly cost 8 GB)."""
    import gguf

    out = torch.empty(shape, dtype=torch.float32)
    rows, k = out.view(-1, shape[-1]), shape[-1]
    blocks = raw.reshape(rows.shape[0], -1)
    step = max(1, QUANTIZE_CHUNK // k)
    try:
        for i in range(0, rows.shape[0], step):
            rows[i:i + step] = torch.from_numpy(gguf.quants.dequantize(blocks[i:i + step], gguf.GGMLQuantizationType[kind]))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        raise CheckpointError(path, f"tensor {name!r}: cannot dequantize {kind}: {e}") from None
    return out


def read_tensor(path: str, meta: str, info: TensorInfo, raw: np.ndarray, opts: ReadOptions, dequantized: list):
    """One tensor from its bytes ``raw`` (a view of the map): kept in its blocks when the kernels run
    its kind, else a float view (F32/F16/BF16) or dequantized, then as ``finish_tensor`` decides."""
    matrix = len(info.shape) == 2
    # Blocks the kernels run stay as they are, and so do blocks already in the kind asked for.
    if matrix and (info.kind in opts.keep and not opts.quantize
                   or opts.quantize and info.kind == opts.target_kind(meta, info.shape[1])):
        from ..quantize import QuantTensor

        if opts.check:
            check_scales(path, meta, info.kind, raw, info.shape)
        return QuantTensor.from_gguf(raw, info.kind, info.shape)
    if info.kind in _FLOAT_VIEWS:
        t = _float_view(raw, info.kind)
    else:
        if opts.check and info.kind in BLOCK_SCALES:
            check_scales(path, meta, info.kind, raw, info.shape)
            opts = dataclasses.replace(opts, check=False)  # checked: no second pass over the float copy
        t = _dequantize(path, meta, info.kind, raw, info.shape)
        if matrix and opts.keep and not opts.quantize:
            dequantized.append((meta, info.kind))
    return finish_tensor(path, meta, t.view(info.shape), opts, dequantized)


def index_gguf(path: str, opts: ReadOptions = ReadOptions()) -> tuple[Header, ModelArgs, dict[str, TensorInfo]]:
    """(the checked header, args, Meta name -> tensor info) with no tensor data read: every tensor a
    Llama one of a kind ``opts`` can read, shapes and tokenizer metadata checked against the args."""
    header = check_header(path)
    infos = {}
    for name, info in header.tensors.items():
        if name == "rope_freqs.weight":
            continue
        meta = meta_name(name)
        if meta is None:
            raise CheckpointError(path, f"unexpected tensor {show(name)} for a Llama model")
        if info.kind not in SUPPORTED_TYPES and info.kind not in opts.keep:
            raise CheckpointError(path, f"tensor {name!r} has type {info.kind}, which cannot be read "
                                        f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
        infos[meta] = info
    args = args_from_metadata(path, header)
    check_shapes(path, args, {m: i.shape for m, i in infos.items()})
    check_tokenizer_metadata(path, header.metadata, args.vocab_size)
    return header, args, infos


def load_gguf(path: str, opts: ReadOptions = ReadOptions(), progress=None) -> Checkpoint:
    """A ``Checkpoint`` of a GGUF file: its args, Meta-named tensors (read as ``opts`` says), the header's
    metadata, the tensors dequantized as a last resort and those read in place."""
    header, args, infos = index_gguf(path, opts)

    fm = FileMap(path)
    state, dequantized, in_place = {}, [], set()
    for meta, info in infos.items():
        fm.populate(info.offset, info.n_bytes)
        raw = fm.bytes[info.offset:info.offset + info.n_bytes]
        value = state[meta] = read_tensor(path, meta, info, raw, opts, dequantized)
        if fm.holds(value, info.offset, info.n_bytes):
            in_place.add(meta)
        else:  # converted: its file pages leave the resident set
            fm.release(info.offset, info.n_bytes)
        if progress is not None:
            progress(info.n_bytes)
    if "rope_freqs.weight" in header.tensors:
        info = header.tensors["rope_freqs.weight"]
        if info.kind != "F32":
            raise CheckpointError(path, f"tensor 'rope_freqs.weight' has type {info.kind}, expected F32")
        divisors = _float_view(fm.bytes[info.offset:info.offset + info.n_bytes], "F32")
        if not (torch.isfinite(divisors).all() and (divisors > 0).all()):
            raise CheckpointError(path, "tensor 'rope_freqs.weight' has non-positive or non-finite values")
        args = args.replace(rope_freq_divisors=tuple(float(x) for x in divisors))
    return Checkpoint(path, "gguf", args, state, header.metadata, dequantized, frozenset(in_place))


def random_blocks(kind: str, rows: int, k: int, rng: np.random.Generator, std: float = 0.02) -> np.ndarray:
    """A (rows, k) tensor in GGML ``kind``, as the (rows, row_bytes) uint8 array a GGUF stores: random
    bits with sane float16 scales (so that values are finite and about ``std``), for tests and
    benchmarks, where speed does not depend on the values. Float kinds hold N(0, std^2) values."""
    import gguf

    if kind in _FLOAT_VIEWS:
        values = torch.from_numpy(rng.standard_normal((rows, k), dtype=np.float32) * std).to(_FLOAT_VIEWS[kind])
        return values.view(torch.uint8).numpy().reshape(rows, -1)
    if kind not in BLOCK_SCALES:
        raise ValueError(f"random_blocks knows the float and block kinds {sorted(BLOCK_SCALES)}, not {kind!r}")
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    if k % block_elems:
        raise ValueError(f"rows of {k} are not a multiple of {kind}'s block of {block_elems}")
    n = rows * k // block_elems
    blocks = np.frombuffer(rng.bytes(n * block_bytes), dtype=np.uint8).reshape(n, block_bytes).copy()
    # Scales of ~std / 16: integer parts of up to 4-6 bits (times a 6-bit sub-scale in K-quants) then give
    # values of the order of std.
    for off in BLOCK_SCALES[kind][1]:
        scales = (rng.uniform(0.5, 1.5, n) * std / 16).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)
