"""Weights in GGUF's block formats as module transforms applied after the model is built.

A ``QuantTensor`` is a (rows, k) weight held as the bytes GGUF stores: each row's blocks (Q4_K, Q6_K,
Q8_0, ... or plain F16/BF16/F32 values), taken from the file's memory map without a copy, or made from
float weights by ``QuantTensor.quantize``. ``QuantLinear`` runs decode steps (a few rows) through the C
kernels of ``llama3.kernels`` (integer dot products against quantized activations, or float products
for the 16-bit kinds); longer inputs (prefill) dequantize the layer to ``prefill_dtype`` and use the
float GEMM, which is faster there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import BLOCK, FLOAT_DTYPE, IQ4_LEVELS, SUPPORTED_KINDS

GEMV_MAX_ROWS = 8  # by default, inputs with more rows than this take the dequantize + float GEMM path
# (``QuantLinear.kernel_rows``; the engine's policy raises it: engine.policy.prefill_kernel_rows)
# --quantize schemes: int8 = Q8_0; int4 = Q4_K (with llama.cpp's Q4_K_M choice of Q6_K for the output
# projection); or a GGML type by name
SCHEMES = ("int8", "int4", *(kind.lower() for kind in SUPPORTED_KINDS if kind != "F32"))
# Super-block kinds need rows that are a multiple of 256; other rows get the kind llama.cpp's quantizer
# falls back to (llama_tensor_get_type).
FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
# Byte offsets of each block's float16 scales (d, and dmin or m), for ``QuantTensor.random``.
SCALE_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
            "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_XS": (0,)}


def scheme_kinds(scheme: str) -> tuple[str, str]:
    """The kinds a ``--quantize`` scheme gives (the block matrices', the output projection's)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; expected one of {', '.join(SCHEMES)} or none")
    if scheme == "int8":
        return "Q8_0", "Q8_0"
    if scheme == "int4":
        return "Q4_K", "Q6_K"
    return scheme.upper(), scheme.upper()


