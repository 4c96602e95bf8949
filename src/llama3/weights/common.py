"""What every checkpoint reader shares: the error type, shape checks, and model assembly."""

from __future__ import annotations

import os
from typing import Mapping

import torch

from ..config import ModelArgs


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Meta-named state dict and its shape (output omitted when tied)."""
    d, hd, hidden = args.dim, args.head_dim, args.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    if not args.tie_word_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (hidden, d),
            p + "feed_forward.w2.weight": (d, hidden),
            p + "feed_forward.w3.weight": (hidden, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    return shapes


def check_state_dict(path, args: ModelArgs, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse a state dict with a missing, unexpected or misshapen tensor."""
    shapes = expected_shapes(args)
    extra = set(state) - set(shapes)
    if args.tie_word_embeddings:
        extra.discard("output.weight")  # some tied checkpoints still carry a copy
    if extra:
        raise CheckpointError(path, f"unexpected tensor(s) {sorted(extra)[:5]} for this configuration")
    missing = [name for name in shapes if name not in state]
    if missing:
        raise CheckpointError(path, f"missing tensor(s) {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(path, f"tensor {name} has shape {tuple(state[name].shape)}, "
                                        f"expected {shape} for this configuration")
