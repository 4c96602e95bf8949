"""Quantized matmul kernels and the one-call decode step (used by llama3.fastpath): a small C
library (AVX2 + FMA, OpenMP) built with the system's C compiler on first use and called through
ctypes, and, for the kernels, a pure-PyTorch fallback that computes the same numbers (bit for bit
in the integer parts; float sums may differ in the last bits).

``LLAMA3_NO_KERNELS=1`` disables the C library (the fallback is then used everywhere).
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

import torch

QK = 32
_KIND_ID = {"q8": 0, "q4_0": 1, "q4_1": 2}
# The GGML kinds whose blocks these kernels run as they are stored in a GGUF file.
SUPPORTED_KINDS = frozenset({"Q8_0", "Q4_0", "Q4_1"})
_SOURCES = [Path(__file__).with_name(n) for n in ("qgemv.h", "qgemv.c", "decode.c")]
_lib = None
_tried = False
_why_not = ""


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama3" / "kernels"


def build(verbose: bool = False) -> Path | None:
    """Compile the kernels (once per source version) and return the library's path, or None."""
    global _why_not
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        _why_not = "the C kernels are for x86-64 Linux"
        return None
    missing = {"avx2", "fma"} - _cpu_flags()
    if missing:
        _why_not = f"this CPU lacks {', '.join(sorted(missing))}"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _why_not = "no C compiler found"
        return None
    # -ffp-contract=off: a*b + c stays two roundings, as in PyTorch, unless the code asks for an FMA
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES) + " ".join(flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"qgemv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, *flags, *(str(p) for p in _SOURCES if p.suffix == ".c"), "-o", str(out), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            _why_not = f"the C compiler failed: {proc.stderr.strip()[:500]}"
            return None
        os.replace(out, target)  # atomic: concurrent builders never see a half-written file
    if verbose:
        print(f"built {target}", file=sys.stderr)
    return target


def library():
    """The loaded C library, or None (then ``why_not()`` says why)."""
    global _lib, _tried, _why_not
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("LLAMA3_NO_KERNELS", "") not in ("", "0"):
        _why_not = "disabled by LLAMA3_NO_KERNELS"
        return None
    path = build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _why_not = f"cannot load {path}: {e}"
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.quantize_act.argtypes = [p, i64, i64, p, p, p]
    lib.dequant_q8.argtypes = [p, p, i64, i64, p]
    lib.dequant_q4.argtypes = [p, p, p, i64, i64, p]
    lib.qlinear.argtypes = [ctypes.c_int, p, p, p, i64, i64, p, i64, p]
    lib.attn_decode.argtypes = [p, p, p, i64, i64, i64, i64, i64, p, ctypes.c_float, p]
    lib.decode_step.argtypes = [p, p, i64, p, p, p, p, i64]
    lib.decode_step.restype = ctypes.c_int
    for f in (lib.quantize_act, lib.dequant_q8, lib.dequant_q4, lib.qlinear, lib.attn_decode):
        f.restype = None
    _lib = lib
    return lib


def why_not() -> str:
    library()
    return _why_not


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


# ------------------------------------------------------------------------------ operations
def quantize_activations(x: torch.Tensor, use_c: bool = True):
    """x (n, k) float32 -> (q int8 (n, k), d (n, k/32), s = d*sum(q) (n, k/32))."""
    n, k = x.shape
    lib = library() if use_c else None
    if lib is not None:
        x = x.contiguous()
        q = torch.empty((n, k), dtype=torch.int8)
        d = torch.empty((n, k // QK), dtype=torch.float32)
        s = torch.empty((n, k // QK), dtype=torch.float32)
        lib.quantize_act(_ptr(x), n, k, _ptr(q), _ptr(d), _ptr(s))
        return q, d, s
    xb = x.view(n, k // QK, QK)
    amax = xb.abs().amax(-1)
    d = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None]).to(torch.int8)
    s = d * q.sum(-1, dtype=torch.int32).float()
    return q.view(n, k), d, s


def qmatmul(kind: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, rows: int, k: int,
            x: torch.Tensor, use_c: bool = True) -> torch.Tensor:
    """y (n, rows) = x (n, k) @ W.T for a block-quantized W (scales ``d`` and offsets ``m`` float16), with x
    quantized to int8 blocks."""
    n = x.shape[0]
    lib = library() if use_c else None
    if lib is not None:  # one C call: quantize the activations, then the integer block dot products
        _check_scales(d, m)
        y = torch.empty((n, rows), dtype=torch.float32)
        lib.qlinear(_KIND_ID[kind], qs.data_ptr(), d.data_ptr(), m.data_ptr() if m is not None else None,
                    rows, k, x.data_ptr(), n, y.data_ptr())
        return y
    xq, xd, xs = quantize_activations(x, use_c=False)
    nb = k // QK
    qw = unpack(kind, qs, rows, k).view(rows, nb, QK).float()  # integer values, exact in float32
    dots = torch.einsum("rbi,nbi->nrb", qw, xq.view(n, nb, QK).float())  # exact integer block dots
    y = (dots * (d.float()[None] * xd[:, None])).sum(-1)
    if kind == "q4_1":
        y = y + (m.float()[None] * xs[:, None]).sum(-1)
    return y


def _check_scales(d: torch.Tensor, m: torch.Tensor | None) -> None:
    for t in (d, m) if m is not None else (d,):
        if t.dtype != torch.float16 or not t.is_contiguous():
            raise ValueError(f"block scales must be contiguous float16 (as in GGUF), got {t.dtype}")


def unpack(kind: str, qs: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """The integer values of the weights (rows, k): int8 for q8, 0..15 (q4_1) or -8..7 (q4_0)."""
    if kind == "q8":
        return qs.view(rows, k)
    b = qs.view(rows, k // QK, 16)
    lo, hi = (b & 0x0F).to(torch.int8), (b >> 4).to(torch.int8)
    vals = torch.cat([lo, hi], dim=-1).view(rows, k)
    return vals - 8 if kind == "q4_0" else vals


def dequantize(kind: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, rows: int, k: int,
               use_c: bool = True) -> torch.Tensor:
    """The float32 weights (rows, k)."""
    lib = library() if use_c else None
    if lib is not None:
        _check_scales(d, m if kind == "q4_1" else None)
        out = torch.empty((rows, k), dtype=torch.float32)
        if kind == "q8":
            lib.dequant_q8(_ptr(qs), _ptr(d), rows, k, _ptr(out))
        else:
            lib.dequant_q4(_ptr(qs), _ptr(d), _ptr(m) if kind == "q4_1" else None, rows, k, _ptr(out))
        return out
    vals = unpack(kind, qs, rows, k).view(rows, k // QK, QK).float()
    w = vals * d.float()[..., None]
    if kind == "q4_1":
        w = w + m.float()[..., None]
    return w.view(rows, k)



def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: list[int],
                     scale: float) -> torch.Tensor | None:
    """One new query per row: q (B, H, D) float32; k_cache, v_cache one layer's (rows, KVH, S, D) float32
    cache; row b attends to its first lens[b] keys. Returns (B, H, D), or None without the C library."""
    lib = library()
    if lib is None or q.dtype != torch.float32 or k_cache.dtype != torch.float32 or q.device.type != "cpu":
        return None
    B, H, D = q.shape
    _, KVH, S, _ = k_cache.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    n = torch.tensor(lens, dtype=torch.int64)
    lib.attn_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), B, H, KVH, D, S, n.data_ptr(), scale,
                    out.data_ptr())
    return out
