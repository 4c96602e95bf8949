"""The decode step in one C call.

``Transformer.forward`` is the readable reference: for one new token it makes ~2,000 PyTorch calls
(norms, RoPE, cache writes, attention, quantized matmuls, residual adds), each costing a few
microseconds of dispatch on a CPU, which is more than the matmuls themselves take for a small
model. ``FastDecoder`` runs exactly that computation for one new token per row as one call into
``kernels/decode.c``, reading the model's own tensors and writing the same ``KVCache`` (so prefill
by ``forward`` and decode by the fast path can alternate freely).

It serves models whose block matrices are ``QuantLinear`` (a GGUF's blocks of any kind in
``kernels.SUPPORTED_KINDS``, or ``--quantize``) on the CPU in float32, when the C kernels are built. The exact
float path (``quantize=None``) always runs ``forward``. ``FastDecoder.why_not(model)`` says why a
model does not qualify; tests/test_fastpath.py holds its logits to ``forward``'s.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import time
import weakref
from typing import Sequence

import torch
from torch import nn

from . import kernels
from .kernels import Cache as _Cache, Layer as _Layer, Model as _Model, QMat as _QMat  # (checked against the C)
from .model import KVCache, Transformer
from .quantize import QuantEmbedding, QuantLinear


class _NotEligible(Exception):
    pass


class ThreadTuner:
    """Chooses the decode step's thread count by measurement: the first steps rotate through the
    candidates (all, half, all but one; never more than ``torch.get_num_threads()``), ``TRIALS`` timed
    steps each, and the fastest median wins from then on. The logits do not depend on the thread count
    (each row's sums run in the same order whoever computes them), so tuning on live steps is free."""

    TRIALS = 3

    def __init__(self, limit: int):
        self.limit = limit
        self.candidates = sorted({limit, max(1, limit // 2), max(1, limit - 1)}, reverse=True)
        self.times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.best: int | None = self.candidates[0] if len(self.candidates) == 1 else None

    def pick(self) -> int:
        if self.best is not None:
            return self.best
        return min(self.candidates, key=lambda c: len(self.times[c]))

    def record(self, threads: int, seconds: float) -> None:
        if self.best is None:
            self.times[threads].append(seconds)
            if all(len(t) >= self.TRIALS for t in self.times.values()):
                self.best = min(self.candidates, key=lambda c: statistics.median(self.times[c]))


# one tuner per (model, thread limit, batch of one or more), shared by every FastDecoder built for the model
_TUNERS: "weakref.WeakKeyDictionary[Transformer, dict]" = weakref.WeakKeyDictionary()


def tuned_threads(model: Transformer, batch: int = 1) -> int | None:
    """The thread count the fast decode step settled on for this model (None: not measured yet)."""
    tuner = _TUNERS.get(model, {}).get((torch.get_num_threads(), batch > 1))
    return tuner.best if tuner is not None else None


def _f32(t: torch.Tensor, what: str) -> int:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise _NotEligible(f"{what} is not a contiguous float32 CPU tensor")
    return t.data_ptr()


def _qmat(module: nn.Module, what: str, keep: list) -> _QMat:
    """A matrix for the C side; ``keep`` collects the tensors it points into (kept alive with it)."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        if module.data.device.type != "cpu":
            raise _NotEligible(f"{what}'s blocks are not on the CPU")
        keep.append(module.data)
        return kernels.qmat(module.qtensor)
    if isinstance(module, (nn.Linear, nn.Embedding)) and getattr(module, "bias", None) is None:
        w = module.weight
        keep.append(w)
        return _QMat(kernels.KIND_ID["F32"], _f32(w, what), w.shape[0], w.shape[1], 4 * w.shape[1])
    raise _NotEligible(f"{what} is a {type(module).__name__}, which the fast path does not run")


def _group(modules: list[tuple[nn.Module, str]], keep: list, size: int):
    mats = (_QMat * size)()
    for i, (mod, what) in enumerate(modules):
        mats[i] = _qmat(mod, what, keep)
    return mats, len(modules)


class FastDecoder:
    """``decoder(tokens, positions, cache)``: logits (batch, vocab) for one new token per row, computed by
    ``kernels/decode.c``; equal to ``model(tokens[:, None], start_pos=positions, cache=cache)[:, 0]`` within
    float rounding. Build with ``FastDecoder.for_model(model)`` (None when the model does not qualify)."""

    def __init__(self, model: Transformer, float_weights: bool = False):
        """``float_weights=True`` also takes models whose blocks are float (the engine then runs float32
        matrix-vector products); by default those run ``forward``, the exact reference path."""
        lib = kernels.library()
        if lib is None:
            raise _NotEligible(f"the C kernels are unavailable ({kernels.why_not()})")
        args = model.args
        if any(getattr(m, "tap", None) is not None for m in model.modules()):
            raise _NotEligible("a trace is attached (taps run only in forward)")
        if not float_weights and not any(isinstance(m, QuantLinear) for m in model.layers.modules()):
            raise _NotEligible("the blocks hold float weights (the exact path runs forward)")
        if args.head_dim % 2:
            raise _NotEligible("the head size is odd")
        keep: list[torch.Tensor] = []
        layers = (_Layer * args.n_layers)()
        for i, block in enumerate(model.layers):
            a, f = block.attention, block.feed_forward
            qkv = [(a.wqkv, "wqkv")] if a.wqkv is not None else [(a.wq, "wq"), (a.wk, "wk"), (a.wv, "wv")]
            w13 = [(f.w13, "w13")] if f.w13 is not None else [(f.w1, "w1"), (f.w3, "w3")]
            lay = layers[i]
            lay.attn_norm = _f32(block.attention_norm.weight, f"layers.{i}.attention_norm")
            lay.ffn_norm = _f32(block.ffn_norm.weight, f"layers.{i}.ffn_norm")
            keep += [block.attention_norm.weight, block.ffn_norm.weight]
            lay.qkv, lay.n_qkv = _group([(m, f"layers.{i}.attention.{n}") for m, n in qkv], keep, 3)
            lay.w13, lay.n_w13 = _group([(m, f"layers.{i}.feed_forward.{n}") for m, n in w13], keep, 2)
            lay.wo = _qmat(a.wo, f"layers.{i}.attention.wo", keep)
            lay.w2 = _qmat(f.w2, f"layers.{i}.feed_forward.w2", keep)
        keep += [model.rope_cos, model.rope_sin, model.norm.weight]
        self._model = _Model(
            dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.kv_heads,
            head_dim=args.head_dim, hidden=args.hidden_dim, vocab=args.vocab_size, eps=args.norm_eps,
            attn_scale=1.0 / math.sqrt(args.head_dim), rope_cos=_f32(model.rope_cos, "rope_cos"),
            rope_sin=_f32(model.rope_sin, "rope_sin"), embed=_qmat(model.tok_embeddings, "tok_embeddings", keep),
            norm=_f32(model.norm.weight, "norm"), output=_qmat(model.output, "output", keep), layers=layers)
        self._layers, self._keep = layers, keep  # the structs point into these: keep them alive
        self._lib = lib
        self._tuners = _TUNERS.setdefault(model, {})
        self.args = args

    @classmethod
    def for_model(cls, model: Transformer, float_weights: bool = False) -> "FastDecoder | None":
        try:
            return cls(model, float_weights)
        except _NotEligible:
            return None

    @staticmethod
    def why_not(model: Transformer) -> str | None:
        """None if the model qualifies, else the reason it does not."""
        try:
            FastDecoder(model)
        except _NotEligible as e:
            return str(e)
        return None

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], cache: KVCache,
                 rows: Sequence[int] | None = None, threads: int | None = None) -> torch.Tensor:
        """tokens[b] goes at positions[b] of cache row rows[b] (default: row b); returns (batch, vocab).
        ``threads``: how many threads run the step (default: chosen by ``ThreadTuner``)."""
        batch = len(tokens)
        if batch == 0 or len(positions) != batch or (rows is not None and len(rows) != batch):
            raise ValueError(f"need one token, position and row per sequence; got {batch} tokens, "
                             f"{len(positions)} positions" + (f", {len(rows)} rows" if rows is not None else ""))
        if rows is not None and len(set(rows)) != batch:
            raise ValueError("two sequences cannot share a cache row")
        k, v = cache.k, cache.v
        n_cache_rows, seq = k.shape[1], k.shape[3]
        row_ids = range(batch) if rows is None else rows
        for t, p, r in zip(tokens, positions, row_ids):
            if not 0 <= t < self.args.vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {self.args.vocab_size})")
            if not 0 <= p < min(seq, self.args.max_seq_len):
                raise ValueError(f"position {p} is outside the cache's {seq} positions")
            if not 0 <= r < n_cache_rows:
                raise ValueError(f"cache row {r} does not exist (the cache has {n_cache_rows})")
        if k.dtype != torch.float32 or k.device.type != "cpu" or k.stride()[2:] != (seq * k.shape[4], k.shape[4], 1) \
                or k.stride() != v.stride() or tuple(k.shape[2:]) != (self.args.kv_heads, seq, self.args.head_dim) \
                or k.shape[0] != self.args.n_layers:
            raise ValueError("the cache does not match the model (shape, float32 on the CPU, contiguous rows)")
        c = _Cache(k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), seq)
        tok = torch.tensor(tokens, dtype=torch.int64)
        pos = torch.tensor(positions, dtype=torch.int64)
        row_t = torch.tensor(rows, dtype=torch.int64) if rows is not None else None
        logits = torch.empty((batch, self.args.vocab_size), dtype=torch.float32)
        tuner = None
        if threads is None:
            key = (torch.get_num_threads(), batch > 1)
            tuner = self._tuners.get(key) or self._tuners.setdefault(key, ThreadTuner(key[0]))
            threads = tuner.pick()
        start = time.perf_counter()
        rc = self._lib.decode_step(ctypes.byref(self._model), ctypes.byref(c), batch, tok.data_ptr(), pos.data_ptr(),
                                   row_t.data_ptr() if row_t is not None else None, logits.data_ptr(), threads)
        if tuner is not None:
            tuner.record(threads, time.perf_counter() - start)
        if rc != 0:
            raise MemoryError("the fast decode step could not allocate its work buffers")
        return logits
