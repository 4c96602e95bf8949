"""The Llama 3 transformer, read top to bottom.

This is Meta's ``llama/model.py`` (meta-llama/llama3; Llama 3.1/3.2 additions from
meta-llama/llama-models) without fairscale, torchrun or CUDA assumptions:

    tokens ─► tok_embeddings ─► n_layers × TransformerBlock ─► norm ─► output ─► logits
    TransformerBlock:  h = x + Attention(RMSNorm(x));  out = h + FeedForward(RMSNorm(h))

Parameter names are Meta's, so a Meta state dict loads with ``load_state_dict``.
Rotary embeddings use Meta's layout: adjacent pairs (2i, 2i+1) of each head rotate
together. (Hugging Face checkpoints rotate halves instead; their loader converts.)

The KV cache is a separate module owned by the caller (``KVCache``); the model itself
holds no request state.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelArgs

# A tap receives (name, tensor) for every named intermediate; see llama3.explain.trace.
Tap = Callable[[str, torch.Tensor], None]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, computed in float32 and cast back (as Meta's)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ----------------------------------------------------------------------------- RoPE
def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The rotation frequency of each pair of a head: theta^(-2i/head_dim), i < head_dim/2.

    With Llama 3.1 scaling (Meta's ``apply_scaling``) long wavelengths are stretched so the
    model reaches past its original context: a band whose wavelength exceeds
    original_context / low_freq_factor turns ``factor`` times slower; one shorter than
    original_context / high_freq_factor is kept; in between the two are blended with
    smooth = (original_context / wavelength - low) / (high - low).
    """
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64)[: hd // 2] / hd))
    if args.rope_freq_divisors is not None:  # given by the checkpoint (GGUF rope_freqs)
        freqs = freqs / torch.tensor(args.rope_freq_divisors, dtype=torch.float64)
    elif args.use_scaled_rope:
        freqs = freqs / rope_scaling_divisors(args, freqs)
    return freqs.float()


def rope_scaling_divisors(args: ModelArgs, freqs: torch.Tensor) -> torch.Tensor:
    """By how much Llama 3.1 scaling divides each frequency (1 = unchanged, factor = fully)."""
    factor, low, high = args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_context = args.rope_original_max_seq_len
    wavelen = 2 * math.pi / freqs
    smooth = ((old_context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    # smooth = 0 (long wavelengths): divide by factor; smooth = 1 (short): keep.
    return 1.0 / ((1 - smooth) / factor + smooth)


def rope_tables(args: ModelArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, cos and ±sin of each pair's angle laid out like the pairs themselves:
    cos = [c0, c0, c1, c1, ...], sin = [-s0, s0, -s1, s1, ...]; each (max_seq_len, head_dim), float32."""
    freqs = rope_frequencies(args).to(device)
    angles = torch.outer(torch.arange(args.max_seq_len, device=device, dtype=torch.float32), freqs)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its angle:

        (x0, x1) -> (x0·cos - x1·sin, x1·cos + x0·sin)

    the real-valued form of Meta's complex multiplication (x0 + i·x1)·(cos + i·sin), written as
    x·cos + swap(x)·sin with the tables from ``rope_tables`` (swap exchanges the two of each pair).
    x: (batch, seq, heads, head_dim); cos, sin: (batch or 1, seq, 1, head_dim).
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (xf * cos + swapped * sin).type_as(x)


# ------------------------------------------------------------------------- KV cache
class KVCache(nn.Module):
    """Static key/value buffers for every layer: (n_layers, batch, n_kv_heads, seq, head_dim).

    Row b of the cache holds the sequence in row b of the batch; position p of a row holds
    the keys and values of that sequence's token p. The caller allocates it and passes it
    to ``Transformer.forward``; ``start_pos`` says where the new tokens go.
    """

    def __init__(self, args: ModelArgs, max_batch_size: int | None = None, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.max_batch_size = max_batch_size or args.max_batch_size
        self.max_seq_len = max_seq_len or args.max_seq_len
        shape = (args.n_layers, self.max_batch_size, args.kv_heads, self.max_seq_len, args.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows [start, stop) that shares this cache's memory (for per-row prefill)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.max_batch_size, view.max_seq_len = stop - start, self.max_seq_len
        view.register_buffer("k", self.k[:, start:stop], persistent=False)
        view.register_buffer("v", self.v[:, start:stop], persistent=False)
        return view

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v (batch, seq, n_kv_heads, head_dim) at positions (batch or 1, seq);
        return this layer's keys and values for positions < kv_len, (batch, n_kv_heads, kv_len, head_dim)."""
        batch, seq = k.shape[:2]
        kc, vc = self.k[layer], self.v[layer]
        if positions.shape[0] == 1:  # every row at the same positions: a plain slice
            start = int(positions[0, 0])
            kc[:batch, :, start:start + seq] = k.transpose(1, 2)
            vc[:batch, :, start:start + seq] = v.transpose(1, 2)
        else:  # each row at its own positions
            rows = torch.arange(batch, device=k.device)[:, None]
            kc[rows, :, positions] = k.to(kc.dtype)  # indexes (batch, seq) -> (batch, seq, heads, head_dim)
            vc[rows, :, positions] = v.to(vc.dtype)
        return kc[:batch, :, :kv_len], vc[:batch, :, :kv_len]


# ------------------------------------------------------------------------ attention
class Attention(nn.Module):
    """Multi-head attention with grouped-query heads: n_heads queries share n_kv_heads K/V."""

    def __init__(self, args: ModelArgs, layer_id: int = 0, device=None):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.n_rep = args.n_rep
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False, device=device)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False, device=device)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False, device=device)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False, device=device)
        self.wqkv: nn.Module | None = None  # wq, wk, wv in one matrix (set by llama3.quantize.fuse)
        self.tap: Tap | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None, kv_len: int, mask: torch.Tensor | None,
                row_lens: list[int] | None = None) -> torch.Tensor:
        """``mask`` (batch or 1, 1, seq, keys) says which keys each query sees; None: all of them
        (one new token attending to the whole cache) or, without a cache, plain causal.
        ``row_lens``: one new token per row, row b attending to its first row_lens[b] keys."""
        batch, seq, _ = x.shape
        tap = self.tap
        heads = self.n_heads + self.n_kv_heads
        if self.wqkv is not None:  # q and k are adjacent in the fused output: rotate them in one go
            qkv = self.wqkv(x)
            qk = qkv[..., :heads * self.head_dim].view(batch, seq, heads, self.head_dim)
            v = qkv[..., heads * self.head_dim:].view(batch, seq, self.n_kv_heads, self.head_dim)
        else:
            qk = torch.cat([self.wq(x), self.wk(x)], dim=-1).view(batch, seq, heads, self.head_dim)
            v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)  # (batch, seq, n_kv_heads, head_dim)
        if tap:
            tap("q", qk[:, :, :self.n_heads]), tap("k", qk[:, :, self.n_heads:]), tap("v", v)
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :, :self.n_heads], qk[:, :, self.n_heads:]  # (batch, seq, n_heads / n_kv_heads, head_dim)
        if tap:
            tap("q_rope", q), tap("k_rope", k)

        if cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # (batch, n_kv_heads, seq, head_dim)
        else:
            keys, values = cache.update(self.layer_id, positions, k, v, kv_len)  # (batch, n_kv_heads, kv_len, hd)
        q = q.transpose(1, 2)  # (batch, n_heads, seq, head_dim)
        causal = cache is None and mask is None
        if tap:
            rep_k = keys.float().repeat_interleave(self.n_rep, dim=1)  # each KV head serves n_rep query heads
            scores = (q.float() @ rep_k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if causal:
                mask_ = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
            else:
                mask_ = mask if mask is not None else torch.ones(1, dtype=torch.bool, device=x.device)
            scores = scores.masked_fill(~mask_, float("-inf"))
            tap("scores", scores)
            tap("probs", torch.softmax(scores, dim=-1))
        out = None
        if cache is not None and seq == 1 and tap is None and (row_lens is not None or mask is None):
            # Decode: one new token per row over its own keys, in a small C kernel (llama3.kernels) that
            # computes every row alike whatever the batch; None where it cannot run (then SDPA below).
            lens = row_lens if row_lens is not None else [kv_len] * batch
            out = kernels.attention_decode(q[:, :, 0], cache.k[self.layer_id][:batch], cache.v[self.layer_id][:batch],
                                           lens, 1.0 / math.sqrt(self.head_dim))
        if out is not None:
            out = out[:, :, None]  # (batch, n_heads, 1, head_dim)
        # Grouped-query attention without copying K/V: SDPA lets n_rep query heads share each KV head.
        elif row_lens is not None:  # batched decode: each row exactly as it would run alone (batch-invariant)
            out = torch.cat([F.scaled_dot_product_attention(q[b:b + 1], keys[b:b + 1, :, :n].to(q.dtype),
                                                            values[b:b + 1, :, :n].to(q.dtype),
                                                            enable_gqa=self.n_rep > 1)
                             for b, n in enumerate(row_lens)])
        else:
            out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                                 is_causal=causal, enable_gqa=self.n_rep > 1)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)  # (batch, seq, dim)
        if tap:
            tap("heads_concat", out)
        out = self.wo(out)
        if tap:
            tap("out", out)
        return out


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1·x) * w3·x). w1 is the gate, w3 the up projection, w2 the down."""

    def __init__(self, dim: int, hidden_dim: int, device=None):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False, device=device)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False, device=device)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False, device=device)
        self.w13: nn.Module | None = None  # w1 and w3 in one matrix (set by llama3.quantize.fuse)
        self.tap: Tap | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tap = self.tap
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        act = F.silu(gate) * up
        down = self.w2(act)
        if tap:
            tap("gate", gate), tap("up", up), tap("silu_gate_x_up", act), tap("down", down)
        return down


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, device=None):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, layer_id, device)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, device)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps, device=device)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps, device=device)
        self.tap: Tap | None = None

    def forward(self, x, cos, sin, positions, cache, kv_len, mask, row_lens=None):
        tap = self.tap
        xn = self.attention_norm(x)
        if tap:
            tap("attention_norm", xn)
        h = x + self.attention(xn, cos, sin, positions, cache, kv_len, mask, row_lens)  # joins the residual
        hn = self.ffn_norm(h)
        if tap:
            tap("residual_attn", h), tap("ffn_norm", hn)
        out = h + self.feed_forward(hn)
        if tap:
            tap("residual_ffn", out)
        return out


def causal_mask(positions: torch.Tensor, kv_len: int, cached: bool) -> torch.Tensor | None:
    """Which keys each query sees: the query at position p sees keys at positions <= p.

    With a cache the keys are positions 0..kv_len-1 of each row (stale entries past a row's
    length sit at positions > p, so they stay hidden). None when no mask is needed: one token
    at the end of every row sees the whole cache; without a cache, plain causal attention."""
    batch, seq = positions.shape
    if not cached:
        return None if batch == 1 else positions[:, None, None, :] <= positions[:, None, :, None]
    if seq == 1 and batch == 1 and int(positions[0, 0]) == kv_len - 1:
        return None
    key_pos = torch.arange(kv_len, device=positions.device)
    return key_pos[None, None, None, :] <= positions[:, None, :, None]  # (batch or 1, 1, seq, kv_len)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, device=None):
        """``device="meta"`` builds the structure without memory; a loader then assigns tensors."""
        super().__init__()
        self.args = args
        self.vocab_size, self.n_layers = args.vocab_size, args.n_layers
        # nn.Embedding's N(0, 1) init, skipped on the meta device (normal_ there is slow to set up).
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim,
                                           _weight=torch.empty(args.vocab_size, args.dim, device=device))
        if not self.tok_embeddings.weight.is_meta:
            nn.init.normal_(self.tok_embeddings.weight)
        self.layers = nn.ModuleList(TransformerBlock(i, args, device) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps, device=device)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False, device=device)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight  # shared, not copied
        if self.tok_embeddings.weight.is_meta:  # the loader calls reset_rope() once tensors are real
            cos = sin = torch.empty(args.max_seq_len, args.head_dim, device="meta")
        else:
            cos, sin = rope_tables(args, device=self.tok_embeddings.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.tap: Tap | None = None

    def reset_rope(self, device=None) -> None:
        """Recompute the RoPE tables (after building on the meta device, or changing args)."""
        device = device or self.norm.weight.device
        self.rope_cos, self.rope_sin = rope_tables(self.args, device=device)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings and isinstance(self.tok_embeddings, nn.Embedding) \
                and isinstance(self.output, nn.Linear):
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (batch, seq, vocab_size), float32, for tokens (batch, seq); with ``last_only``,
        (batch, 1, vocab_size) for the last position only (prefill needs no more: it skips the
        output projection, the largest matrix of small models, for every other position).

        ``start_pos`` is the position of tokens[:, 0]: an int for the whole batch or a
        (batch,) tensor, one per row. With a cache, the new keys and values are written at
        those positions and each token attends to everything before it in its row; without
        one, the tokens attend only to each other (causally).
        """
        positions, kv_len = self._check(tokens, start_pos, cache)
        tap = self.tap
        cos = self.rope_cos[positions].unsqueeze(2)  # (batch or 1, seq, 1, head_dim)
        sin = self.rope_sin[positions].unsqueeze(2)
        batch, seq = tokens.shape
        row_lens = None
        if cache is not None and seq == 1 and batch > 1 and self.tap is None:
            # One new token per row: attend row by row over each row's own length, so that every row
            # computes exactly what it would alone (a shared padded mask changes the last bits).
            row_lens, mask = [int(p) + 1 for p in positions.expand(batch, 1)[:, 0].tolist()], None
        else:
            mask = causal_mask(positions, kv_len, cache is not None)
        h = self.tok_embeddings(tokens)  # (batch, seq, dim)
        if tap:
            tap("embeddings", h)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, cache, kv_len, mask, row_lens)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        logits = self.output(h).float()
        if tap:
            tap("norm", h), tap("logits", logits)
        return logits

    def _check(self, tokens, start_pos, cache):
        """Validate the input; return positions (batch or 1, seq) and the attended length."""
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        batch, seq = tokens.shape
        if seq == 0:
            raise ValueError("tokens is empty: give at least one token")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        device = tokens.device
        if isinstance(start_pos, torch.Tensor):
            if start_pos.shape != (batch,):
                raise ValueError(f"start_pos must be an int or a ({batch},) tensor, got shape {tuple(start_pos.shape)}")
            start_pos = start_pos.to(device=device, dtype=torch.long)
            first, last = int(start_pos.min()), int(start_pos.max())
            positions = start_pos[:, None] + torch.arange(seq, device=device)[None, :]
        else:
            first = last = int(start_pos)
            positions = torch.arange(first, first + seq, device=device)[None, :]
        if first < 0:
            raise ValueError(f"start_pos must be >= 0, got {first}")
        end = last + seq
        if end > self.args.max_seq_len:
            raise ValueError(f"{end} positions exceed the model's context of {self.args.max_seq_len} "
                             f"(start_pos {last} + {seq} tokens)")
        if cache is not None:
            if batch > cache.max_batch_size:
                raise ValueError(f"batch of {batch} exceeds the cache's {cache.max_batch_size} rows")
            if end > cache.max_seq_len:
                raise ValueError(f"{end} positions exceed the cache's {cache.max_seq_len} "
                                 f"(start_pos {last} + {seq} tokens)")
        return positions, end