@dataclass
class QuantTensor:
    """A (rows, k) weight as GGUF stores it: ``data`` uint8 (rows, row_bytes), each row's blocks of ``kind``
    exactly as in the file (a view of its memory map, never copied), or its F16/BF16/F32 values."""

    kind: str  # GGML type name: "Q4_K", "Q6_K", "Q8_0", "F16", ...
    data: torch.Tensor
    rows: int
    k: int

    def __post_init__(self):
        if self.kind not in BLOCK:
            raise ValueError(f"no kernels for GGML type {self.kind} (supported: {', '.join(SUPPORTED_KINDS)})")
        elems, nbytes = BLOCK[self.kind]
        if self.k % elems:
            raise ValueError(f"a {self.kind} weight needs rows of a multiple of {elems} values, got {self.k}")
        shape = (self.rows, self.k // elems * nbytes)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != shape or not self.data.is_contiguous():
            raise ValueError(f"a ({self.rows}, {self.k}) {self.kind} weight needs contiguous uint8 data of shape "
                             f"{shape}, got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.k)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weights (rows, k) as ``dtype`` (or the rows listed in ``rows``), equal to gguf-py's dequantize.
        F16/BF16/F32 weights asked for in their own dtype come back as a view of ``data``, not a copy."""
        if rows is None and FLOAT_DTYPE.get(self.kind) == dtype:
            return self.data.view(dtype).view(self.rows, self.k)
        return kernels.dequantize(self, rows=rows, dtype=dtype)

    @classmethod
    def from_gguf(cls, raw, type_name: str, shape: tuple[int, int]) -> "QuantTensor":
        """A view of a GGUF tensor's bytes ``raw`` (numpy uint8, e.g. a slice of the file's memory map, or a
        tensor) of type ``type_name`` and PyTorch shape (rows, k). No copy."""
        rows, k = shape
        if type_name not in BLOCK:
            raise ValueError(f"no kernels for GGML type {type_name} (supported: {', '.join(SUPPORTED_KINDS)})")
        elems, nbytes = BLOCK[type_name]
        if k % elems:
            raise ValueError(f"a {type_name} tensor of shape {tuple(shape)}: rows of {k} are not whole blocks of "
                             f"{elems}")
        if isinstance(raw, np.ndarray):
            with warnings.catch_warnings():  # a read-only map: the kernels never write to weights
                warnings.filterwarnings("ignore", message=".*not writable.*")
                raw = torch.from_numpy(raw)
        raw = raw.reshape(-1)
        if raw.dtype != torch.uint8 or raw.numel() != rows * (k // elems) * nbytes:
            raise ValueError(f"a {type_name} tensor of shape {tuple(shape)} takes {rows * (k // elems) * nbytes} "
                             f"bytes, got {raw.numel()} of {raw.dtype}")
        return cls(type_name, raw.view(rows, (k // elems) * nbytes), rows, k)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "QuantTensor":
        """A 2-D float32/float16/bfloat16 CPU tensor as an F32/F16/BF16 weight: its own memory, not a copy."""
        kind = {v: k for k, v in FLOAT_DTYPE.items()}.get(t.dtype)
        if kind is None or t.dim() != 2:
            raise ValueError(f"expected a 2-D float32, float16 or bfloat16 tensor, got {t.dtype} {tuple(t.shape)}")
        t = t.detach().contiguous()
        return cls(kind, t.view(torch.uint8), t.shape[0], t.shape[1])

    @classmethod
    def quantize(cls, w: torch.Tensor, kind: str) -> "QuantTensor":
        """Float weights (rows, k) in ``kind``'s blocks (any kind of SUPPORTED_KINDS; K-quants need k a
        multiple of 256). Scales are searched per (sub-)block as llama.cpp's reference quantizers do, then
        rounded to what the format stores, and the values rounded against the stored scales."""
        if w.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
        rows, k = w.shape
        if kind in FLOAT_DTYPE:
            return cls.from_tensor(w.detach().to(device="cpu", dtype=FLOAT_DTYPE[kind]).contiguous())
        if kind not in BLOCK:
            raise ValueError(f"no quantizer for GGML type {kind} (supported: {', '.join(SUPPORTED_KINDS)})")
        elems, nbytes = BLOCK[kind]
        if k % elems:
            raise ValueError(f"cannot quantize a weight with rows of {k} to {kind}: not a multiple of {elems}")
        w = w.detach().to(device="cpu", dtype=torch.float32)
        data = torch.empty((rows, k // elems * nbytes), dtype=torch.uint8)
        step = max(1, (1 << 20) // k)  # about a million values at a time bounds the temporaries
        for r in range(0, rows, step):
            blocks = w[r:r + step].reshape(-1, elems)
            data[r:r + step] = _QUANTIZERS[kind](blocks).reshape(-1, data.shape[1])
        return cls(kind, data, rows, k)

    @classmethod
    def random(cls, kind: str, rows: int, k: int, generator: torch.Generator | None = None) -> "QuantTensor":
        """Random blocks of ``kind`` with sane float16 scales (random bits elsewhere), for tests and speed
        measurements: weights of magnitude ~0.01-0.1."""
        if kind in FLOAT_DTYPE:
            return cls.from_tensor((torch.randn(rows, k, generator=generator) * 0.05).to(FLOAT_DTYPE[kind]))
        elems, nbytes = BLOCK[kind]
        nb = k // elems
        data = torch.randint(0, 256, (rows, nb, nbytes), generator=generator, dtype=torch.uint8)
        base = {"Q8_0": 1e-3, "Q2_K": 2e-3, "Q3_K": 1e-3, "Q4_K": 5e-4, "Q5_K": 2e-4, "Q6_K": 1e-4, "IQ4_NL": 5e-4,
                "IQ4_XS": 2e-5}.get(kind, 5e-3)
        for at in SCALE_AT[kind]:
            scale = (0.5 + torch.rand(rows, nb, generator=generator)) * base
            data[..., at:at + 2] = scale.half().view(torch.uint8).view(rows, nb, 2)
        return cls(kind, data.reshape(rows, nb * nbytes), rows, k)


# ------------------------------------------------------------------------------------------ quantizers
# Each takes float32 blocks (n, block elements) and returns their bytes (n, block bytes), laid out as
# kernels/quants.c and gguf-py read them.
def _half(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded to float16 (as float32) and its bytes (..., 2)."""
    h = x.to(torch.float16)
    return h.float(), h.view(torch.uint8).view(*x.shape, 2)


