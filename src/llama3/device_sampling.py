"""Sampling where the logits are: ``sampling.py``'s filters as batched tensor ops, one row per sequence, each
row with its own parameters, and one transfer of the chosen tokens (with their logprobs) per step.

Row b of ``pick`` does exactly what ``sampling.make_sampler(params[b])`` does to that row alone: penalties
(``apply_penalties``), then for sampled rows temperature, top-k, top-p and min-p, softmax, and a draw; greedy
rows take the argmax of the penalized logits. Each per-row filter is written so that a row whose parameter
disables it (top_k 0, top_p 1, min_p 0, penalty 1 / 0) comes out unchanged, bit for bit.

The draw. ``torch.multinomial(probs, 1, generator=g)`` is, in PyTorch's own implementation on CPUs and
GPUs, ``argmax(probs / q)`` with ``q ~ Exp(1)`` drawn by ``q.exponential_(generator=g)`` (the exponential
race: P(argmax = i) = p_i). ``pick`` draws q for row b from that row's generator in the same way, so with
the same generator it picks the same token as the CPU sampler, draw for draw. In the engine a sequence's
first token (from its prefill's logits) is drawn on the host with its CPU generator (``seq.rng``, seeded
with the request's seed); its decode steps draw with the same CPU generator when the model is on a CPU, so
CPU runs equal the CPU samplers exactly, and on a GPU with a CUDA generator seeded with the same seed
(``generator_for``): reproducible per seed on the device, but other noise than the CPU's (CUDA's Philox is
not the CPU's Mersenne twister).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .sampling import NEG_INF, SamplingParams


def host_to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device: pinned (the caching host allocator
    keeps the buffer until the copy is done), copied asynchronously."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


@dataclass
class SamplingBatch:
    """The parameters of B rows as (B, 1) device tensors, and which filters any row uses (known on the
    host, so the batch skips the others without reading anything back)."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # 1 for greedy rows (never used there)
    top_k: torch.Tensor  # int64; 0 keeps all
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    decodable: torch.Tensor  # int64: ids from here on are never chosen
    sampled_rows: list[int]  # the rows that draw (not greedy)
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool
    any_undecodable: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab: int, device: torch.device,
           decodable: Sequence[int] | None = None) -> "SamplingBatch":
        """``decodable[b]``: row b never picks ids >= it (a padded embedding); default all of ``vocab``."""
        decodable = list(decodable) if decodable is not None else [vocab] * len(params)
        k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        floats = torch.tensor([[1.0 if p.greedy else p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                                p.presence_penalty, p.frequency_penalty] for p in params], dtype=torch.float32)
        ints = torch.tensor([[p.greedy, kb, d] for p, kb, d in zip(params, k, decodable)], dtype=torch.int64)
        floats, ints = host_to_device(floats, device), host_to_device(ints, device)
        sampled = [p for p in params if not p.greedy]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        return cls(greedy=ints[:, 0:1].bool(), temperature=floats[:, 0:1], top_k=ints[:, 1:2], top_p=floats[:, 1:2],
                   min_p=floats[:, 2:3], repetition=floats[:, 3:4], presence=floats[:, 4:5],
                   frequency=floats[:, 5:6], decodable=ints[:, 2:3],
                   sampled_rows=rows, all_greedy=not sampled,
                   any_top_k=any(kb for kb, p in zip(k, params) if not p.greedy),
                   any_top_p=any(p.top_p < 1 for p in sampled), any_min_p=any(p.min_p > 0 for p in sampled),
                   any_penalty=any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty
                                   for p in params),
                   any_undecodable=any(d < vocab for d in decodable))


