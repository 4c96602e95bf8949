"""Decoders: how one step of the model runs over the paged cache.

A ``Decoder`` has two methods, which the batching loop calls:

    prefill(tokens, slot, start) -> logits (vocab,)     the tokens go at positions start.. of sequence
                                                       ``slot``; logits of the last one
    step(tokens, positions, slots) -> logits (B, vocab) one new token for each of B sequences

``TorchDecoder`` runs ``Transformer.forward`` (any device; the reference every other decoder is
tested against). ``CDecoder`` (llama3.engine.cdecoder) runs a whole decode step as one C call on
the CPU and prefills through ``Transformer.forward``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..model import Transformer
from .cache import PagedKVCache

PREFILL_CHUNK = 512  # prompts longer than this are prefilled in chunks of this many tokens


class Decoder:
    name = "decoder"

    def __init__(self, model: Transformer, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.device = model.norm.weight.device

    def prefill(self, tokens: Sequence[int], slot: int, start: int, all_logits: bool = False) -> torch.Tensor:
        """Logits (vocab,) float32 on the CPU after the last token; with ``all_logits``, (len(tokens), vocab):
        one row per position (row i predicts the token after tokens[i])."""
        raise NotImplementedError

    def step(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class TorchDecoder(Decoder):
    """``Transformer.forward`` over the paged cache. With ``batch_invariant`` (the default on CPUs) a
    batched step runs each sequence on its own, so a sequence's logits never depend on what it is batched
    with (a shared padded batch changes the last bits of the softmax sums); on GPUs one batched forward."""

    name = "torch"

    def __init__(self, model: Transformer, cache: PagedKVCache, batch_invariant: bool | None = None):
        super().__init__(model, cache)
        self.batch_invariant = self.device.type == "cpu" if batch_invariant is None else batch_invariant

    @torch.inference_mode()
    def prefill(self, tokens, slot, start, all_logits=False):
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        view = self.prefill_view(slot)
        out = []
        for s in range(0, ids.shape[1], PREFILL_CHUNK):
            logits = self.model(ids[:, s:s + PREFILL_CHUNK], start_pos=start + s, cache=view, last_only=not all_logits)
            out.append(logits[0].float().cpu())
        return torch.cat(out) if all_logits else out[-1][-1]

    def prefill_view(self, slot: int):
        """The cache as a prefill of sequence ``slot`` sees it."""
        return self.cache.view([slot])

    @torch.inference_mode()
    def step(self, tokens, positions, slots):
        if self.batch_invariant and len(tokens) > 1:
            return torch.cat([self.step([t], [p], [s]) for t, p, s in zip(tokens, positions, slots)])
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]
        start = positions[0] if len(tokens) == 1 else torch.tensor(list(positions), device=self.device)
        return self.model(ids, start_pos=start, cache=self.cache.view(slots))[:, -1].float().cpu()

    def describe(self) -> str:
        return f"Transformer.forward on {self.device.type}" + (", batch-invariant" if self.batch_invariant else "")
