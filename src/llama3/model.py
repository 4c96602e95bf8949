"""The Llama 3 transformer, read top to bottom.

This is Meta's ``llama/model.py`` (meta-llama/llama3; Llama 3.1/3.2 additions from
meta-llama/llama-models) without fairscale, torchrun or CUDA assumptions:

    tokens ─► tok_embeddings ─► n_layers × TransformerBlock ─► norm ─► output ─► logits
    TransformerBlock:  h = x + Attention(RMSNorm(x));  out = h + FeedForward(RMSNorm(h))

Parameter names are Meta's, so a Meta state dict loads with ``load_state_dict``.
Rotary embeddings use Meta's layout: adjacent pairs (2i, 2i+1) of each head rotate
together. (Hugging Face checkpoints rotate halves instead; their loader converts.)

The model holds no request state: a key/value cache is passed in by the caller. ``KVCache`` below
is the plain one (one row per sequence); ``llama3.engine`` has a paged one with the same two
methods. Every named stage passes through ``self.tap(name, tensor)``, which returns the tensor
unchanged unless ``llama3.explain.Trace`` is recording.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs


def no_tap(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The default tap: nothing recorded, the tensor passes through."""
    return tensor


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


def rope_angles(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and ±sin of each pair's angle (position × frequency) laid out like the pairs themselves:
    cos = [c0, c0, c1, c1, ...], sin = [-s0, s0, -s1, s1, ...]; positions (batch or 1, seq) give
    (batch or 1, seq, 1, head_dim) in float32. Computed per call, so no table bounds the context."""
    angles = positions[..., None].float() * freqs  # (batch or 1, seq, head_dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return cos.repeat_interleave(2, dim=-1)[:, :, None], torch.stack((-sin, sin), dim=-1).flatten(-2)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its angle:

        (x0, x1) -> (x0·cos - x1·sin, x1·cos + x0·sin)

    the real-valued form of Meta's complex multiplication (x0 + i·x1)·(cos + i·sin), written as
    x·cos + swap(x)·sin with the layout of ``rope_angles`` (swap exchanges the two of each pair).
    x: (batch, seq, heads, head_dim).
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (xf * cos + swapped * sin).type_as(x)


# ------------------------------------------------------------------------- KV cache
class KVCache(nn.Module):
    """Static key/value buffers for every layer: (n_layers, batch, n_kv_heads, seq, head_dim).

    Row b holds the sequence in row b of the batch, position p its token p. A cache has two methods,
    which ``Transformer.forward`` calls: ``prepare(positions)`` once per call (where the new keys go;
    returns the attention mask) and ``update(layer, k, v)`` in every layer (store, return all keys).
    """

    def __init__(self, args: ModelArgs, max_batch_size: int | None = None, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.max_batch_size = max_batch_size or args.max_batch_size
        self.max_seq_len = max_seq_len or args.max_seq_len
        shape = (args.n_layers, self.max_batch_size, args.kv_heads, self.max_seq_len, args.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def prepare(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Which keys each query sees: the one at position p sees positions <= p of its row (so stale
        entries past a row's length stay hidden). None when that is every key (a single new token at
        the end of a single row) or plain causal attention (a single row filled from position 0)."""
        self.positions = positions
        self.kv_len = int(positions.max()) + 1  # one host read per forward, not per layer
        batch, seq = positions.shape
        if batch == 1 and int(positions[0, 0]) in (0, self.kv_len - 1):
            return None
        keys = torch.arange(self.kv_len, device=positions.device)
        return keys[None, None, None, :] <= positions[:, None, :, None]  # (batch or 1, 1, seq, kv_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, n_kv_heads, seq, head_dim) at the prepared positions; return the layer's
        keys and values up to the longest row, (batch, n_kv_heads, kv_len, head_dim)."""
        batch = k.shape[0]
        rows = torch.arange(batch, device=k.device)[:, None]
        pos = self.positions.expand(batch, -1)  # (batch, seq)
        self.k[layer][rows, :, pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed as (batch, seq, heads, hd)
        self.v[layer][rows, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[layer, :batch, :, :self.kv_len], self.v[layer, :batch, :, :self.kv_len]


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
        self.tap = no_tap

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache=None) -> torch.Tensor:
        """``mask`` (batch or 1, 1, seq, keys) says which keys each query sees; None: every key, or
        plain causal attention when several new tokens attend to each other."""
        batch, seq, _ = x.shape
        tap = self.tap
        q = tap("q", self.wq(x).view(batch, seq, self.n_heads, self.head_dim))
        k = tap("k", self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim))
        v = tap("v", self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim))
        q = tap("q_rope", apply_rope(q, cos, sin)).transpose(1, 2)  # (batch, n_heads, seq, head_dim)
        k = tap("k_rope", apply_rope(k, cos, sin)).transpose(1, 2)  # (batch, n_kv_heads, seq, head_dim)
        v = v.transpose(1, 2)
        if cache is not None:  # the keys and values of earlier positions join the new ones
            k, v = cache.update(self.layer_id, k, v)  # (batch, n_kv_heads, keys, head_dim)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if seq == 1 and self.n_rep > 1:
            # One new token: the n_rep query heads sharing a KV head are that head's n_rep queries, so
            # attention runs with plain heads (batch, n_kv_heads, n_rep, head_dim) and never copies K/V
            # (enable_gqa does, n_rep times, on the SDPA kernels without grouped heads: math, efficient).
            out = F.scaled_dot_product_attention(q.reshape(batch, self.n_kv_heads, self.n_rep, self.head_dim), k, v,
                                                 attn_mask=mask).view(batch, self.n_heads, 1, self.head_dim)
        else:  # grouped-query attention: SDPA lets n_rep query heads share each KV head
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                                 enable_gqa=self.n_rep > 1)
        out = tap("heads_concat", out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))
        return tap("out", self.wo(out))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1·x) * w3·x). w1 is the gate, w3 the up projection, w2 the down."""

    def __init__(self, dim: int, hidden_dim: int, device=None):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False, device=device)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False, device=device)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False, device=device)
        self.tap = no_tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tap = self.tap
        act = tap("silu_gate_x_up", F.silu(tap("gate", self.w1(x))) * tap("up", self.w3(x)))
        return tap("down", self.w2(act))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, device=None):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, layer_id, device)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, device)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps, device=device)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps, device=device)
        self.tap = no_tap

    def forward(self, x, cos, sin, mask, cache=None):
        tap = self.tap
        h = x + self.attention(tap("attention_norm", self.attention_norm(x)), cos, sin, mask, cache)
        h = tap("residual_attn", h)  # attention joins the residual stream
        return tap("residual_ffn", h + self.feed_forward(tap("ffn_norm", self.ffn_norm(h))))


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
        self.register_buffer("rope_freqs", rope_frequencies(args).to(device), persistent=False)
        self.tap = no_tap

    def reset_rope(self, device=None) -> None:
        """Recompute the RoPE frequencies (after building on the meta device, or changing args)."""
        self.rope_freqs = rope_frequencies(self.args).to(device or self.norm.weight.device)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings and isinstance(self.tok_embeddings, nn.Embedding) \
                and isinstance(self.output, nn.Linear):
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, cache=None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (batch, seq, vocab_size), float32, for tokens (batch, seq); with ``last_only``,
        (batch, 1, vocab_size) for the last position only (prefill needs no more: it skips the
        output projection, the largest matrix of small models, for every other position).

        ``start_pos`` is the position of tokens[:, 0]: an int for the whole batch or a (batch,)
        tensor, one per row. With a cache, the new keys and values are stored at those positions
        and each token attends to everything before it in its row; without one, the tokens
        attend only to each other (causally).
        """
        batch, seq = tokens.shape
        offsets = torch.arange(seq, device=tokens.device)
        positions = (start_pos + offsets)[None] if isinstance(start_pos, int) else start_pos[:, None] + offsets
        cos, sin = rope_angles(self.rope_freqs, positions)
        mask = cache.prepare(positions) if cache is not None else None
        h = self.tap("embeddings", self.tok_embeddings(tokens))  # (batch, seq, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        if last_only:
            h = h[:, -1:]
        h = self.tap("norm", self.norm(h))
        return self.tap("logits", self.output(h).float())
