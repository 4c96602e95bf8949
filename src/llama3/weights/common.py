"""What every checkpoint reader shares: the error type, checks of stated values and shapes, and the
per-tensor step that turns a tensor read from a file into what the model holds.

The order every reader follows: parse the file's own structure with every count, length and
offset checked against the file's size; check each config value's type and range; check the
stated layer count against the layers actually present *before* expanding it into expected
shapes; check every shape; only then touch tensor data, one tensor at a time.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from ..config import ModelArgs

# Sanity bounds for what a config may state. Nothing is allocated from these numbers; they only
# turn absurd values into a clear error before any arithmetic is done with them.
MAX_CONTEXT = 1 << 24  # 16.7M positions: past every published model (Llama 3.1: 131072)
MAX_DIMENSION = 1 << 24  # any single size: hidden size, FFN size, vocabulary, head count
MAX_CONFIG_BYTES = 16 << 20  # config.json / params.json / a safetensors index


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def show(value) -> str:
    """A value as it goes into an error message: its repr, cut short (a hostile file may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------------ stated values
def need_int(path, field: str, value, low: int = 1, high: int = MAX_DIMENSION) -> int:
    """``value`` if it is an integer (not a bool, not a float) in [low, high], else CheckpointError."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(path, f"{field} must be an integer, got {show(value)}")
    if not low <= value <= high:
        raise CheckpointError(path, f"{field} is {value}, outside the sane range [{low}, {high}]")
    return value


def need_float(path, field: str, value, positive: bool = True) -> float:
    """``value`` as a float if it is a finite number (int or float, not bool; > 0 if ``positive``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise CheckpointError(path, f"{field} must be a finite number, got {show(value)}")
    if positive and not value > 0:
        raise CheckpointError(path, f"{field} must be positive, got {show(value)}")
    return float(value)


def need_bool(path, field: str, value) -> bool:
    """``value`` if it is a JSON/GGUF boolean. The string "false" is not one (it would read as true)."""
    if not isinstance(value, bool):
        raise CheckpointError(path, f"{field} must be true or false, got {show(value)}")
    return value


def need_str(path, field: str, value) -> str:
    if not isinstance(value, str):
        raise CheckpointError(path, f"{field} must be a string, got {show(value)}")
    return value


def read_json_object(path) -> dict:
    """A small JSON file that must hold an object: size-bounded, duplicate keys refused, typed errors."""
    import json

    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(path, f"is {size} bytes; a config is at most {MAX_CONFIG_BYTES}")
        with open(path, "rb") as f:
            value = json.loads(f.read(), object_pairs_hook=lambda pairs: _no_duplicates(path, pairs))
    except (OSError, ValueError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(path, f"cannot read JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, f"must hold a JSON object, not {type(value).__name__}")
    return value


def _no_duplicates(path, pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise CheckpointError(path, f"key {show(dup)} appears twice")
    return out


# ------------------------------------------------------------------------------------ shapes
def check_layers(path, field: str, stated: int, names: Iterable[str]) -> None:
    """The stated layer count must equal the layers present (``layers.N.*`` Meta names), checked
    before anything is sized by it: a 370 KB file may claim 2^40 layers."""
    present = set()
    for name in names:
        parts = name.split(".", 2)
        if parts[0] == "layers" and len(parts) == 3 and parts[1].isdigit():
            present.add(int(parts[1]))
    # Equal counts and every number below `stated` means exactly layers 0..stated-1.
    if len(present) != stated or any(i >= stated for i in present):
        numbered = f", numbered {min(present)} to {max(present)}" if present else ""
        raise CheckpointError(path, f"{field} is {stated} but the file holds tensors for {len(present)} "
                                    f"layer(s){numbered}")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Meta-named state dict and its shape (output omitted when tied)."""
    d, hd, hidden = args.dim, args.head_dim, args.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    if not args.tie_word_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (hidden, d),
            p + "feed_forward.w2.weight": (d, hidden),
            p + "feed_forward.w3.weight": (hidden, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    return shapes


def check_shapes(path, args: ModelArgs, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a set of Meta-named shapes with a missing, unexpected or misshapen tensor."""
    check_layers(path, "the layer count", args.n_layers, shapes)
    expected = expected_shapes(args)
    extra = set(shapes) - set(expected)
    if args.tie_word_embeddings:
        extra.discard("output.weight")  # some tied checkpoints still carry a copy
    if extra:
        raise CheckpointError(path, f"unexpected tensor(s) {sorted(extra)[:5]} for this configuration")
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise CheckpointError(path, f"missing tensor(s) {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(path, f"tensor {name} has shape {tuple(shapes[name])}, "
                                        f"expected {shape} for this configuration")


def check_state_dict(path, args: ModelArgs, state: Mapping) -> None:
    """Refuse a state dict (tensors or QuantTensors) with a missing, unexpected or misshapen tensor."""
    check_shapes(path, args, {name: tuple(t.shape) for name, t in state.items()})


# ------------------------------------------------------------------------------------ tensor data
@dataclass(frozen=True)
class ReadOptions:
    """How a reader turns each tensor of a file into what the model holds.

    ``keep``: GGML kinds (``llama3.kernels.SUPPORTED_KINDS``) kept as they are in the file, as
    ``QuantTensor`` views of its memory map (blocks, or F16/BF16 matrices); empty = widen everything.
    ``quantize``: a ``--quantize`` scheme (llama3.quantize.SCHEMES) every matrix is quantized to while
    reading, one tensor at a time, each in ``target_kind``.
    ``dtype``: what every other tensor becomes (norms; matrices on the float path).
    ``check``: refuse NaN/inf weights (for block kinds: in their scales).
    """

    dtype: torch.dtype = torch.float32
    keep: frozenset[str] = frozenset()
    quantize: str | None = None
    check: bool = True

    def target_kind(self, name: str, k: int) -> str:
        """The kind the scheme gives matrix ``name`` (Meta-named) with rows of ``k``."""
        from ..quantize import kind_for

        return kind_for(self.quantize, name, k)


FLOAT_KINDS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


# float dtype -> (the integer type of its bits, its exponent bits). NaN and inf are exactly the values
# whose exponent bits are all ones.
_EXPONENT_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float16: (torch.int16, 0x7C00),
                  torch.bfloat16: (torch.int16, 0x7F80)}


def check_finite(path, name: str, t: torch.Tensor) -> None:
    """Refuse a float tensor (or a strided view of scales) holding NaN or inf: one pass over its
    exponent bits, a million values at a time, in numpy. That is ~10 GB/s on one core, and one core
    is what a busy machine gives: a multi-threaded torch reduction per tensor waited at its barrier
    for seconds there."""
    itype, mask = _EXPONENT_BITS[t.dtype]
    bits = t.reshape(-1).view(itype).numpy()
    for start in range(0, len(bits), 1 << 20):
        if np.bitwise_and(bits[start:start + (1 << 20)], mask).max(initial=0) == mask:
            raise CheckpointError(path, f"tensor {name} holds NaN or infinite values "
                                        "(a corrupt or diverged checkpoint; --no-check to load it anyway)")


_LIBC = None
QUANTIZE_CHUNK = 1 << 20  # values widened at a time: 4 MB of float32, and a few such temporaries


def quantize_matrix(w: torch.Tensor, kind: str):
    """One matrix quantized to ``kind``, a few rows at a time: only a 4 MB slice is ever widened to
    float32 (quantizing makes several temporaries of its input's size), and each row's blocks depend
    on that row alone, so the chunks' rows, stacked, are the whole matrix's."""
    from ..quantize import QuantTensor

    rows_per_chunk = max(1, QUANTIZE_CHUNK // w.shape[1])
    parts = [QuantTensor.quantize(chunk.float(), kind) for chunk in w.split(rows_per_chunk)]
    if len(parts) == 1:
        return parts[0]
    out = QuantTensor(kind, torch.cat([p.data for p in parts]), w.shape[0], w.shape[1])
    del parts
    trim_heap()
    return out


def _libc():
    """The C library (Linux), for madvise and malloc_trim."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim). The temporaries of
    quantizing one matrix after another leave holes between the results that glibc would otherwise
    keep: up to ~100 MB more peak RSS on a 200 MB model."""
    if sys.platform.startswith("linux") and hasattr(_libc(), "malloc_trim"):
        _libc().malloc_trim(0)


def finish_tensor(path, name: str, t: torch.Tensor, opts: ReadOptions, dequantized: list):
    """A float tensor read from a file (usually a view of its mapping) -> what the model holds:
    quantized, kept in its 16-bit kind as a ``QuantTensor``, or converted to ``opts.dtype`` (no copy
    when it already is). A 16-bit matrix that could not be kept is listed in ``dequantized``."""
    kind = FLOAT_KINDS.get(t.dtype)
    if kind is None:
        raise CheckpointError(path, f"tensor {name} has dtype {t.dtype}; weights must be float32, float16 or bfloat16")
    if opts.check:
        check_finite(path, name, t)
    if t.dim() == 2 and opts.quantize:
        return quantize_matrix(t, opts.target_kind(name, t.shape[1]))
    if t.dim() == 2 and kind in opts.keep:
        from ..quantize import QuantTensor

        return QuantTensor.from_tensor(t)
    if t.dim() == 2 and opts.keep and kind != "F32":
        dequantized.append((name, kind))
    return t.to(opts.dtype)


def tensors_of(value) -> list[torch.Tensor]:
    """The torch tensors holding a state-dict value's data (a tensor, or a QuantTensor's fields)."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [v for v in vars(value).values() if isinstance(v, torch.Tensor)]


def shares_memory(value, start: int, length: int) -> bool:
    """Whether a state-dict value's data lies in the address range [start, start + length)."""
    return any(start <= t.data_ptr() < start + length for t in tensors_of(value) if t.numel())



def _madvise(start: int, end: int, advice: int) -> None:
    if end > start and sys.platform.startswith("linux"):
        _libc().madvise(start, end - start, advice)  # advice only: a kernel without it changes nothing


def release_pages(address: int, length: int) -> None:
    """Drop the whole pages of a *file-backed* mapping inside [address, address + length) from this
    process's resident set (madvise MADV_DONTNEED). Never call it on anonymous memory: there it
    would zero the pages. Unchanged file pages come back from the page cache if touched again."""
    page = mmap.PAGESIZE
    _madvise(-(-address // page) * page, (address + length) // page * page, mmap.MADV_DONTNEED)


MADV_POPULATE_READ = 22  # Linux 5.14+


def populate_pages(address: int, length: int, mapping_end: int) -> None:
    """Map the pages of [address, address + length) of a file mapping in one call (MADV_POPULATE_READ)
    rather than one page fault at a time: ~20x faster for a file in the page cache (0.05 s instead of
    1.1 s for a 0.7 GB model here), and the first forward pass finds them mapped too."""
    page = mmap.PAGESIZE
    _madvise(address // page * page, min(-(-(address + length) // page) * page, mapping_end), MADV_POPULATE_READ)


def file_ranges(path) -> list[tuple[int, int]]:
    """The address ranges at which this process has ``path`` memory-mapped (from /proc/self/maps):
    pages may be released only inside these (elsewhere MADV_DONTNEED would zero memory)."""
    try:
        st = os.stat(path)
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    ranges = []
    for line in lines:  # "start-end perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] == str(st.st_ino) and os.path.realpath(fields[5].strip()) == \
                os.path.realpath(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


class FileMap:
    """A private (copy-on-write) memory map of a whole file: tensors that need no conversion stay views
    of it, and the pages behind converted ones are released as the reader goes."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8)  # the views hold this (and the map) alive
        self.address, self.size = self.bytes.ctypes.data, len(self.bytes)

    def holds(self, value, offset: int, length: int) -> bool:
        """Whether a state-dict value is a view of the file's bytes [offset, offset + length)."""
        return shares_memory(value, self.address + offset, length)

    def populate(self, offset: int, length: int) -> None:
        """Map the file's bytes [offset, offset + length) in before they are read (see populate_pages)."""
        populate_pages(self.address + offset, length, self.address + self.size)

    def release(self, offset: int, length: int) -> None:
        """Drop the pages of [offset, offset + length) from the resident set (once nothing views them)."""
        release_pages(self.address + offset, length)


@dataclass
class Checkpoint:
    """What a reader returns: the config, Meta-named tensors, and what the loader needs to know
    about how they were read."""

    path: Path
    format: str  # "gguf" | "hf" | "meta"
    args: ModelArgs
    state: dict  # Meta name -> torch.Tensor or QuantTensor
    gguf_metadata: dict = field(default_factory=dict)  # GGUF only: tokenizer and chat template live here
    # (Meta name, kind) of each matrix that could not stay in its file's kind and was widened to float
    dequantized: list[tuple[str, str]] = field(default_factory=list)
    in_place: frozenset[str] = frozenset()  # tensors that are views of the file's memory map