def _inv(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x != 0, 1.0 / x, torch.zeros_like(x))


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last axis, with its sign."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 32) values 0..15 -> (..., 16) bytes: element i in the low nibble of byte i, i + 16 in the high."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _pack_bits(q: torch.Tensor, bit: int, groups: int) -> torch.Tensor:
    """(..., groups * 32) -> (..., 32) bytes: bit g of byte i is bit ``bit`` of element 32 g + i."""
    b = ((q.to(torch.uint8) >> bit) & 1).reshape(*q.shape[:-1], groups, 32)
    return sum(b[..., g, :] << g for g in range(groups)).to(torch.uint8)


def _pack_bits32(q: torch.Tensor, bit: int) -> torch.Tensor:
    """(..., 32) -> (..., 4) bytes: the little-endian uint32 whose bit i is bit ``bit`` of element i."""
    b = ((q.to(torch.uint8) >> bit) & 1).reshape(*q.shape[:-1], 4, 8)
    return sum(b[..., j] << j for j in range(8)).to(torch.uint8)


def _pack_crumbs(q: torch.Tensor) -> torch.Tensor:
    """(..., 256) values 0..3 -> (..., 64) bytes: element 128 h + 32 s + i in bits 2s of byte 32 h + i."""
    q = q.to(torch.uint8).reshape(*q.shape[:-1], 2, 4, 32)
    return sum(q[..., s, :] << (2 * s) for s in range(4)).to(torch.uint8).flatten(-2)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)


def _keep_better(best, new):
    """Elementwise, the candidate (error, *values) with the smaller error."""
    if best is None:
        return new
    better = new[0] < best[0]
    return tuple(torch.where(better, n, b) for n, b in zip(new, best))


def _fit_affine(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s >= 0 and offset m >= 0 with x ~ s q - m, q in 0..nmax, minimizing sum w (s q - m - x)^2 over
    llama.cpp's candidate scales (make_qkx2_quants): each candidate's q refitted by weighted least squares.
    The error of a fit follows from the sums, expanded: sum w (s q + b - x)^2 = s^2 Swqq + 2 s b Swq + b^2 Sw
    - 2 s Swqx - 2 b Swx + Swxx."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True)
    x0 = x - lo
    inv_span = 1.0 / (hi - lo).clamp_min(1e-30)
    sw, swx, swxx = w.sum(-1), _dot(w, x), _dot(w * x, x)
    best = None
    for i in range(steps + 1):
        q = torch.round(x0 * ((nmax - 1 + 2 * i / steps) * inv_span)).clamp_(0, nmax)  # nmax -1 .. +1 levels
        wq = w * q
        swq, swqq, swqx = wq.sum(-1), _dot(wq, q), _dot(wq, x)
        det = sw * swqq - swq * swq
        s = (sw * swqx - swq * swx) / det
        b = (swqq * swx - swq * swqx) / det
        # the format's offset is -m <= 0: where the fit wants a positive offset, fit the scale alone
        alone = (det <= 0) | (b > 0) | ~torch.isfinite(s)
        s = torch.where(alone, swqx * _inv(swqq), s)
        b = torch.where(alone, torch.zeros_like(b), b)
        err = s * s * swqq + 2 * s * b * swq + b * b * sw - 2 * s * swqx - 2 * b * swx + swxx
        best = _keep_better(best, (err, s, b))
    return best[1].clamp_min(0), -best[2]


def _fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 9) -> torch.Tensor:
    """Signed scale s with x ~ s q, q in -nmax..nmax-1, over llama.cpp's candidates (make_qx_quants): the
    extreme value mapped to -(nmax + 0.1 i), each refitted by weighted least squares (s = Swxq / Swqq, whose
    error Swxx - Swxq^2 / Swqq is smallest where Swxq^2 / Swqq is largest)."""
    inv_m = _inv(_signed_max(x))[..., None]
    wx = w * x
    best = None
    for i in range(-steps, steps + 1):
        q = torch.round(x * (-(nmax + 0.1 * i) * inv_m)).clamp_(-nmax, nmax - 1)
        swxq, swqq = _dot(wx, q), _dot(w * q, q)
        best = _keep_better(best, (-swxq * swxq * _inv(swqq), swxq * _inv(swqq)))
    return best[1]


