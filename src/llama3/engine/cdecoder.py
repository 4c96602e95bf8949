"""The decode step in one C call.

``Transformer.forward`` is the readable reference: for one new token it makes ~1,000 PyTorch calls
(norms, RoPE, cache writes, attention, matmuls, residual adds), each costing a few microseconds of
dispatch on a CPU, which is more than the matmuls themselves take for a small model. ``CDecoder.step``
runs exactly that computation for one new token per sequence as one call into ``kernels/decode.c``,
reading the model's own tensors and the paged cache's pool and block tables; ``prefill`` runs
``Transformer.forward`` over the same cache (so the two alternate freely).

It serves CPU models whose block matrices are quantized (``QuantLinear``) and, when asked
(``float_weights=True``), float ones. ``CDecoder.why_not(model)`` says why a model does not qualify;
tests/test_decoders.py holds it to ``TorchDecoder``.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import time

import torch
from torch import nn

from .. import kernels
from ..kernels import KV_DTYPES, Cache, Layer, Model, QMat  # ctypes mirrors, checked against the C at load
from ..model import Transformer, no_tap
from ..quantize import QuantEmbedding, QuantLinear
from .cache import PagedKVCache
from .decoders import TorchDecoder

class _NotEligible(Exception):
    pass


class ThreadTuner:
    """Chooses the decode step's thread count by measurement, and keeps measuring. The first steps rotate
    through the candidates (all, half, all but one; never more than the limit), ``TRIALS`` timed steps
    each, and the fastest median wins; every ``RECHECK`` steps the candidates are timed again, so a
    machine that got busy (where fewer threads than cores are faster) changes the choice. The logits do
    not depend on the thread count (each row's sums run in the same order whoever computes them)."""

    TRIALS = 3
    RECHECK = 512

    def __init__(self, limit: int):
        self.limit = limit
        self.candidates = sorted({limit, max(1, limit // 2), max(1, limit - 1)}, reverse=True)
        self.best: int | None = self.candidates[0] if len(self.candidates) == 1 else None
        self.times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.since = 0

    def pick(self) -> int:
        if self.best is not None and self.since < self.RECHECK:
            return self.best
        return min(self.candidates, key=lambda c: len(self.times[c]))

    def record(self, threads: int, seconds: float) -> None:
        if len(self.candidates) == 1:
            return
        if self.best is not None and self.since < self.RECHECK:
            self.since += 1
            return
        self.times[threads].append(seconds)
        if all(len(t) >= self.TRIALS for t in self.times.values()):
            self.best = min(self.candidates, key=lambda c: statistics.median(self.times[c]))
            self.times = {c: [] for c in self.candidates}
            self.since = 0


def _f32(t: torch.Tensor, what: str) -> int:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise _NotEligible(f"{what} is not a contiguous float32 CPU tensor")
    return t.data_ptr()


def _qmat(module: nn.Module, what: str, keep: list) -> QMat:
    """A matrix for the C side; ``keep`` collects the tensors it points into (kept alive with it)."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        if module.data.device.type != "cpu":
            raise _NotEligible(f"{what}'s blocks are not on the CPU")
        keep.append(module.data)
        return kernels.qmat(module.qtensor)
    if isinstance(module, (nn.Linear, nn.Embedding)) and getattr(module, "bias", None) is None:
        w = module.weight
        keep.append(w)
        return QMat(kernels.KIND_ID["F32"], _f32(w, what), w.shape[0], w.shape[1], 4 * w.shape[1])
    raise _NotEligible(f"{what} is a {type(module).__name__}, which the C step does not run")


def _group(modules: list[tuple[nn.Module, str]], keep: list, size: int):
    mats = (QMat * size)()
    for i, (mod, what) in enumerate(modules):
        mats[i] = _qmat(mod, what, keep)
    return mats, len(modules)


class CDecoder(TorchDecoder):
    """``step`` in one C call; ``prefill`` through ``Transformer.forward`` (inherited)."""

    name = "c"

    def __init__(self, model: Transformer, cache: PagedKVCache, threads: int | None = None,
                 float_weights: bool = False):
        """``threads``: the most threads a step uses (default ``torch.get_num_threads()``; the count is
        tuned by measurement below that). ``float_weights=True`` also takes float blocks (float32
        matrix-vector products); by default those run ``TorchDecoder``, the exact reference path."""
        why = self.why_not(model, cache.dtype, float_weights)
        if why is not None:
            raise ValueError(f"the C decode step cannot run this model: {why}")
        super().__init__(model, cache, batch_invariant=True)
        args = model.args
        keep: list[torch.Tensor] = []
        layers = (Layer * args.n_layers)()
        for i, block in enumerate(model.layers):
            a, f = block.attention, block.feed_forward
            lay = layers[i]
            lay.attn_norm = _f32(block.attention_norm.weight, f"layers.{i}.attention_norm")
            lay.ffn_norm = _f32(block.ffn_norm.weight, f"layers.{i}.ffn_norm")
            keep += [block.attention_norm.weight, block.ffn_norm.weight]
            lay.qkv, lay.n_qkv = _group([(a.wq, f"layers.{i}.attention.wq"), (a.wk, f"layers.{i}.attention.wk"),
                                         (a.wv, f"layers.{i}.attention.wv")], keep, 3)
            lay.w13, lay.n_w13 = _group([(f.w1, f"layers.{i}.feed_forward.w1"),
                                         (f.w3, f"layers.{i}.feed_forward.w3")], keep, 2)
            lay.wo = _qmat(a.wo, f"layers.{i}.attention.wo", keep)
            lay.w2 = _qmat(f.w2, f"layers.{i}.feed_forward.w2", keep)
        keep += [model.rope_freqs, model.norm.weight]
        self._model = Model(
            dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.kv_heads,
            head_dim=args.head_dim, hidden=args.hidden_dim, vocab=args.vocab_size, eps=args.norm_eps,
            attn_scale=1.0 / math.sqrt(args.head_dim), rope_freqs=_f32(model.rope_freqs, "rope_freqs"),
            embed=_qmat(model.tok_embeddings, "tok_embeddings", keep), norm=_f32(model.norm.weight, "norm"),
            output=_qmat(model.output, "output", keep), layers=layers)
        self._layers, self._keep = layers, keep  # the structs point into these: keep them alive
        self._lib = kernels.library()
        self.threads = threads or torch.get_num_threads()
        self.tuners = {False: ThreadTuner(self.threads), True: ThreadTuner(self.threads)}  # batch of one / more

    @staticmethod
    def why_not(model: Transformer, kv_dtype: torch.dtype | None = None, float_weights: bool = False) -> str | None:
        """None if the C step can run this model, else the reason it cannot."""
        lib = kernels.library()
        if lib is None:
            return f"the C kernels are unavailable ({kernels.why_not()})"
        if model.norm.weight.device.type != "cpu":
            return "the model is not on the CPU"
        if any(getattr(m, "tap", no_tap) is not no_tap for m in model.modules()):
            return "a trace is attached (taps run only in forward)"
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            return f"the KV cache is {kv_dtype}"
        if not float_weights and not any(isinstance(m, QuantLinear) for m in model.layers.modules()):
            return "the blocks hold float weights (the exact path runs forward)"
        try:
            for mod in [model.tok_embeddings, model.output, *(m for m in model.layers.modules()
                                                              if isinstance(m, (nn.Linear, QuantLinear)))]:
                _qmat(mod, type(mod).__name__, [])
            for t in [model.norm.weight, model.rope_freqs] + [b.attention_norm.weight for b in model.layers]:
                _f32(t, "a norm")
        except _NotEligible as e:
            return str(e)
        return None

    def step(self, tokens, positions, slots):
        batch, cache, vocab = len(tokens), self.cache, self.model.args.vocab_size
        if batch == 0 or len(positions) != batch or len(slots) != batch or len(set(slots)) != batch:
            raise ValueError(f"need one token, position and distinct sequence each; got {batch} tokens, "
                             f"{len(positions)} positions, sequences {list(slots)}")
        for t, p, s in zip(tokens, positions, slots):  # the C code trusts these: check them (a few µs)
            if not 0 <= t < vocab:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {vocab})")
            if not 0 <= p < len(cache.blocks_of(s)) * cache.block_size:
                raise ValueError(f"position {p} of sequence {s} has no cache block (reserve it first)")
        c = Cache(cache.pool.data_ptr(), KV_DTYPES[cache.dtype], cache.block_size, self.model.args.n_layers)
        tables = cache.block_table(slots)
        tok = torch.tensor(list(tokens), dtype=torch.int64)
        pos = torch.tensor(list(positions), dtype=torch.int64)
        logits = torch.empty((batch, self.model.args.vocab_size), dtype=torch.float32)
        tuner = self.tuners[batch > 1]
        threads = tuner.pick()
        start = time.perf_counter()
        rc = self._lib.decode_step(ctypes.byref(self._model), ctypes.byref(c), batch, tok.data_ptr(), pos.data_ptr(),
                                   tables.data_ptr(), tables.shape[1], logits.data_ptr(), threads)
        tuner.record(threads, time.perf_counter() - start)
        if rc != 0:
            raise MemoryError("the C decode step could not allocate its work buffers")
        return logits

    def describe(self) -> str:
        best = self.tuners[False].best
        threads = f"{best} of {self.threads} threads (measured)" if best is not None else f"up to {self.threads} threads"
        return f"one C call per decode step ({threads})"
