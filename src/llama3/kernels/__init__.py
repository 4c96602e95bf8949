"""CPU kernels for GGUF's block formats, paged decode attention and the one-call decode step (used by
llama3.quantize and llama3.engine.cdecoder): a small C library built with the system's C compiler on first use and called through
ctypes, and a pure-PyTorch fallback that computes the same numbers.

Every kind in ``SUPPORTED_KINDS`` runs from the file's own bytes (a ``QuantTensor``'s ``data``, rows of
blocks as GGUF stores them): matrix products against activations quantized the way llama.cpp pairs each
format (int8 blocks of 32 for the legacy kinds and IQ4_NL, Q8_K blocks of 256 for the K-quants and
IQ4_XS, float32 for F32/F16/BF16), and dequantization exactly equal to gguf-py's.

One library per instruction set, built from the same sources: ``avx2`` (AVX2 + FMA + F16C) and ``avx512``
(AVX-512 F/BW/VL/VNNI). The best one this CPU runs is used unless ``LLAMA3_ISA=avx2|avx512`` names one;
``isa()`` says which. ``LLAMA3_NO_KERNELS=1`` disables the C library (the fallback is then used everywhere).

The fallback quantizes the activations exactly as the C code does and multiplies the dequantized
operands in float64, rounding once: the exact product of the quantized operands, which the C kernels
reach up to their float32 summation order (tests/test_kernels.py states the bound).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Protocol, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# ------------------------------------------------------------------------------------------- the kinds
SUPPORTED_KINDS = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K", "IQ4_NL", "IQ4_XS")
KIND_ID = {kind: int(GGMLQuantizationType[kind]) for kind in SUPPORTED_KINDS}  # GGML's type ids, as in the C enum
BLOCK = {kind: GGML_QUANT_SIZES[GGMLQuantizationType[kind]] for kind in SUPPORTED_KINDS}  # (elements, bytes)
FLOAT_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

ACT_Q8, ACT_Q8K = 1, 2  # the activation forms (qgemv.h): int8 blocks of 32, Q8_K blocks of 256
ACT_NEEDS = {kind: ACT_Q8 if BLOCK[kind][0] == 32 else ACT_Q8K if BLOCK[kind][0] == 256 else 0
             for kind in SUPPORTED_KINDS}

IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # IQ4_NL / IQ4_XS


class Blocks(Protocol):
    """What the kernels read of a weight (llama3.quantize.QuantTensor): rows of GGUF blocks."""
    kind: str
    data: torch.Tensor  # uint8 (rows, row_bytes)
    rows: int
    k: int


# ------------------------------------------------------------------------------ ctypes mirrors of the C structs
_p, _i64, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


class QMat(ctypes.Structure):
    _fields_ = [("kind", _i64), ("data", _p), ("rows", _i64), ("k", _i64), ("row_bytes", _i64)]


class Acts(ctypes.Structure):
    _fields_ = [("f", _p), ("q8", _p), ("d8", _p), ("s8", _p), ("qk", _p), ("dk", _p), ("bk", _p), ("k", _i64)]


class Layer(ctypes.Structure):  # decode.c's layer_w
    _fields_ = [("attn_norm", _p), ("ffn_norm", _p), ("qkv", QMat * 3), ("n_qkv", _i64),
                ("w13", QMat * 2), ("n_w13", _i64), ("wo", QMat), ("w2", QMat)]


class Model(ctypes.Structure):  # decode.c's model_w
    _fields_ = [("dim", _i64), ("n_layers", _i64), ("n_heads", _i64), ("n_kv_heads", _i64), ("head_dim", _i64),
                ("hidden", _i64), ("vocab", _i64), ("eps", _f64), ("attn_scale", _f64), ("rope_freqs", _p),
                ("embed", QMat), ("norm", _p), ("output", QMat), ("layers", ctypes.POINTER(Layer))]


class Cache(ctypes.Structure):  # attention.h's kv_cache: the paged pool of llama3.engine.PagedKVCache
    _fields_ = [("pool", _p), ("dtype", _i64), ("block_size", _i64), ("n_layers", _i64)]


_MIRRORS = {"qmat": QMat, "acts": Acts, "layer_w": Layer, "model_w": Model, "kv_cache": Cache}
KV_IDS = {"KV_F32": 0, "KV_F16": 1, "KV_BF16": 2}  # attention.h's cache dtypes (checked against the C enum)
KV_DTYPES = {torch.float32: KV_IDS["KV_F32"], torch.float16: KV_IDS["KV_F16"], torch.bfloat16: KV_IDS["KV_BF16"]}


def qmat(qt: Blocks) -> QMat:
    """The C view of a weight (no copy: it points into ``qt.data``, which must outlive it)."""
    return QMat(KIND_ID[qt.kind], qt.data.data_ptr(), qt.rows, qt.k, qt.data.shape[1])


# ------------------------------------------------------------------------------------------- building
_SOURCES = [Path(__file__).with_name(n) for n in ("qgemv.h", "attention.h", "quants.c", "qgemv.c", "attention.c",
                                                   "decode.c")]
_BASE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared",
               "-ffp-contract=off"]  # a*b + c stays two roundings unless the code asks for an FMA
ISAS = {  # name: (compiler flags, /proc/cpuinfo flags it needs), best last
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "avx512": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
               {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
}

_libs: dict[str, object] = {}  # loaded libraries by ISA
_errors: dict[str, str] = {}  # why an ISA's library is unavailable
_lib = None  # the library in use (None: the fallback)
_isa: str | None = None
_tried = False
_why_not = ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags, as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # hardware bfloat16 dot products (Intel AMX; Zen 4+, Cooper Lake+)


def bf16_hardware() -> str | None:
    """The CPU's hardware bfloat16 feature ("amx_bf16" or "avx512_bf16"), or None. oneDNN runs PyTorch's
    bfloat16 matmuls on it (measured here on avx512_bf16: 913 GFLOP/s against 171 in float32); without
    it, bfloat16 matmuls are emulated and far slower than float32."""
    flags = cpu_flags()
    return next((f for f in BF16_FLAGS if f in flags), None)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama3" / "kernels"


def runnable_isas() -> list[str]:
    """The ISAs this CPU can run, best last."""
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        return []
    flags = cpu_flags()
    return [name for name, (_, needs) in ISAS.items() if needs <= flags]


def build(isa: str = "avx2", verbose: bool = False) -> Path | None:
    """Compile the kernels for ``isa`` (once per source version) and return the library's path, or None
    (then ``_errors[isa]`` says why)."""
    if isa not in runnable_isas():
        missing = ISAS[isa][1] - cpu_flags() if isa in ISAS else set()
        _errors[isa] = (f"unknown ISA {isa!r} (expected one of {', '.join(ISAS)})" if isa not in ISAS else
                        "the C kernels are for x86-64 Linux" if sys.platform != "linux" else
                        f"this CPU lacks {', '.join(sorted(missing))}")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _errors[isa] = "no C compiler found"
        return None
    flags = _BASE_FLAGS + ISAS[isa][0]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES) + " ".join(flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"qgemv-{isa}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, *flags, *(str(p) for p in _SOURCES if p.suffix == ".c"), "-o", str(out), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            _errors[isa] = f"the C compiler failed: {proc.stderr.strip()[:500]}"
            return None
        os.replace(out, target)  # atomic: concurrent builders never see a half-written file
    if verbose:
        print(f"built {target}", file=sys.stderr)
    return target


def _check_abi(lib, isa: str) -> str | None:
    """Why the library does not match this module (kind ids, block sizes, struct layouts), or None."""
    if lib.isa_name().decode() != isa:
        return f"the library was built for {lib.isa_name().decode()}, not {isa}"
    table = {}
    for line in lib.kinds_table().decode().splitlines():
        name, *numbers = line.split()
        table[name] = tuple(int(v) for v in numbers)
    for kind in SUPPORTED_KINDS:
        expected = (KIND_ID[kind], *BLOCK[kind])
        if table.get(kind) != expected:
            return f"kind {kind}: C has (id, block elements, block bytes) {table.get(kind)}, gguf-py {expected}"
    c_layout = dict(line.rsplit(" ", 1) for line in lib.struct_layout().decode().splitlines())
    py_layout = dict(KV_IDS)
    for cname, mirror in _MIRRORS.items():
        py_layout[cname] = ctypes.sizeof(mirror)
        for field, _ in mirror._fields_:
            py_layout[f"{cname}.{field}"] = getattr(mirror, field).offset
    for name in sorted(set(c_layout) | set(py_layout)):
        c, py = c_layout.get(name), py_layout.get(name)
        if c is None or py is None or int(c) != py:
            return f"struct layout differs at {name}: C {c}, ctypes {py}"
    return None


def _load(isa: str):
    """The library for ``isa`` (built and checked), or None with the reason in ``_errors[isa]``."""
    if isa in _libs or isa in _errors:
        return _libs.get(isa)
    path = build(isa)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _errors[isa] = f"cannot load {path}: {e}"
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for f in (lib.kinds_table, lib.struct_layout, lib.isa_name):
        f.argtypes, f.restype = [], ctypes.c_char_p
    lib.qmatmul.argtypes = [p, i64, p, i64, p, i64]
    lib.dequant_rows.argtypes = [p, p, i64, p, i64, i64]
    lib.quantize_acts_row.argtypes = [p, i64, i64, i64, ctypes.c_int]
    lib.decode_step.argtypes = [p, p, i64, p, p, p, i64, p, i64]
    lib.paged_attention.argtypes = [p, i64, p, i64, i64, i64, i64, p, i64, p, ctypes.c_float, p, i64]
    for f in (lib.qmatmul, lib.dequant_rows, lib.decode_step, lib.paged_attention):
        f.restype = ctypes.c_int
    lib.quantize_acts_row.restype = None
    problem = _check_abi(lib, isa)
    if problem:
        _errors[isa] = f"{path.name} does not match llama3.kernels: {problem}"
        return None
    _libs[isa] = lib
    return lib


def _disabled() -> bool:
    return os.environ.get("LLAMA3_NO_KERNELS", "") not in ("", "0")


def library(isa: str | None = None):
    """The C library in use (or, given ``isa``, that ISA's library), or None: then ``why_not()`` (or
    ``why_not(isa)``) says why."""
    global _lib, _isa, _tried, _why_not
    if isa is not None:
        return None if _disabled() else _load(isa)
    if _tried:
        return _lib
    _tried = True
    if _disabled():
        _why_not = "disabled by LLAMA3_NO_KERNELS"
        return None
    forced = os.environ.get("LLAMA3_ISA", "")
    candidates = [forced] if forced else list(reversed(runnable_isas())) or ["avx2"]
    for name in candidates:
        _lib = _load(name)
        if _lib is not None:
            _isa = name
            return _lib
    _why_not = "; ".join(f"{name}: {_errors[name]}" for name in candidates)
    if forced:
        _why_not = f"LLAMA3_ISA={forced}: {_why_not}"
    return None


def why_not(isa: str | None = None) -> str:
    """Why ``library(isa)`` is None ("" when it is not)."""
    if isa is None:
        library()
        return _why_not
    if library(isa) is not None:
        return ""
    return "disabled by LLAMA3_NO_KERNELS" if _disabled() else _errors[isa]


def isa() -> str | None:
    """The instruction set of the C library in use ("avx2" or "avx512"), or None (the PyTorch fallback)."""
    library()
    return _isa if _lib is not None else None


def available_isas() -> list[str]:
    """The ISAs whose library builds and loads here (the tests run each)."""
    return [name for name in runnable_isas() if library(name) is not None]


def _pick(use_c: bool, isa_name: str | None):
    if not use_c:
        return None
    if isa_name is None:
        return library()
    lib = library(isa_name)
    if lib is None:
        raise RuntimeError(f"the {isa_name} kernels are unavailable: {why_not(isa_name)}")
    return lib


# ------------------------------------------------------------------------------------------- operations
def _check_x(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"activations must be (n, {k}), got {tuple(x.shape)}")
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def matmul(qt: Blocks, x: torch.Tensor, use_c: bool = True, isa: str | None = None,
           threads: int | None = None) -> torch.Tensor:
    """y (n, rows) float32 = x (n, k) @ W.T for W in GGUF blocks, x quantized as the kind pairs it."""
    return matmul_list([qt], x, use_c=use_c, isa=isa, threads=threads)


def matmul_list(qts: Sequence[Blocks], x: torch.Tensor, use_c: bool = True, isa: str | None = None,
                threads: int | None = None) -> torch.Tensor:
    """Several weights (same k, any kinds) on the same x: their outputs side by side, (n, sum of rows)."""
    k = qts[0].k
    if any(qt.k != k for qt in qts):
        raise ValueError(f"the weights have different row lengths: {[qt.k for qt in qts]}")
    x = _check_x(x, k)
    lib = _pick(use_c, isa)
    if lib is None:
        return torch.cat([_matmul_fallback(qt, x) for qt in qts], dim=1)
    mats = (QMat * len(qts))(*(qmat(qt) for qt in qts))
    y = torch.empty((x.shape[0], sum(qt.rows for qt in qts)), dtype=torch.float32)
    rc = lib.qmatmul(mats, len(qts), x.data_ptr(), x.shape[0], y.data_ptr(), threads or torch.get_num_threads())
    if rc != 0:
        raise MemoryError("the kernels could not allocate the quantized activations") if rc == -1 else \
            ValueError(f"the C kernels refused the weights {[(qt.kind, qt.rows, qt.k) for qt in qts]}")
    return y


def dequantize(qt: Blocks, rows: torch.Tensor | None = None, use_c: bool = True, dtype: torch.dtype = torch.float32,
               isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """The weights (rows, k) as ``dtype``, or only the rows listed in ``rows`` (for embedding lookups),
    equal to gguf-py's ``dequantize`` (then rounded to ``dtype``; the C code writes float32 and bfloat16)."""
    if rows is not None:
        rows = rows.reshape(-1).to(torch.int64).contiguous()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= qt.rows):
            raise IndexError(f"row index out of range for a weight of {qt.rows} rows")
    lib = _pick(use_c, isa)
    if lib is None:
        data = qt.data if rows is None else qt.data[rows]
        return _dequantize_fallback(qt.kind, data, qt.k).to(dtype)
    n = qt.rows if rows is None else rows.numel()
    direct = dtype in (torch.float32, torch.bfloat16)
    out = torch.empty((n, qt.k), dtype=dtype if direct else torch.float32)
    rc = lib.dequant_rows(ctypes.byref(qmat(qt)), rows.data_ptr() if rows is not None else None, n, out.data_ptr(),
                          int(out.dtype == torch.bfloat16), threads or torch.get_num_threads())
    if rc != 0:
        raise MemoryError("out of memory while dequantizing") if rc == -1 else \
            ValueError(f"the C kernels refused the weight ({qt.kind}, {qt.rows}, {qt.k})")
    return out if direct else out.to(dtype)


