"""The logit lens (nostalgebraist, 2020): read each layer's residual stream through the final
norm and the output projection, as if the model stopped there, and see what it would predict."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .trace import Trace


@dataclass
class LensRow:
    layer: str  # "embeddings", "0", "1", ..., the last being the model's own prediction
    position: int
    token_ids: list[int]
    probs: list[float]


@torch.inference_mode()
def logit_lens(model, tokens: torch.Tensor, top_k: int = 5, positions: list[int] | None = None) -> list[LensRow]:
    """Top-k next tokens at each layer for the given positions (default: the last) of tokens (1, seq)."""
    n = model.n_layers
    names = {"embeddings"} | {f"layers.{i}.residual_ffn" for i in range(n)}
    with Trace(model, names=names, keep_on=tokens.device) as t:
        model(tokens)
    seq = tokens.shape[1]
    positions = [seq - 1] if positions is None else [p % seq for p in positions]
    rows = []
    stages = [("embeddings", t.records["embeddings"])] + \
        [(str(i), t.records[f"layers.{i}.residual_ffn"]) for i in range(n)]
    for label, h in stages:
        logits = model.output(model.norm(h[:, positions])).float()  # (1, len(positions), vocab)
        probs = torch.softmax(logits, dim=-1)[0]
        top = torch.topk(probs, top_k, dim=-1)
        for j, p in enumerate(positions):
            rows.append(LensRow(label, p, top.indices[j].tolist(), top.values[j].tolist()))
    return rows


def lens_table(rows: list[LensRow], decode) -> str:
    lines = [f"{'layer':>10} {'pos':>4}  top next tokens (probability)"]
    for r in rows:
        cells = "  ".join(f"{decode([i])!r} {p:.2f}" for i, p in zip(r.token_ids, r.probs))
        lines.append(f"{r.layer:>10} {r.position:>4}  {cells}")
    return "\n".join(lines)


def lens_heatmap(rows: list[LensRow], token_labels: list[str], decode, path: str) -> None:
    """Layers (rows) x positions (columns): colour = top-1 probability, text = top-1 token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(dict.fromkeys(r.layer for r in rows))
    positions = sorted({r.position for r in rows})
    grid = np.zeros((len(layers), len(positions)))
    text = [["" for _ in positions] for _ in layers]
    for r in rows:
        i, j = layers.index(r.layer), positions.index(r.position)
        grid[i, j] = r.probs[0]
        token = decode([r.token_ids[0]])
        text[i][j] = (token.replace(" ", "\u2423") if not token.strip() else token).replace("\n", "\\n")[:8]
    width = max(6.0, 0.9 * len(positions) + 2)
    height = max(4.0, 0.32 * len(layers) + 1.5)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    font = 8 if len(positions) <= 20 else 6
    if len(positions) <= 60:
        for i in range(len(layers)):
            for j in range(len(positions)):
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=font,
                        color="white" if grid[i, j] < 0.6 else "black")
    ax.set_yticks(range(len(layers)), labels=layers, fontsize=7)
    ax.set_xticks(range(len(positions)), labels=[token_labels[p] for p in positions], rotation=60, ha="right",
                  fontsize=font)
    ax.set_xlabel("input token (the prediction is for the next one)")
    ax.set_ylabel("layer")
    ax.set_title("logit lens: top-1 next token per layer (colour = its probability)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