_LEVELS = torch.tensor(IQ4_LEVELS, dtype=torch.float32)


_MIDS = (_LEVELS[1:] + _LEVELS[:-1]) / 2  # 15 decision points, all on a grid of 1/2
_GRID_LO, _GRID_STEP = -128.0, 0.5
# for cell c = [lo + c step, lo + (c + 1) step): how many decision points lie below its left edge
_BELOW = torch.searchsorted(_MIDS, _GRID_LO + _GRID_STEP * torch.arange(513, dtype=torch.float32))
_MIDS_INF = torch.cat([_MIDS, torch.tensor([float("inf")])])


def _nearest_level(v: torch.Tensor) -> torch.Tensor:
    """Index of the IQ4 level nearest to each v (ties to the lower), by table: a cell holds at most one
    decision point, on its left edge, so one comparison finishes the count (torch.bucketize is ~5x slower)."""
    cell = ((v - _GRID_LO) / _GRID_STEP).floor_().clamp_(0, 512).long()
    below = _BELOW.index_select(0, cell.view(-1)).view(v.shape)
    return below + (v > _MIDS_INF.index_select(0, below.view(-1)).view(v.shape))


def _fit_levels(x: torch.Tensor, w: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Signed scale d with x ~ d L[i] (IQ4 levels), over llama.cpp's candidates (quantize_row_iq4_nl_impl),
    each refitted by weighted least squares as in ``_fit_symmetric``."""
    inv_m = _inv(_signed_max(x))[..., None]
    wx = w * x
    best = None
    for i in range(-steps, steps + 1):
        idx = _nearest_level(x * ((i + IQ4_LEVELS[0]) * inv_m))
        level = _LEVELS.index_select(0, idx.view(-1)).view(x.shape)
        swxl, swll = _dot(wx, level), _dot(w * level, level)
        best = _keep_better(best, (-swxl * swxl * _inv(swll), swxl * _inv(swll)))
    return best[1]


def _importance(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's weights without an importance matrix: rms of the group + |x|."""
    return x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()


def _q8_0(x):
    d, d_bytes = _half(x.abs().amax(-1) / 127)
    q = torch.round(x * _inv(d)[..., None]).clamp(-127, 127).to(torch.int8)
    return torch.cat([d_bytes, q.view(torch.uint8)], -1)


def _symmetric_legacy(x, nmax):
    """Q4_0 / Q5_0: d = the extreme value / -nmax, values -nmax..nmax-1 stored + nmax."""
    d, d_bytes = _half(_signed_max(x) / -nmax)
    q = (torch.round(x * _inv(d)[..., None]).clamp(-nmax, nmax - 1) + nmax).to(torch.uint8)
    if nmax == 8:
        return torch.cat([d_bytes, _pack_nibbles(q)], -1)
    return torch.cat([d_bytes, _pack_bits32(q, 4), _pack_nibbles(q & 0x0F)], -1)


def _affine_legacy(x, nmax):
    """Q4_1 / Q5_1: x ~ d q + m with m = min, d = (max - min) / nmax."""
    m, m_bytes = _half(x.amin(-1))
    d, d_bytes = _half((x.amax(-1) - m) / nmax)
    q = torch.round((x - m[..., None]) * _inv(d)[..., None]).clamp(0, nmax).to(torch.uint8)
    if nmax == 15:
        return torch.cat([d_bytes, m_bytes, _pack_nibbles(q)], -1)
    return torch.cat([d_bytes, m_bytes, _pack_bits32(q, 4), _pack_nibbles(q & 0x0F)], -1)


def _iq4_nl(x):
    d, d_bytes = _half(_fit_levels(x, _importance(x)))
    idx = _nearest_level(x * _inv(d)[..., None])
    return torch.cat([d_bytes, _pack_nibbles(idx)], -1)


def _super_scales(s: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-negative sub-block scales (n, groups) as integers 0..top times a float16 super-scale: (the
    super-scale, its bytes, the integers)."""
    d, d_bytes = _half(s.amax(-1) / top)
    return d, d_bytes, torch.round(s * _inv(d)[..., None]).clamp(0, top)


def _signed_super_scales(s: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed sub-block scales as integers lo..hi times a float16 super-scale that maps the extreme to lo."""
    d, d_bytes = _half(_signed_max(s) / lo)
    return d, d_bytes, torch.round(s * _inv(d)[..., None]).clamp(lo, hi)


def _affine_k(x, group, nmax, top):
    """Q2_K, Q4_K, Q5_K: per group x ~ (d sc) q - (dmin m), sc and m integers 0..top. Returns the bytes of d
    and dmin, the integer scales and mins (n, groups) and the values q (n, 256)."""
    xg = x.view(x.shape[0], -1, group)
    s, m = _fit_affine(xg, _importance(xg), nmax)
    d, d_bytes, sc = _super_scales(s, top)
    dmin, dmin_bytes, mn = _super_scales(m, top)
    scale, offset = (d[..., None] * sc)[..., None], (dmin[..., None] * mn)[..., None]
    q = torch.round((xg + offset) * _inv(scale)).clamp(0, nmax).view(x.shape)
    return d_bytes, dmin_bytes, sc.to(torch.uint8), mn.to(torch.uint8), q.to(torch.uint8)


def _k4_scale_bytes(sc, mn):
    """8 scales and 8 mins (6 bits) -> Q4_K's 12 bytes (see kernels/quants.c, k4_scales)."""
    lo = (sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6))
    return torch.cat([*lo, (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], -1)


def _q4_k(x):
    d, dmin, sc, mn, q = _affine_k(x, 32, 15, 63)
    qs = q.view(-1, 4, 2, 32)
    return torch.cat([d, dmin, _k4_scale_bytes(sc, mn), (qs[:, :, 0] | (qs[:, :, 1] << 4)).flatten(1)], -1)


def _q5_k(x):
    d, dmin, sc, mn, q = _affine_k(x, 32, 31, 63)
    qs = (q & 0x0F).view(-1, 4, 2, 32)
    return torch.cat([d, dmin, _k4_scale_bytes(sc, mn), _pack_bits(q, 4, 8),
                      (qs[:, :, 0] | (qs[:, :, 1] << 4)).flatten(1)], -1)


def _q2_k(x):
    d, dmin, sc, mn, q = _affine_k(x, 16, 3, 15)
    return torch.cat([sc | (mn << 4), _pack_crumbs(q), d, dmin], -1)


def _symmetric_k(x, group, nmax, lo, hi):
    """Q3_K, Q6_K: per group of 16, x ~ (d sc) q with q in -nmax..nmax-1 and sc integers lo..hi."""
    xg = x.view(x.shape[0], -1, group)
    d, d_bytes, sc = _signed_super_scales(_fit_symmetric(xg, xg * xg, nmax), lo, hi)
    q = torch.round(xg * _inv(d[..., None] * sc)[..., None]).clamp(-nmax, nmax - 1).view(x.shape)
    return d_bytes, sc.to(torch.int8), (q + nmax).to(torch.uint8)


def _q6_k(x):
    d, sc, u = _symmetric_k(x, 16, 32, -128, 127)
    half = u.view(-1, 2, 2, 2, 32)  # (half, nibble s of ql, row p of ql, i): element 128 h + 64 s + 32 p + i
    ql = ((half[:, :, 0] & 0x0F) | ((half[:, :, 1] & 0x0F) << 4)).flatten(1)
    top = (u >> 4).view(-1, 2, 4, 32)  # (half, s, i): bits 2s of qh byte 32 h + i
    qh = sum(top[:, :, s] << (2 * s) for s in range(4)).to(torch.uint8).flatten(1)
    return torch.cat([ql, qh, sc.view(torch.uint8), d], -1)


def _q3_k(x):
    d, sc, u = _symmetric_k(x, 16, 4, -32, 31)
    s = (sc + 32).to(torch.uint8)  # stored + 32: low nibbles in bytes 0-7, top 2 bits in bytes 8-11
    low = (s[:, :8] & 0x0F) | ((s[:, 8:] & 0x0F) << 4)
    top = (s >> 4).view(-1, 4, 4)  # (i // 4, i % 4)
    high = sum(top[:, j] << (2 * j) for j in range(4)).to(torch.uint8)
    return torch.cat([_pack_bits(u, 2, 8), _pack_crumbs(u & 3), low, high, d], -1)


def _iq4_xs(x):
    xg = x.view(x.shape[0], 8, 32)
    d, d_bytes, ls = _signed_super_scales(_fit_levels(xg, _importance(xg)), -32, 31)
    idx = _nearest_level(xg * _inv(d[..., None] * ls)[..., None]).to(torch.uint8)
    u = (ls + 32).to(torch.int32)
    high = sum(((u[:, j] >> 4) & 3) << (2 * j) for j in range(8))
    scales_h = torch.stack([high & 0xFF, high >> 8], -1).to(torch.uint8)
    low = (u & 0x0F).to(torch.uint8).view(-1, 4, 2)
    return torch.cat([d_bytes, scales_h, low[..., 0] | (low[..., 1] << 4), _pack_nibbles(idx).flatten(1)], -1)


_QUANTIZERS = {
    "Q8_0": _q8_0, "Q4_0": lambda x: _symmetric_legacy(x, 8), "Q5_0": lambda x: _symmetric_legacy(x, 16),
    "Q4_1": lambda x: _affine_legacy(x, 15), "Q5_1": lambda x: _affine_legacy(x, 31), "IQ4_NL": _iq4_nl,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "IQ4_XS": _iq4_xs,
}


# --------------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """A bias-free Linear whose weight is a QuantTensor."""

    def __init__(self, qt: QuantTensor):
        super().__init__()
        self.kind, self.out_features, self.in_features = qt.kind, qt.rows, qt.k
        self.prefill_dtype = torch.float32  # the GEMM dtype of long inputs (an engine policy may pick bfloat16)
        self.kernel_rows = GEMV_MAX_ROWS  # inputs up to this many rows run through the block kernels
        self.register_buffer("data", qt.data)

    @property
    def qtensor(self) -> QuantTensor:
        return QuantTensor(self.kind, self.data, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= self.kernel_rows:
            y = kernels.matmul(self.qtensor, x2)
        else:
            w = self.qtensor.dequantize(self.prefill_dtype)
            y = F.linear(x2.to(self.prefill_dtype), w)
        y = y.view(*lead, self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind}"


class QuantEmbedding(nn.Module):
    """An embedding table in blocks: looking up a token dequantizes its row."""

    def __init__(self, qt: QuantTensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.kind, self.num_embeddings, self.embedding_dim, self.dtype = qt.kind, qt.rows, qt.k, dtype
        self.register_buffer("data", qt.data)

    @property
    def qtensor(self) -> QuantTensor:
        return QuantTensor(self.kind, self.data, self.num_embeddings, self.embedding_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.qtensor.dequantize(self.dtype, rows=tokens.reshape(-1))
        return rows.view(*tokens.shape, self.embedding_dim)


def swap_in(model, name: str, qt: QuantTensor, dtype: torch.dtype = torch.float32) -> None:
    """Replace the module that owns Meta-named weight ``name`` by its quantized counterpart."""
    path = name.rsplit(".", 1)[0]  # drop ".weight"
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    new = QuantEmbedding(qt, dtype) if attr == "tok_embeddings" else QuantLinear(qt)
    setattr(parent, attr, new)
    if attr == "tok_embeddings" and model.args.tie_word_embeddings:
        model.output = QuantLinear(qt)  # the same blocks serve the output projection


def kind_for(scheme: str, name: str, k: int) -> str:
    """The kind a ``--quantize`` scheme gives the Meta-named matrix ``name`` with rows of ``k``: the output
    projection and the embedding (the same matrix when tied) get the scheme's output kind; rows that are not
    whole super-blocks get llama.cpp's fallback kind."""
    kind, output_kind = scheme_kinds(scheme)
    if name.startswith("output.") or name.startswith("tok_embeddings."):
        kind = output_kind
    return FALLBACK.get(kind, kind) if k % BLOCK[kind][0] else kind


def quantize_weight(w: torch.Tensor, kind: str) -> QuantTensor:
    """``QuantTensor.quantize`` in ``kind``, or in llama.cpp's fallback kind where the rows are not whole
    super-blocks (e.g. Q4_K -> Q5_0 for rows of 576)."""
    if w.shape[1] % BLOCK[kind][0]:
        kind = FALLBACK.get(kind, kind)
    return QuantTensor.quantize(w, kind)


def _float_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight of a float Linear/Embedding, or of one held as F32/F16/BF16 blocks; None otherwise."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return module.weight
    if isinstance(module, (QuantLinear, QuantEmbedding)) and module.kind in FLOAT_DTYPE:
        return module.qtensor.dequantize(FLOAT_DTYPE[module.kind])
    return None


@torch.no_grad()
def quantize_model(model, scheme: str) -> None:
    """Quantize every float matrix of the blocks and the output projection (and a tied embedding) in place;
    matrices already in quantized blocks stay as they are."""
    kind, output_kind = scheme_kinds(scheme)
    for name, module in list(model.named_modules()):
        w = _float_weight(module)
        if w is not None and name.startswith("layers."):
            swap_in(model, name + ".weight", quantize_weight(w, kind))
    tied = model.args.tie_word_embeddings
    w = _float_weight(model.tok_embeddings if tied else model.output)
    if w is not None:
        swap_in(model, "tok_embeddings.weight" if tied else "output.weight", quantize_weight(w, output_kind),
                dtype=model.norm.weight.dtype)


def describe(model) -> str:
    """What the weights are and which kernels multiply them (the engine's policy adds how steps run)."""
    kinds = sorted({m.kind for m in model.modules() if isinstance(m, QuantLinear)})
    dtype = model.norm.weight.dtype
    if not kinds:
        return f"float ({str(dtype).replace('torch.', '')})"
    lib = f"C kernels ({kernels.isa()})" if kernels.library() is not None else \
        f"PyTorch fallback ({kernels.why_not()})"
    acts = "int8 activations" if any(k not in FLOAT_DTYPE for k in kinds) else "float32 activations"
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    gemm = f"{str(layer.prefill_dtype).replace('torch.', '')} GEMMs"
    prefill = f"prefill: the block kernels up to {layer.kernel_rows} rows, then {gemm}" \
        if layer.kernel_rows < PREFILL_ANY_ROWS else "prefill: the block kernels at any length"
    return f"quantized {'/'.join(kinds)} weights, {acts}, {lib}, {prefill}"


PREFILL_ANY_ROWS = 1 << 30  # kernel_rows meaning "always the block kernels"


def set_prefill_dtype(model, dtype: torch.dtype, kernel_rows: int = GEMV_MAX_ROWS) -> None:
    """How every QuantLinear multiplies inputs of several rows: up to ``kernel_rows`` rows with the block
    kernels, longer ones by dequantizing its layer to ``dtype`` for a GEMM (``engine.choose_prefill_dtype``,
    ``engine.policy.prefill_kernel_rows``)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"prefill dtype must be float32, bfloat16 or float16, got {dtype}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prefill_dtype, m.kernel_rows = dtype, kernel_rows