# ------------------------------------------------------------------------- batched filters
def penalize(logits: torch.Tensor, counts: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """``apply_penalties`` with a repetition, presence and frequency penalty per row (B, vocab)."""
    seen = counts > 0
    rep = batch.repetition
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - batch.presence * seen.to(logits.dtype) - batch.frequency * counts.to(logits.dtype)


def top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``apply_top_k`` with k (B, 1) per row; k = 0 keeps the row."""
    ranked = torch.sort(logits, dim=-1, descending=True).values
    kth = ranked.gather(-1, (k - 1).clamp(min=0))  # (B, 1): the k-th largest logit
    return torch.where((k > 0) & (logits < kth), NEG_INF, logits)


def top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``apply_top_p`` with p (B, 1) per row; p = 1 keeps the row."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, (before >= p) & (p < 1))
    return logits.masked_fill(drop, NEG_INF)


def min_p(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``apply_min_p`` with min_p (B, 1) per row; 0 keeps the row."""
    probs = torch.softmax(logits, dim=-1)
    threshold = m * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill((m > 0) & (probs < threshold), NEG_INF)


def filter_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p (``make_sampler``'s order), each where some row uses it."""
    logits = logits / batch.temperature
    if batch.any_top_k:
        logits = top_k(logits, batch.top_k)
    if batch.any_top_p:
        logits = top_p(logits, batch.top_p)
    if batch.any_min_p:
        logits = min_p(logits, batch.min_p)
    return logits


def pick(logits: torch.Tensor, batch: SamplingBatch, generators: Sequence[torch.Generator | None],
         counts: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids (B,) on the logits' device, from raw logits (B, vocab) float32; ``counts`` (B, vocab) how
    often each token was seen (for penalties); ``generators[b]`` draws row b's noise (unused when greedy)."""
    if batch.any_undecodable:
        ids = torch.arange(logits.shape[-1], device=logits.device)
        logits = logits.masked_fill(ids >= batch.decodable, NEG_INF)
    if batch.any_penalty:
        if counts is None:
            raise ValueError("a row has a penalty but no token counts were given")
        logits = penalize(logits, counts, batch)
    greedy = torch.argmax(logits, dim=-1)
    if batch.all_greedy:
        return greedy
    probs = torch.softmax(filter_logits(logits, batch), dim=-1)
    noise = torch.ones_like(probs)  # greedy rows keep 1 (their draw is not used)
    for row in batch.sampled_rows:  # as torch.multinomial(probs[row:row + 1], 1, generator=...) draws it
        noise[row].exponential_(generator=generators[row])
    return torch.where(batch.greedy[:, 0], greedy, torch.argmax(probs / noise, dim=-1))


# ------------------------------------------------------------------------------ the engine's use
def generator_for(seq, device: torch.device) -> torch.Generator | None:
    """The generator a sequence draws with on ``device``: on a CPU its own (``seq.rng``, as the CPU sampler
    uses); on a GPU one on the device, seeded with the request's seed (or, unseeded, a seed drawn from
    ``seq.rng``), made once and kept on the sequence."""
    if seq.rng is None or device.type == "cpu":
        return seq.rng
    if seq.device_rng is None:
        seed = seq.req.params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=seq.rng))
        seq.device_rng = torch.Generator(device).manual_seed(seed)
    return seq.device_rng


def choose_on_device(seqs: Sequence, logits: torch.Tensor) -> list[tuple[int, float, dict[int, float]] | None]:
    """The engine's pick for a decode step: for each running sequence (row b of ``logits`` (B, vocab) on the
    device) what ``_Running.choose`` returns (token, its logprob, the top alternatives), computed on the
    device and read back in one transfer; None for a sequence with logits processors (those run on the host,
    on its row). Token counts for penalties move to the device once and are updated there."""
    device = logits.device
    rows = [b for b, s in enumerate(seqs) if not s.req.processors]
    if not rows:
        return [None] * len(seqs)
    group = [seqs[b] for b in rows]
    if len(rows) < len(seqs):  # an index from the host, copied without waiting for the device
        logits = logits.index_select(0, host_to_device(torch.tensor(rows), device))
    vocab = logits.shape[-1]
    batch = SamplingBatch.of([s.req.params for s in group], vocab, device, [min(s.decodable, vocab) for s in group])
    counts = None
    if batch.any_penalty:
        for s in group:
            if s.counts is not None and s.counts.device != device:
                s.counts = s.counts.to(device)
        zeros = torch.zeros(vocab, dtype=torch.int32, device=device)
        counts = torch.stack([zeros if s.counts is None else s.counts for s in group])
    masked = logits
    if batch.any_undecodable:
        masked = logits.masked_fill(torch.arange(vocab, device=device) >= batch.decodable, NEG_INF)
    logprobs = torch.log_softmax(masked, dim=-1)  # before any sampling filter, as the CPU path
    tokens = pick(logits, batch, [generator_for(s, device) for s in group], counts)
    parts = [tokens[:, None].float(), logprobs.gather(-1, tokens[:, None])]  # ids < 2^24 are exact in float32
    n_top = max(s.req.params.logprobs for s in group)
    if n_top:
        top = torch.topk(logprobs, n_top, dim=-1)
        parts += [top.values, top.indices.float()]
    host = torch.cat(parts, dim=-1).cpu()  # the one transfer of the step
    out: list[tuple[int, float, dict[int, float]] | None] = [None] * len(seqs)
    for b, s, values in zip(rows, group, host.tolist()):
        token, n = int(values[0]), s.req.params.logprobs
        alternatives = {int(i): v for v, i in zip(values[2:2 + n], values[2 + n_top:2 + n_top + n])}
        if s.counts is not None:
            s.counts[token] += 1
        out[b] = (token, values[1], alternatives)
    return out
