"""Embeddings: one vector per text from the model's final hidden states.

``embed(llm, texts)`` runs each text through the model (BOS first where the tokenizer adds one)
and pools the last block's output after the final RMSNorm, the vectors the output projection
reads: ``pooling="mean"`` averages them over the text's tokens, ``pooling="last"`` takes the last
token's (which has attended to the whole text). A decoder trained for next-token prediction is not
an embedding model: these vectors serve clients that need ``/v1/embeddings`` to answer, and
similarity search works only roughly with them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .evaluate import _padded, final_hidden_states, min_rows

POOLINGS = ("mean", "last")


@torch.inference_mode()
def embed(llm, texts: str | Sequence[str] | Sequence[Sequence[int]], pooling: str = "mean", normalize: bool = True,
          batch_size: int = 8) -> torch.Tensor:
    """Embeddings (n, dim), float32 on the CPU, one row per text (or per list of token ids), in order;
    ``normalize`` scales each row to unit L2 norm. A text longer than the context is an error."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("give at least one text to embed")
    limit = llm.generator.context
    rows = []
    for i, t in enumerate(texts):
        ids = llm.encode_prompt(t)
        if not ids:
            raise ValueError(f"input {i} is empty: there is nothing to embed")
        if len(ids) > limit:
            raise ValueError(f"input {i} has {len(ids)} tokens, more than the context of {limit}")
        rows.append(ids)
    out = torch.empty(len(rows), llm.args.dim, dtype=torch.float32)
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k]))  # similar lengths batch together
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        h = final_hidden_states(llm.model, _padded([rows[k] for k in chunk], min_rows(llm.model)))  # (batch, seq, dim)
        h = h.float().cpu()
        for j, k in enumerate(chunk):
            n = len(rows[k])
            out[k] = h[j, :n].mean(0) if pooling == "mean" else h[j, n - 1]
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out