def quantize_activations(x: torch.Tensor, needs: int, use_c: bool = True, isa: str | None = None) -> dict:
    """x (n, k) float32 in the forms of ``needs`` (ACT_Q8 | ACT_Q8K): {"q8": (q int8 (n, k), d (n, k/32),
    s = d * sum(q) (n, k/32)), "q8k": (q int8 (n, k), d (n, k/256), sums of 16 int16 (n, k/16))}."""
    n, k = x.shape
    x = _check_x(x, k)
    lib = _pick(use_c, isa)
    if lib is None:
        out = {}
        if needs & ACT_Q8:
            q, d = _quantize_blocks(x, 32)
            out["q8"] = (q, d, d * q.view(n, -1, 32).sum(-1, dtype=torch.int32).float())
        if needs & ACT_Q8K:
            q, d = _quantize_blocks(x, 256)
            out["q8k"] = (q, d, q.view(n, -1, 16).sum(-1, dtype=torch.int32).to(torch.int16))
        return out
    q8, q8k = torch.zeros((n, k), dtype=torch.int8), torch.zeros((n, k), dtype=torch.int8)
    d8, s8 = torch.zeros((n, k // 32)), torch.zeros((n, k // 32))
    dk, bk = torch.zeros((n, k // 256)), torch.zeros((n, k // 16), dtype=torch.int16)
    acts = Acts(x.data_ptr(), q8.data_ptr(), d8.data_ptr(), s8.data_ptr(), q8k.data_ptr(), dk.data_ptr(),
                bk.data_ptr(), k)
    for t in range(n):
        lib.quantize_acts_row(ctypes.byref(acts), t, 0, k, needs)
    return {**({"q8": (q8, d8, s8)} if needs & ACT_Q8 else {}), **({"q8k": (q8k, dk, bk)} if needs & ACT_Q8K else {})}


def _quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``block``: d = max|x| / 127, q = round(x * (127 / max|x|)) half to even, as the C code."""
    n, k = x.shape
    xb = x.view(n, k // block, block)
    amax = xb.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None]).to(torch.int8)
    return q.view(n, k), amax / 127.0


def _matmul_fallback(qt: Blocks, x: torch.Tensor) -> torch.Tensor:
    w = _dequantize_fallback(qt.kind, qt.data, qt.k).double()
    needs = ACT_NEEDS[qt.kind]
    if needs:  # the activations exactly as the C kernels quantize them, dequantized (exactly, in float64)
        block = 32 if needs == ACT_Q8 else 256
        q, d = quantize_activations(x, needs, use_c=False)["q8" if needs == ACT_Q8 else "q8k"][:2]
        x = (q.view(x.shape[0], -1, block).double() * d.double()[..., None]).view(x.shape)
    return (x.double() @ w.T).float()  # the exact product of the quantized operands, rounded once


# ------------------------------------------------------------------------ dequantization in PyTorch
# Each follows gguf-py's quants.py operation for operation (the same float32 roundings), on (rows, blocks,
# block bytes) views of the data.
def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) bytes -> (...) float32 from float16."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes -> (..., 32): the low nibbles, then the high nibbles."""
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) bytes -> (..., 32) bits 0/1 of the little-endian uint32."""
    return ((b[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(-2)


def _shifts(b: torch.Tensor, groups: int, width: int, step: int, count: int) -> torch.Tensor:
    """b (..., groups * width) -> (..., groups, count, width): b >> (step * j) for j < count."""
    s = torch.arange(0, step * count, step, dtype=torch.uint8)[:, None]
    return b.reshape(*b.shape[:-1], groups, 1, width) >> s


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 scales and 8 mins (6 bits each), as float32."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _dequantize_fallback(kind: str, data: torch.Tensor, k: int) -> torch.Tensor:
    rows = data.shape[0]
    if kind in FLOAT_DTYPE:
        return data.contiguous().view(FLOAT_DTYPE[kind]).float().view(rows, k)
    elems, nbytes = BLOCK[kind]
    b = data.reshape(rows, k // elems, nbytes)
    if kind == "Q8_0":
        w = b[..., 2:].contiguous().view(torch.int8).float() * _f16(b[..., 0:2])[..., None]
    elif kind in ("Q4_0", "Q4_1", "IQ4_NL"):
        n = _nibbles(b[..., 4:] if kind == "Q4_1" else b[..., 2:])
        d = _f16(b[..., 0:2])[..., None]
        if kind == "Q4_0":
            w = d * (n.to(torch.int8) - 8).float()
        elif kind == "Q4_1":
            w = d * n.float() + _f16(b[..., 2:4])[..., None]
        else:
            w = d * torch.tensor(IQ4_LEVELS, dtype=torch.float32)[n.long()]
    elif kind in ("Q5_0", "Q5_1"):
        at = 4 if kind == "Q5_1" else 2  # qh, then qs
        q = _nibbles(b[..., at + 4:]) | (_bits(b[..., at:at + 4]) << 4)
        d = _f16(b[..., 0:2])[..., None]
        w = d * (q.to(torch.int8) - 16).float() if kind == "Q5_0" else d * q.float() + _f16(b[..., 2:4])[..., None]
    elif kind == "Q2_K":  # scales[16], qs[64], d, dmin
        sc, d, dmin = b[..., 0:16], _f16(b[..., 80:82])[..., None], _f16(b[..., 82:84])[..., None]
        dl, ml = d * (sc & 0x0F).float(), dmin * (sc >> 4).float()
        q = (_shifts(b[..., 16:80], 2, 32, 2, 4) & 3).reshape(*b.shape[:2], 16, 16).float()
        w = dl[..., None] * q - ml[..., None]
    elif kind == "Q3_K":  # hmask[32], qs[64], scales[12], d
        s = b[..., 96:108]
        low = (_shifts(s[..., 0:8], 1, 8, 4, 2) & 0x0F).flatten(-3)
        high = (_shifts(s[..., 8:12], 1, 4, 2, 4) & 3).flatten(-3)
        dl = _f16(b[..., 108:110])[..., None] * ((low | (high << 4)).to(torch.int8) - 32).float()
        ql = (_shifts(b[..., 32:96], 2, 32, 2, 4) & 3).reshape(*b.shape[:2], 16, 16)
        qh = (_shifts(b[..., 0:32], 1, 32, 1, 8) & 1).reshape(*b.shape[:2], 16, 16)
        w = dl[..., None] * (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).float()
    elif kind in ("Q4_K", "Q5_K"):  # d, dmin, scales[12], (qh[32]), qs[128]
        sc, mn = _k4_scales(b[..., 4:16])
        d, dmin = _f16(b[..., 0:2])[..., None] * sc, _f16(b[..., 2:4])[..., None] * mn
        qs = b[..., 16:144] if kind == "Q4_K" else b[..., 48:176]
        q = (_shifts(qs, 4, 32, 4, 2) & 0x0F).reshape(*b.shape[:2], 8, 32)
        if kind == "Q5_K":
            q = q | ((_shifts(b[..., 16:48], 1, 32, 1, 8) & 1).reshape(*b.shape[:2], 8, 32) << 4)
        w = d[..., None] * q.float() - dmin[..., None]
    elif kind == "Q6_K":  # ql[128], qh[64], scales[16], d
        dl = _f16(b[..., 208:210])[..., None] * b[..., 192:208].contiguous().view(torch.int8).float()
        ql = (_shifts(b[..., 0:128], 2, 64, 4, 2) & 0x0F).reshape(*b.shape[:2], 8, 32)
        qh = (_shifts(b[..., 128:192], 2, 32, 2, 4) & 3).reshape(*b.shape[:2], 8, 32)
        q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(*b.shape[:2], 16, 16).float()
        w = dl[..., None] * q
    elif kind == "IQ4_XS":  # d, scales_h (u16), scales_l[4], qs[128]
        low = (_shifts(b[..., 4:8], 4, 1, 4, 2) & 0x0F).flatten(-3)
        sh = b[..., 2].to(torch.int32) | (b[..., 3].to(torch.int32) << 8)
        high = (sh[..., None] >> torch.arange(0, 16, 2)) & 3
        dl = _f16(b[..., 0:2])[..., None] * ((low.to(torch.int32) | (high << 4)) - 32).float()
        n = (_shifts(b[..., 8:136], 8, 16, 4, 2) & 0x0F).reshape(*b.shape[:2], 8, 32)
        w = dl[..., None] * torch.tensor(IQ4_LEVELS, dtype=torch.float32)[n.long()]
    else:
        raise ValueError(f"no kernels for kind {kind!r} (supported: {', '.join(SUPPORTED_KINDS)})")
    return w.reshape(rows, k)


# ------------------------------------------------------------------------------------------- attention
def paged_attention(pool: torch.Tensor, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: list[int],
                    scale: float, threads: int | None = None) -> torch.Tensor:
    """Decode attention of ``attention.c`` (what the one-call step runs), for tests and tinkerers: q (B, n_heads,
    head_dim) float32 against a paged pool (n_blocks, n_layers, 2, n_kv_heads, block_size, head_dim) of
    float32/float16/bfloat16; sequence b reads its first lens[b] positions through its block table tables[b]."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the C kernels are unavailable: {why_not()}")
    B, H, D = q.shape
    _, n_layers, _, kvh, block_size, _ = pool.shape
    q, tables = q.float().contiguous(), tables.to(torch.int64).contiguous()
    n = torch.tensor(lens, dtype=torch.int64)
    out = torch.empty_like(q)
    c = Cache(pool.data_ptr(), KV_DTYPES[pool.dtype], block_size, n_layers)
    rc = lib.paged_attention(ctypes.byref(c), layer, q.data_ptr(), B, H, kvh, D, tables.data_ptr(), tables.shape[1],
                             n.data_ptr(), scale, out.data_ptr(), threads or torch.get_num_threads())
    if rc != 0:
        raise MemoryError("paged attention could not allocate its work buffer")
    return out
