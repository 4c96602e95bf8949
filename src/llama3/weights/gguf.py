"""GGUF files (llama.cpp's format), read with the ``gguf`` package.

GGUF's q/k are already in Meta's RoPE layout: llama.cpp's converter undoes the HF
permutation. Llama 3.1 files carry their RoPE scaling only as a ``rope_freqs`` tensor
(one divisor per frequency band), which we use as it is.

Before ``gguf.GGUFReader`` sees a file, ``check_header`` walks the header with explicit
bounds: every count, string and array length, tensor dimension, offset and size is checked
against the file's real size, so a hostile file is refused before anything is allocated
(cf. llama.cpp's 2024-2026 GGUF parser fixes).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelArgs
from .common import CheckpointError, check_state_dict

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (name, fixed size in bytes or None for string/array).
_SCALARS = {0: ("uint8", 1, "<B"), 1: ("int8", 1, "<b"), 2: ("uint16", 2, "<H"), 3: ("int16", 2, "<h"),
            4: ("uint32", 4, "<I"), 5: ("int32", 4, "<i"), 6: ("float32", 4, "<f"), 7: ("bool", 1, "<?"),
            10: ("uint64", 8, "<Q"), 11: ("int64", 8, "<q"), 12: ("float64", 8, "<d")}
_STRING, _ARRAY = 8, 9

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


def meta_name(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        target = GGUF_TO_META.get(".".join(["blk", "{i}"] + parts[2:]))
        return target.format(i=int(parts[1])) if target else None
    return GGUF_TO_META.get(name)


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order: (out, in)
    type_id: int
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


def check_header(path: str) -> Header:
    """Parse and bounds-check a GGUF header without trusting any number in it."""
    import gguf

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 24:
            raise CheckpointError(path, f"file is truncated: {size} bytes is too short for a GGUF header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        pos = 0

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise CheckpointError(path, f"{what} runs past the end of the file (truncated or corrupt header)")
            out = buf[pos:pos + n]
            pos += n
            return out

        def scalar(fmt: str, what: str):
            return struct.unpack(fmt, take(struct.calcsize(fmt), what))[0]

        def string(what: str) -> str:
            n = scalar("<Q", what + " length")
            if n > size - pos:
                raise CheckpointError(path, f"{what} length {n} is larger than the rest of the file ({size - pos} bytes)")
            raw = take(n, what)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("utf-8", errors="replace")

        def value(type_id: int, what: str, depth: int = 0):
            if type_id in _SCALARS:
                return scalar(_SCALARS[type_id][2], what)
            if type_id == _STRING:
                return string(what)
            if type_id == _ARRAY:
                if depth > 2:
                    raise CheckpointError(path, f"{what}: arrays nested too deeply")
                elem = scalar("<I", what + " element type")
                count = scalar("<Q", what + " length")
                min_size = _SCALARS[elem][1] if elem in _SCALARS else 8 if elem in (_STRING, _ARRAY) else None
                if min_size is None:
                    raise CheckpointError(path, f"{what}: unknown array element type {elem}")
                if count * min_size > size - pos:
                    raise CheckpointError(path, f"{what}: array length {count} is larger than the file could hold")
                if elem in _SCALARS:
                    fmt = _SCALARS[elem][2]
                    raw = take(count * _SCALARS[elem][1], what)
                    return list(np.frombuffer(raw, dtype=np.dtype(fmt)).tolist())
                return [value(elem, what, depth + 1) for _ in range(count)]
            raise CheckpointError(path, f"{what}: unknown value type {type_id}")

        if take(4, "magic") != GGUF_MAGIC:
            raise CheckpointError(path, "not a GGUF file (wrong magic; expected b'GGUF')")
        version = scalar("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0:
                raise CheckpointError(path, "big-endian GGUF files are not supported")
            raise CheckpointError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = scalar("<Q", "tensor count")
        n_kv = scalar("<Q", "metadata count")
        # Each metadata entry takes at least 13 bytes, each tensor info at least 28.
        if n_kv * 13 > size - pos:
            raise CheckpointError(path, f"metadata count {n_kv} is larger than the file could hold")
        if n_tensors * 28 > size - pos:
            raise CheckpointError(path, f"tensor count {n_tensors} is larger than the file could hold")

        metadata = {}
        for _ in range(n_kv):
            key = string("metadata key")
            type_id = scalar("<I", f"type of {key!r}")
            metadata[key] = value(type_id, f"metadata {key!r}")

        infos = []
        for _ in range(n_tensors):
            name = string("tensor name")
            n_dims = scalar("<I", f"dimension count of {name!r}")
            if not 1 <= n_dims <= 4:
                raise CheckpointError(path, f"tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
            dims = [scalar("<Q", f"dimensions of {name!r}") for _ in range(n_dims)]
            type_id = scalar("<I", f"type of {name!r}")
            offset = scalar("<Q", f"offset of {name!r}")
            infos.append((name, dims, type_id, offset))

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(path, f"general.alignment {alignment!r} is not a power of two")
        data_offset = -(-pos // alignment) * alignment

        tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in infos:
            if name in tensors:
                raise CheckpointError(path, f"duplicate tensor name {name!r}")
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CheckpointError(path, f"tensor {name!r} has unknown type {type_id}") from None
            if any(d <= 0 for d in dims):
                raise CheckpointError(path, f"tensor {name!r} has a zero or negative dimension {dims}")
            if dims[0] % block:
                raise CheckpointError(path, f"tensor {name!r}: row length {dims[0]} is not a multiple of "
                                            f"{qtype.name}'s block of {block}")
            n_elements = 1
            for d in dims:
                n_elements *= d
            n_bytes = n_elements // block * type_size
            if offset % alignment:
                raise CheckpointError(path, f"tensor {name!r} offset {offset} is not aligned to {alignment}")
            start = data_offset + offset
            if n_bytes > size or start + n_bytes > size:
                raise CheckpointError(path, f"tensor {name!r} ({n_bytes} bytes at offset {start}) runs past the "
                                            f"end of the file ({size} bytes): truncated or corrupt")
            tensors[name] = TensorInfo(name, tuple(reversed(dims)), type_id, start, n_bytes)
        return Header(version, metadata, tensors, data_offset)
    finally:
        buf.close()


def args_from_metadata(path: str, header: Header, **overrides) -> ModelArgs:
    """ModelArgs from the ``llama.*`` keys, cross-checked against the tensors."""
    md, tensors = header.metadata, header.tensors
    arch = md.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(path, f"general.architecture is {arch!r}; only 'llama' is supported")

    def need(key):
        if key not in md:
            raise CheckpointError(path, f"metadata key {key!r} is missing")
        value = md[key]
        if isinstance(value, list) or isinstance(value, str):
            raise CheckpointError(path, f"metadata key {key!r} must be a number, got {type(value).__name__}")
        return value

    if "token_embd.weight" not in tensors:
        raise CheckpointError(path, "missing tensor 'token_embd.weight'")
    vocab = md.get("llama.vocab_size")
    if vocab is None:
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, list) else tensors["token_embd.weight"].shape[0]
    dim, n_heads = int(need("llama.embedding_length")), int(need("llama.attention.head_count"))
    fields = dict(
        dim=dim, n_layers=int(need("llama.block_count")), n_heads=n_heads,
        n_kv_heads=int(md.get("llama.attention.head_count_kv", n_heads)), vocab_size=int(vocab),
        ffn_hidden_dim=int(need("llama.feed_forward_length")),
        norm_eps=float(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(md.get("llama.rope.freq_base", 10000.0)),
        max_seq_len=int(md.get("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors, source=str(path),
    )
    fields.update(overrides)
    try:
        args = ModelArgs(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"invalid llama.* metadata: {e}") from None
    rope_dims = md.get("llama.rope.dimension_count", args.head_dim)
    if rope_dims != args.head_dim:
        raise CheckpointError(path, f"llama.rope.dimension_count {rope_dims} != head_dim {args.head_dim} "
                                    "(partial rotary embeddings are not Llama)")
    if "llama.rope.scaling.type" in md and md["llama.rope.scaling.type"] not in ("none", "llama3"):
        raise CheckpointError(path, f"rope scaling type {md['llama.rope.scaling.type']!r} is not supported")
    if "rope_freqs.weight" in tensors:
        shape = tensors["rope_freqs.weight"].shape
        if shape != (args.head_dim // 2,):
            raise CheckpointError(path, f"tensor 'rope_freqs.weight' has shape {shape}, expected ({args.head_dim // 2},)")
    return args


def read_tensor(path: str, data: np.ndarray, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize one tensor into a torch tensor of ``dtype`` shaped (out, in)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(info.type_id)
    raw = data[info.offset:info.offset + info.n_bytes]
    if qtype == gguf.GGMLQuantizationType.F32:
        array = raw.view(np.float32)
    elif qtype == gguf.GGMLQuantizationType.F16:
        array = raw.view(np.float16)
    else:
        if qtype.name not in SUPPORTED_TYPES:
            raise CheckpointError(path, f"tensor {info.name!r} has type {qtype.name}, which cannot be dequantized "
                                        f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
        try:
            array = gguf.quants.dequantize(raw, qtype)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
            raise CheckpointError(path, f"tensor {info.name!r}: cannot dequantize {qtype.name}: {e}") from None
    # An F32 tensor loaded as float32 stays a view of the (copy-on-write) mapping: no copy at all.
    return torch.from_numpy(array.reshape(info.shape)).to(dtype)


def _drop_pages(mm: mmap.mmap, offset: int, length: int) -> None:
    """Tell the kernel we are done with these file pages (they leave our resident set)."""
    page = mmap.PAGESIZE
    start = (offset + page - 1) // page * page  # only whole pages inside the range
    end = (offset + length) // page * page
    if end > start and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _supported_types() -> set[str]:
    import gguf.quants

    return {"F32", "F16"} | {t.name for t in gguf.quants._type_traits}


SUPPORTED_TYPES = _supported_types()


def load_gguf(path: str, dtype: torch.dtype = torch.float32, progress=None,
              keep_quantized: bool = False) -> tuple[ModelArgs, dict, Header]:
    """Args, a Meta-named state dict (dequantized to ``dtype``) and the parsed header.

    With ``keep_quantized``, Q8_0/Q4_0/Q4_1 matrices stay in their blocks (as ``QuantTensor``)."""
    from ..quantize import GGUF_KINDS, QuantTensor

    header = check_header(path)
    args = args_from_metadata(path, header)
    for info in header.tensors.values():
        name = _type_name(info.type_id)
        if name not in SUPPORTED_TYPES:
            raise CheckpointError(path, f"tensor {info.name!r} has type {name}, which cannot be dequantized "
                                        f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    shapes = {}
    for name, info in header.tensors.items():
        if name == "rope_freqs.weight":
            continue
        meta = meta_name(name)
        if meta is None:
            raise CheckpointError(path, f"unexpected tensor {name!r} for a Llama model")
        shapes[meta] = info
    check_state_dict(path, args, {m: torch.empty(i.shape, device="meta") for m, i in shapes.items()})

    # A private (copy-on-write) mapping: tensors that need no conversion stay views of the file, and
    # the file pages behind converted ones are dropped as we go, so peak memory stays near the model.
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = np.frombuffer(mm, dtype=np.uint8)
    state = {}
    for meta, info in shapes.items():
        type_name = _type_name(info.type_id)
        if keep_quantized and type_name in GGUF_KINDS and len(info.shape) == 2:
            state[meta] = QuantTensor.from_gguf(data[info.offset:info.offset + info.n_bytes], type_name, info.shape)
        else:
            state[meta] = read_tensor(path, data, info, dtype)
        if not (type_name == "F32" and dtype == torch.float32):
            _drop_pages(mm, info.offset, info.n_bytes)
        if progress is not None:
            progress(info.n_bytes)
    if "rope_freqs.weight" in header.tensors:
        divisors = read_tensor(path, data, header.tensors["rope_freqs.weight"], torch.float32)
        if not (torch.isfinite(divisors).all() and (divisors > 0).all()):
            raise CheckpointError(path, "tensor 'rope_freqs.weight' has non-positive or non-finite values")
        args = args.replace(rope_freq_divisors=tuple(float(x) for x in divisors))
    return args, state, header
