"""Weight-only block quantization as module transforms applied after the model is built.

``QuantLinear`` holds a weight in 32-element blocks (GGUF's Q8_0, Q4_0, Q4_1, kept as they are in
the file, or made from float weights by ``quantize_model``). Decode steps (a few rows) run the
integer kernels of ``llama3.kernels`` against int8-quantized activations; longer inputs (prefill)
dequantize the layer to float32 and use the float GEMM, which is faster there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

QK = 32
GEMV_MAX_ROWS = 8  # inputs with more rows than this take the dequantize + float GEMM path
SCHEMES = ("int8", "int4")
GGUF_KINDS = {"Q8_0": "q8", "Q4_0": "q4_0", "Q4_1": "q4_1"}


@dataclass
class QuantTensor:
    """A (rows, k) weight in blocks of 32: integer values ``qs``, float16 scales ``d`` (rows, k/32) and,
    for q4_1, float16 offsets ``m`` (see kernels/qgemv.c for the layouts). Scales given in another
    dtype are rounded to float16, as GGUF stores them."""

    kind: str  # "q8" | "q4_0" | "q4_1"
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    rows: int
    k: int

    def __post_init__(self):
        self.d = self.d.to(torch.float16).contiguous()
        if self.m is not None:
            self.m = self.m.to(torch.float16).contiguous()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.k)

    def dequantize(self) -> torch.Tensor:
        return kernels.dequantize(self.kind, self.qs, self.d, self.m, self.rows, self.k)

    @classmethod
    def from_gguf(cls, raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> "QuantTensor":
        """Split GGUF blocks (float16 scales inline with the values) into our arrays."""
        rows, k = shape
        nb = k // QK
        kind = GGUF_KINDS[type_name]
        block = {"q8": 34, "q4_0": 18, "q4_1": 20}[kind]
        b = np.asarray(raw, dtype=np.uint8).reshape(rows, nb, block)
        d = torch.from_numpy(b[..., 0:2].copy().view(np.float16).reshape(rows, nb))
        if kind == "q8":
            qs = torch.from_numpy(b[..., 2:].copy().view(np.int8).reshape(rows, k))
            return cls(kind, qs, d, None, rows, k)
        if kind == "q4_0":
            return cls(kind, torch.from_numpy(b[..., 2:].copy().reshape(rows, k // 2)), d, None, rows, k)
        m = torch.from_numpy(b[..., 2:4].copy().view(np.float16).reshape(rows, nb))
        return cls(kind, torch.from_numpy(b[..., 4:].copy().reshape(rows, k // 2)), d, m, rows, k)

    @classmethod
    def from_float(cls, w: torch.Tensor, scheme: str) -> "QuantTensor":
        """int8: symmetric blocks (q8, as Q8_0); int4: blocks with a minimum (q4_1, as Q4_1). Values are
        rounded against the float16 scales that are stored."""
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization {scheme!r}; expected one of {', '.join(SCHEMES)} or none")
        rows, k = w.shape
        if k % QK:
            raise ValueError(f"cannot quantize a weight with rows of {k}: not a multiple of {QK}")
        wb = w.detach().float().reshape(rows, k // QK, QK)
        if scheme == "int8":
            d = (wb.abs().amax(-1) / 127.0).half().float()
            inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
            qs = torch.round(wb * inv[..., None]).clamp(-127, 127).to(torch.int8).reshape(rows, k)
            return cls("q8", qs.contiguous(), d, None, rows, k)
        lo, hi = wb.amin(-1).half().float(), wb.amax(-1)
        d = ((hi - lo) / 15.0).half().float()
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        n = torch.round((wb - lo[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
        packed = (n[..., :16] | (n[..., 16:] << 4)).reshape(rows, k // 2)
        return cls("q4_1", packed.contiguous(), d, lo, rows, k)


class QuantLinear(nn.Module):
    """A bias-free Linear whose weight is a QuantTensor."""

    def __init__(self, qt: QuantTensor):
        super().__init__()
        self.kind, self.out_features, self.in_features = qt.kind, qt.rows, qt.k
        self.register_buffer("qs", qt.qs)
        self.register_buffer("d", qt.d)
        self.register_buffer("m", qt.m if qt.m is not None else torch.empty(0))

    @property
    def qtensor(self) -> QuantTensor:
        return QuantTensor(self.kind, self.qs, self.d, self.m if self.kind == "q4_1" else None,
                           self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():  # (each skipped call saves a dispatch)
            x2 = x2.float().contiguous()
        m = self.m if self.kind == "q4_1" else None
        if x2.shape[0] <= GEMV_MAX_ROWS:
            y = kernels.qmatmul(self.kind, self.qs, self.d, m, self.out_features, self.in_features, x2)
        else:
            y = F.linear(x2, self.qtensor.dequantize())
        y = y.view(*lead, self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind}"


class QuantEmbedding(nn.Module):
    """An embedding table in blocks: looking up a token dequantizes its row."""

    def __init__(self, qt: QuantTensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.kind, self.num_embeddings, self.embedding_dim, self.dtype = qt.kind, qt.rows, qt.k, dtype
        self.register_buffer("qs", qt.qs)
        self.register_buffer("d", qt.d)
        self.register_buffer("m", qt.m if qt.m is not None else torch.empty(0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        m = self.m[flat] if self.kind == "q4_1" else None
        rows = kernels.dequantize(self.kind, self.qs[flat].contiguous(), self.d[flat].contiguous(),
                                  m.contiguous() if m is not None else None, flat.numel(), self.embedding_dim,
                                  use_c=False)
        return rows.view(*tokens.shape, self.embedding_dim).to(self.dtype)


def swap_in(model, name: str, qt: QuantTensor, dtype: torch.dtype = torch.float32) -> None:
    """Replace the module that owns Meta-named weight ``name`` by its quantized counterpart."""
    path = name.rsplit(".", 1)[0]  # drop ".weight"
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    new = QuantEmbedding(qt, dtype) if attr == "tok_embeddings" else QuantLinear(qt)
    setattr(parent, attr, new)
    if attr == "tok_embeddings" and model.args.tie_word_embeddings:
        model.output = QuantLinear(qt)  # the same blocks serve the output projection


@torch.no_grad()
def quantize_model(model, scheme: str) -> None:
    """Quantize every Linear of the blocks and the output projection (and a tied embedding) in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "output":
            swap_in(model, name + ".weight", QuantTensor.from_float(module.weight, scheme))
    if model.args.tie_word_embeddings:
        if isinstance(model.tok_embeddings, nn.Embedding):
            swap_in(model, "tok_embeddings.weight", QuantTensor.from_float(model.tok_embeddings.weight, scheme))
    elif isinstance(model.output, nn.Linear):
        model.output = QuantLinear(QuantTensor.from_float(model.output.weight, scheme))


def describe(model) -> str:
    """What the weights are and which kernels multiply them (the decoder policy adds how steps run)."""
    kinds = sorted({m.kind for m in model.modules() if isinstance(m, QuantLinear)})
    dtype = model.norm.weight.dtype
    if not kinds:
        return f"float ({str(dtype).replace('torch.', '')})"
    lib = "C kernels (AVX2)" if kernels.library() is not None else f"PyTorch fallback ({kernels.why_not()})"
    return f"quantized {'/'.join(kinds)} weights, int8 activations, {lib}"
