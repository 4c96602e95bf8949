"""Record what happens inside one forward pass: named taps, a context manager, and statistics.

    with Trace(model, layers=[0, -1]) as t:
        logits = model(tokens)
    t.records["layers.0.attention.probs"]   # (batch, n_heads, seq, seq)

Every named stage of the model passes through its module's ``tap(name, tensor)``; ``Trace`` swaps
in a recording tap on entry and always puts the pass-through ``no_tap`` back on exit, even when the
forward pass raises. The model never computes attention scores or probabilities on their own (it
calls SDPA), so ``Trace`` recomputes them here from the tapped queries and keys after RoPE:
scores = q·kᵀ / sqrt(head_dim) with each KV head serving its group of query heads, the causal mask
as -inf, probs = softmax(scores). (Trace a forward pass without a cache: then the tapped keys are
every key the queries see.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model import Transformer, no_tap

_DERIVED = ("attention.scores", "attention.probs")


class Trace:
    def __init__(self, model: Transformer, layers: list[int] | None = None, names: set[str] | None = None,
                 keep_on: str | torch.device = "cpu"):
        n = model.n_layers
        chosen = range(n) if layers is None else layers
        self.model, self.names, self.keep_on = model, names, keep_on
        self.layers = sorted({i % n if -n <= i < n else _bad_layer(i, n) for i in chosen})
        self.records: dict[str, torch.Tensor] = {}

    def _wanted(self, full: str) -> bool:
        if self.names is None or full in self.names:
            return True
        # queries and keys after RoPE are needed to recompute requested scores or probabilities
        base = full.rsplit(".", 1)[0]
        return full.endswith(("attention.q_rope", "attention.k_rope")) and \
            any(f"{base}.{d.split('.')[1]}" in self.names for d in _DERIVED)

    def _tap(self, prefix: str):
        def tap(name: str, tensor: torch.Tensor) -> torch.Tensor:
            full = prefix + name
            if self._wanted(full):
                self.records[full] = tensor.detach().to(self.keep_on, copy=True)
            return tensor
        return tap

    def _targets(self):
        yield self.model, ""
        for i in self.layers:
            block = self.model.layers[i]
            yield block, f"layers.{i}."
            yield block.attention, f"layers.{i}.attention."
            yield block.feed_forward, f"layers.{i}.feed_forward."

    def __enter__(self) -> "Trace":
        self.records.clear()
        for module, prefix in self._targets():
            module.tap = self._tap(prefix)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for module, _ in self._targets():
            module.tap = no_tap
        if exc_type is None:
            self._add_attention()

    def _add_attention(self) -> None:
        """Insert scores and probabilities after each traced layer's keys (records keep stage order)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in self.records.items():
            out[name] = t
            if name.endswith("attention.k_rope") and name[:-len("k_rope")] + "q_rope" in self.records:
                base = name[:-len("k_rope")]
                scores, probs = attention_probs(self.records[base + "q_rope"], t)
                for key, value in ((base + "scores", scores), (base + "probs", probs)):
                    if self.names is None or key in self.names:
                        out[key] = value
        if self.names is not None:
            out = {k: v for k, v in out.items() if k in self.names}
        self.records = out


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of queries q (batch, seq, n_heads, head_dim) over keys k (batch, seq, n_kv_heads,
    head_dim): (scores, probs), each (batch, n_heads, seq, seq), float32."""
    n_rep = q.shape[2] // k.shape[2]
    qf = q.float().transpose(1, 2)  # (batch, n_heads, seq, head_dim)
    kf = k.float().transpose(1, 2).repeat_interleave(n_rep, dim=1)  # each KV head serves n_rep query heads
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    seq = q.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return scores, torch.softmax(scores, dim=-1)


def _bad_layer(i: int, n: int) -> int:
    raise ValueError(f"layer {i} does not exist: the model has layers 0..{n - 1} (or -{n}..-1)")


@dataclass
class Stats:
    shape: tuple[int, ...]
    dtype: str
    mean: float
    std: float
    min: float
    max: float
    rms: float


def stats(t: torch.Tensor) -> Stats:
    f = t.float()
    finite = f[torch.isfinite(f)]
    if finite.numel() == 0:
        finite = torch.zeros(1)
    return Stats(tuple(t.shape), str(t.dtype).replace("torch.", ""), float(finite.mean()),
                 float(finite.std()) if finite.numel() > 1 else 0.0, float(finite.min()), float(finite.max()),
                 float(finite.pow(2).mean().sqrt()))


DESCRIPTIONS = {
    "embeddings": "token embeddings (the residual stream starts here)",
    "attention_norm": "RMSNorm before attention",
    "attention.q": "queries (batch, seq, n_heads, head_dim)",
    "attention.k": "keys (batch, seq, n_kv_heads, head_dim)",
    "attention.v": "values (batch, seq, n_kv_heads, head_dim)",
    "attention.q_rope": "queries after rotary embeddings",
    "attention.k_rope": "keys after rotary embeddings",
    "attention.scores": "q·k / sqrt(head_dim), causal mask = -inf (batch, n_heads, seq, keys)",
    "attention.probs": "softmax of the scores: each row sums to 1",
    "attention.heads_concat": "probs·v for every head, concatenated (batch, seq, dim)",
    "attention.out": "output projection wo",
    "residual_attn": "residual stream + attention",
    "ffn_norm": "RMSNorm before the feed-forward",
    "feed_forward.gate": "w1·x (gate)",
    "feed_forward.up": "w3·x (up)",
    "feed_forward.silu_gate_x_up": "SiLU(gate) * up",
    "feed_forward.down": "w2 (down projection)",
    "residual_ffn": "residual stream + feed-forward (the block's output)",
    "norm": "final RMSNorm",
    "logits": "output projection: one score per vocabulary token",
}


def describe(name: str) -> str:
    key = name.split(".", 2)[2] if name.startswith("layers.") else name
    return DESCRIPTIONS.get(key, "")


def trace_text(records: dict[str, torch.Tensor], position: int | None = -1, group: str = "") -> str:
    """A table: one row per stage with its shape, dtype and statistics (at one position, or all)."""
    lines = [f"{'stage':<38} {'shape':<22} {'dtype':<8} {'mean':>9} {'std':>9} {'min':>9} {'max':>9} {'rms':>9}"]
    last_layer = None
    for name, t in records.items():
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if layer != last_layer and layer is not None:
            lines.append(f"-- block {layer} " + group)
        last_layer = layer
        view = _at_position(name, t, position)
        s = stats(view)
        lines.append(f"{name:<38} {str(tuple(t.shape)):<22} {s.dtype:<8} {s.mean:>9.4f} {s.std:>9.4f} "
                     f"{s.min:>9.4f} {s.max:>9.4f} {s.rms:>9.4f}  {describe(name)}")
    return "\n".join(lines)


def _at_position(name: str, t: torch.Tensor, position: int | None) -> torch.Tensor:
    if position is None:
        return t
    if name.endswith(("attention.scores", "attention.probs")):
        return t[:, :, position]  # the query row
    return t[:, position]
