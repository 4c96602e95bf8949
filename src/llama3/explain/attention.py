"""Attention maps as pictures: one heatmap per head, or a grid of heads, tokens on both axes."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .trace import Trace


@torch.inference_mode()
def attention_maps(model, tokens: torch.Tensor, layer: int) -> np.ndarray:
    """Attention probabilities of one layer for tokens (1, seq): (n_heads, seq, seq), rows sum to 1."""
    with Trace(model, layers=[layer]) as t:
        model(tokens)
    name = f"layers.{t.layers[0]}.attention.probs"
    return t.records[name][0].float().numpy()


def _labels(tokens: list[str]) -> list[str]:
    out = []
    for i, s in enumerate(tokens):
        s = s.replace("\n", "\\n").replace("\t", "\\t")
        s = s if len(s) <= 12 else s[:11] + "…"
        out.append(f"{i}:" + (s if s.strip() else repr(s)))
    return out


def _norm(probs: np.ndarray):
    from matplotlib.colors import PowerNorm

    # A square-root colour scale: attention sinks (the first token) would otherwise drown the rest.
    return PowerNorm(0.5, vmin=0, vmax=float(probs.max()) or 1.0)


def _draw(ax, probs: np.ndarray, labels: list[str], title: str, norm, x_labels: bool, y_labels: bool,
          font: float | None = None):
    """One head's (seq, seq) map on ``ax``, token labels on the axes asked for (tick numbers where they
    cannot fit: past 60 tokens every other one is labelled)."""
    n = len(labels)
    im = ax.imshow(probs, cmap="magma", norm=norm, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    step = 1 if n <= 60 else 2  # every label while they fit, else every other one
    ticks = list(range(0, n, step))
    font = font or (9 if n <= 20 else 7 if n <= 50 else 6)
    shown = [labels[i] for i in ticks]
    ax.set_xticks(ticks, labels=shown if x_labels else [], rotation=90, fontsize=font)
    ax.set_yticks(ticks, labels=shown if y_labels else [], fontsize=font)
    ax.tick_params(length=2 if x_labels or y_labels else 0)
    if x_labels:
        ax.set_xlabel("key (attended to)", fontsize=8)
    if y_labels:
        ax.set_ylabel("query", fontsize=8)
    return im


def head_figure(probs: np.ndarray, token_texts: list[str], layer: int, head: int):
    """A matplotlib Figure of one head's attention (seq, seq): tokens on both axes, a colour bar."""
    import matplotlib.pyplot as plt

    n = len(token_texts)
    side = min(20.0, max(5.0, 0.18 * n + 3))
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    im = _draw(ax, probs, _labels(token_texts), f"layer {layer}, head {head}", _norm(probs), True, True)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    fig.tight_layout()
    return fig


def grid_figure(probs: np.ndarray, token_texts: list[str], layer: int):
    """A matplotlib Figure of every head of a layer (n_heads, seq, seq) on one colour scale: token labels
    on the left column and the bottom row, one colour bar for all."""
    import matplotlib.pyplot as plt

    n_heads, n, _ = probs.shape
    labels, norm = _labels(token_texts), _norm(probs)
    cols = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    cell = min(6.0, max(3.2, 0.09 * n + 1.5))  # room for the labels as the prompt grows
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1.5, cell * rows + 1), dpi=100, squeeze=False,
                             layout="constrained")
    font = 7 if n <= 20 else 5 if n <= 50 else 4
    im = None
    for h in range(rows * cols):
        r, c = divmod(h, cols)
        ax = axes[r][c]
        if h >= n_heads:
            ax.axis("off")
            continue
        bottom = h + cols >= n_heads  # no head below this one
        im = _draw(ax, probs[h], labels, f"head {h}", norm, x_labels=bottom, y_labels=c == 0, font=font)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention probability")
    fig.suptitle(f"layer {layer}: attention of every head ({n} tokens; rows = queries)")
    return fig


def save_attention_pngs(probs: np.ndarray, token_texts: list[str], out_dir: str, layer: int,
                        head: int | None = None) -> list[str]:
    """Write PNG heatmaps (one per head, plus a grid of all heads) and the numbers as .npy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    n_heads = probs.shape[0]
    heads = range(n_heads) if head is None else [head]
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"head {head} does not exist: layer {layer} has heads 0..{n_heads - 1}")
    written = []
    for h in heads:
        fig = head_figure(probs[h], token_texts, layer, h)
        path = os.path.join(out_dir, f"layer{layer}_head{h}.png")
        fig.savefig(path)
        plt.close(fig)
        np.save(os.path.join(out_dir, f"layer{layer}_head{h}.npy"), probs[h])
        written += [path, os.path.join(out_dir, f"layer{layer}_head{h}.npy")]
    if head is None:
        fig = grid_figure(probs, token_texts, layer)
        path = os.path.join(out_dir, f"layer{layer}_heads.png")
        fig.savefig(path)
        plt.close(fig)
        np.save(os.path.join(out_dir, f"layer{layer}.npy"), probs)
        written += [path, os.path.join(out_dir, f"layer{layer}.npy")]
    return written
