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


def _draw(ax, probs: np.ndarray, labels: list[str], title: str, show_labels: bool):
    n = len(labels)
    from matplotlib.colors import PowerNorm

    # A square-root colour scale: attention sinks (the first token) would otherwise drown the rest.
    im = ax.imshow(probs, cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=float(probs.max()) or 1.0),
                   interpolation="nearest")
    ax.set_title(title, fontsize=10)
    if show_labels:
        step = 1 if n <= 60 else 2  # every label while they fit, else every other one
        ticks = list(range(0, n, step))
        font = 9 if n <= 20 else 7 if n <= 50 else 6
        ax.set_xticks(ticks, labels=[labels[i] for i in ticks], rotation=90, fontsize=font)
        ax.set_yticks(ticks, labels=[labels[i] for i in ticks], fontsize=font)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return im


def save_attention_pngs(probs: np.ndarray, token_texts: list[str], out_dir: str, layer: int,
                        head: int | None = None) -> list[str]:
    """Write PNG heatmaps (one per head, plus a grid of all heads) and the numbers as .npy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    labels = _labels(token_texts)
    n_heads, n, _ = probs.shape
    heads = range(n_heads) if head is None else [head]
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"head {head} does not exist: layer {layer} has heads 0..{n_heads - 1}")
    written = []
    side = min(20.0, max(5.0, 0.18 * n + 3))
    for h in heads:
        fig, ax = plt.subplots(figsize=(side, side), dpi=100)
        im = _draw(ax, probs[h], labels, f"layer {layer}, head {h}", show_labels=True)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        path = os.path.join(out_dir, f"layer{layer}_head{h}.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
        np.save(os.path.join(out_dir, f"layer{layer}_head{h}.npy"), probs[h])
        written.append(os.path.join(out_dir, f"layer{layer}_head{h}.npy"))
    if head is None:
        cols = math.ceil(math.sqrt(n_heads))
        rows = math.ceil(n_heads / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            if h < n_heads:
                _draw(ax, probs[h], labels, f"head {h}", show_labels=False)
            else:
                ax.axis("off")
        fig.suptitle(f"layer {layer}: attention of every head ({n} tokens; rows = queries)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"layer{layer}_heads.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
        np.save(os.path.join(out_dir, f"layer{layer}.npy"), probs)
        written.append(os.path.join(out_dir, f"layer{layer}.npy"))
    return written
