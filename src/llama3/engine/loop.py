"""The one continuous-batching loop that every face drives (the Python API, the CLI, the server, bench).

    engine = Engine(model, tokenizer, max_batch=8)
    rid = engine.add(Request(prompt_ids, SamplingParams(temperature=0)))
    while engine.has_work():
        for step in engine.step():          # Step records: token, text piece, logprob, finish_reason
            ...

Each ``step()`` admits waiting requests (their prompts reuse whatever prefix the paged cache already
holds), prefills at most ``prefill_chunk`` prompt tokens (so a long prompt cannot stall the others for
long), then advances every running sequence by one token in a single decode call. Finished and
cancelled sequences leave at once and give their cache blocks back. When the cache is full, the
sequence admitted last is set aside and recomputed later (its cached blocks usually make that cheap).
Batching never changes a sequence's output: each one's greedy tokens equal what it gives alone.

``add`` and ``cancel`` may be called from any thread; ``step`` from one thread at a time.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..device_sampling import choose_on_device
from ..model import Transformer
from ..sampling import SamplingParams, apply_penalties, make_sampler
from ..tokenizer import Tokenizer
from .cache import CacheFull, PagedKVCache, default_kv_dtype, memory_budget_bytes
from .decoders import PREFILL_CHUNK, Decoder


@dataclass
class Step:
    """One generated token. ``text`` is the new complete text (may be "" while a UTF-8 character
    or a possible stop string is pending); ``finish_reason`` is set on the last step."""

    token_id: int
    text: str
    logprob: float
    top_logprobs: dict[int, float] = field(default_factory=dict)
    finish_reason: str | None = None  # "stop" | "length"
    index: int = 0  # which prompt of a batch (the caller's numbering)
    request_id: int = -1


# A logits processor sees the tokens generated so far and the raw logits (vocab,) and returns new
# logits; an optional ``accept(token)`` method hears the token chosen (constrained decoding).
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int] | None = None  # None: the tokenizer's end-of-turn tokens
    processors: Sequence[LogitsProcessor] = ()
    index: int = 0
    # Score the prompt too: the logprob of each prompt token after the first (and the top-n alternatives),
    # written to ``prompt_scores`` before the first Step. Its prefix is then computed, not reused.
    prompt_logprobs: int | None = None
    generate: bool = True  # False: only score the prompt; the request ends with one Step holding no token (-1)
    id: int = -1
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the cache, set when admitted
    prompt_scores: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)


class _Running:
    """A request being generated: its sampler, penalties, detokenizer and stop-string state."""

    def __init__(self, req: Request, tokenizer: Tokenizer, stop_ids: set[int], vocab_size: int):
        self.req, params = req, req.params
        self.sampler = make_sampler(params)
        self.rng = None
        self.device_rng = None  # a generator on the GPU, for sampling there (llama3.device_sampling)
        if params.seed is not None:
            self.rng = torch.Generator().manual_seed(params.seed)
        elif not params.greedy:
            self.rng = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        self.stop_ids = stop_ids
        self.detok = tokenizer.detokenizer()
        self.decodable = tokenizer.vocab_size  # ids past the tokenizer's (a padded embedding) are never sampled
        self.penalize = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        self.counts = torch.zeros(vocab_size, dtype=torch.int32) if self.penalize else None
        if self.penalize and params.repetition_penalty != 1.0:  # repetition counts the prompt too (as HF)
            self.counts.index_add_(0, torch.tensor(req.prompt), torch.ones(len(req.prompt), dtype=torch.int32))
        self.generated: list[int] = []
        self.slot = -1  # its sequence in the cache
        self.prefilled = 0  # tokens of ``tokens_to_prefill`` already in the cache
        self.emitted = ""  # text already yielded
        self.pending = ""  # text held back: it may begin a stop string
        self.constrained_done = False

    def tokens_to_prefill(self) -> list[int]:
        """The prompt, plus (after being set aside for lack of memory) all generated tokens but the last,
        which is the next input."""
        return self.req.prompt + self.generated[:-1]

    def choose(self, logits: torch.Tensor) -> tuple[int, float, dict[int, float]]:
        """Pick the next token from this sequence's raw logits (vocab,)."""
        if self.decodable < logits.shape[-1]:
            logits = logits.clone()
            logits[self.decodable:] = float("-inf")
        logprobs = torch.log_softmax(logits, dim=-1)  # before any sampling filter
        work = logits
        for p in self.req.processors:
            work = p(self.generated, work)
        work = work[None]
        if self.penalize:
            work = apply_penalties(work, self.counts[None], self.req.params.repetition_penalty,
                                   self.req.params.presence_penalty, self.req.params.frequency_penalty)
        token = int(self.sampler(work, self.rng)[0])
        for p in self.req.processors:
            if hasattr(p, "accept") and token not in self.stop_ids:  # an end-of-turn token ends the sequence
                p.accept(token)
        self.constrained_done = any(getattr(p, "is_finished", lambda: False)() for p in self.req.processors)
        if self.counts is not None:
            self.counts[token] += 1
        top = {}
        if self.req.params.logprobs:
            values, ids = torch.topk(logprobs, self.req.params.logprobs)
            top = {int(i): float(v) for i, v in zip(ids, values)}
        return token, float(logprobs[token]), top

    def feed(self, token: int, at_context_end: bool) -> tuple[str, str | None]:
        """Account for a chosen token; return (text to emit, finish_reason or None)."""
        self.generated.append(token)
        if token in self.stop_ids:
            return self._flush(), "stop"
        if self.constrained_done:  # a grammar completed its output: nothing may follow
            self.pending += self.detok.add(token)
            return self._flush(), "stop"
        self.pending += self.detok.add(token)
        stops = self.req.params.stop
        if stops:
            full = self.emitted + self.pending
            search_from = max(0, len(self.emitted) - max(len(s) for s in stops) + 1)
            hits = [i for i in (full.find(s, search_from) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)
                out = full[len(self.emitted):cut] if cut >= len(self.emitted) else ""
                self.emitted, self.pending = full[:cut], ""
                return out, "stop"
        if len(self.generated) >= self.req.params.max_new_tokens or at_context_end:
            return self._flush(), "length"
        hold = _longest_stop_prefix(self.pending, stops)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        self.emitted += out
        return out, None

    def _flush(self) -> str:
        out = self.pending + self.detok.finish()
        stops = self.req.params.stop
        if stops:  # the last bytes may complete a stop string
            full = self.emitted + out
            hits = [i for i in (full.find(s, len(self.emitted)) for s in stops) if i >= 0]
            if hits:
                out = full[len(self.emitted):min(hits)]
        self.emitted += out
        self.pending = ""
        return out


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int = 8, context: int | None = None,
                 decoder: str | Callable[[Transformer, PagedKVCache], Decoder] = "auto",
                 kv_dtype: torch.dtype | None = None, cache_tokens: int | None = None, prefix_caching: bool = True,
                 prefill_chunk: int = PREFILL_CHUNK, threads: int | None = None):
        """``context``: most positions one sequence may use (default: the model's). ``cache_tokens``: the
        cache's size in positions for all sequences together (default: every batch slot at full context,
        capped by ``memory_budget_bytes``). ``decoder``: "auto" (``choose_decoder``), "c", "static", "torch",
        or a function (model, cache) -> Decoder."""
        from .policy import make_decoder

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.args = model, tokenizer, model.args
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.context = min(context or self.args.max_seq_len, self.args.max_seq_len)
        device = model.norm.weight.device
        kv_dtype = kv_dtype or default_kv_dtype(model)
        kv_heads = model.layers[0].attention.n_kv_heads  # a tensor-parallel shard holds its share of them
        if cache_tokens is None:
            per_token = self.args.kv_cache_bytes_per_token(torch.finfo(kv_dtype).bits // 8) * kv_heads // self.args.kv_heads
            cache_tokens = min(max_batch * self.context, memory_budget_bytes(device) // max(per_token, 1))
        self.cache = PagedKVCache(self.args, max(cache_tokens, 1), dtype=kv_dtype, device=device,
                                  prefix_caching=prefix_caching, kv_heads=kv_heads)
        self.decoder = make_decoder(decoder, model, self.cache, threads=threads)
        self._ids = itertools.count()
        self._inbox: deque[Request] = deque()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._waiting: deque[_Running] = deque()
        self._prefilling: list[_Running] = []
        self._running: list[_Running] = []
        self.set_aside = 0  # sequences set aside for lack of cache memory (and recomputed), in all

    # ---------------------------------------------------------------- requests (any thread)
    def add(self, request: Request) -> int:
        """Queue a request; returns its id (also set on the request, whose ``cached_tokens`` the engine
        fills when it is admitted). ValueError for a prompt that cannot run."""
        self.check_prompt(request.prompt)
        request.id = next(self._ids)
        with self._lock:
            self._inbox.append(request)
        return request.id

    def cancel(self, rid: int) -> None:
        """Stop a request now (its cache blocks are freed at the next ``step``)."""
        with self._lock:
            self._cancelled.add(rid)

    def check_prompt(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) >= self.context:
            raise ValueError(f"the prompt has {len(prompt)} tokens, but the context holds {self.context} "
                             f"(including at least one new token): shorten the prompt")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.args.vocab_size})")

    def has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._prefilling or self._running)

    @property
    def active(self) -> int:
        """Sequences holding cache memory (prefilling or generating)."""
        return len(self._prefilling) + len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self._waiting)

    # ------------------------------------------------------------------------- the loop
    @torch.inference_mode()
    def step(self) -> list[Step]:
        """One iteration: admit, prefill (one chunk's worth), then one decode step for every running sequence."""
        out: list[Step] = []
        self._take_inbox()
        self._admit()
        self._prefill(out)
        self._decode(out)
        return out

    def run(self) -> Iterator[Step]:
        """Step until every request has finished."""
        while self.has_work():
            yield from self.step()

    def abort(self) -> list[Request]:
        """Drop every request (after a failed step); returns them."""
        with self._lock:
            reqs = list(self._inbox)
            self._inbox.clear()
        for seq in [*self._waiting, *self._prefilling, *self._running]:
            reqs.append(seq.req)
            self._close(seq)
        self._waiting.clear(), self._prefilling.clear(), self._running.clear()
        return reqs

    def _take_inbox(self) -> None:
        with self._lock:
            new, cancelled = list(self._inbox), self._cancelled
            self._inbox.clear()
            self._cancelled = set()
        stop_default = self.tokenizer.stop_ids
        for req in new:
            self._waiting.append(_Running(req, self.tokenizer, stop_default if req.stop_ids is None else req.stop_ids,
                                          self.args.vocab_size))
        if cancelled:
            for group in (self._prefilling, self._running):
                for seq in [s for s in group if s.req.id in cancelled]:
                    group.remove(seq)
                    self._close(seq)
            self._waiting = deque(s for s in self._waiting if s.req.id not in cancelled)

    def _admit(self) -> None:
        while self._waiting and self.active < self.max_batch:
            seq = self._waiting[0]
            tokens = seq.tokens_to_prefill()
            seq.slot, cached = self.cache.open(tokens, reuse=seq.req.prompt_logprobs is None)
            try:
                self.cache.reserve(seq.slot, len(tokens) + 1)
            except CacheFull:
                self.cache.close(seq.slot)
                if self.active == 0:  # alone and still too big: it can never run
                    raise CacheFull(f"a prompt of {len(tokens)} tokens needs more KV-cache memory than the "
                                    f"cache holds ({self.cache.n_blocks * self.cache.block_size} positions)")
                return  # wait for memory
            self._waiting.popleft()
            if not seq.generated:
                seq.req.cached_tokens = cached
            seq.prefilled = cached
            self._prefilling.append(seq)

    def _prefill(self, out: list[Step]) -> None:
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            seq = self._prefilling[0]
            tokens = seq.tokens_to_prefill()
            chunk = tokens[seq.prefilled:seq.prefilled + budget]
            scoring = seq.req.prompt_logprobs is not None and not seq.generated
            logits = self.decoder.prefill(chunk, seq.slot, seq.prefilled, all_logits=scoring)
            if scoring:  # row i predicts the token after chunk[i]
                self._score(seq.req, logits, tokens[seq.prefilled + 1:seq.prefilled + len(chunk) + 1])
                logits = logits[-1]
            self.cache.append(seq.slot, chunk)
            seq.prefilled += len(chunk)
            budget -= len(chunk)
            if seq.prefilled < len(tokens):
                return  # the rest next step
            self._prefilling.pop(0)
            if not seq.req.generate:
                out.append(Step(-1, "", 0.0, {}, "length", seq.req.index, seq.req.id))
                self._close(seq)
                continue
            self._running.append(seq)
            if not seq.generated:  # a fresh prompt: its first token (a resumed one already has its next input)
                self._emit(seq, logits, out)

    @staticmethod
    def _score(req: Request, logits: torch.Tensor, targets: list[int]) -> None:
        logprobs = torch.log_softmax(logits[:len(targets)], dim=-1)
        top = torch.topk(logprobs, req.prompt_logprobs, dim=-1) if req.prompt_logprobs else None
        for i, t in enumerate(targets):
            alternatives = {int(j): float(v) for j, v in zip(top.indices[i], top.values[i])} if top else {}
            req.prompt_scores.append((float(logprobs[i, t]), alternatives))

    def _decode(self, out: list[Step]) -> None:
        ready = [s for s in self._running if s.generated and s.req.id >= 0]
        if not ready:
            return
        for seq in list(ready):  # room for one more position each, setting aside the newest when full
            while seq in self._running:
                try:
                    self.cache.reserve(seq.slot, self.cache.length(seq.slot) + 1)
                    break
                except CacheFull:
                    self._set_aside(self._running[-1])
        ready = [s for s in ready if s in self._running]
        if not ready:
            return
        tokens = [s.generated[-1] for s in ready]
        positions = [self.cache.length(s.slot) for s in ready]
        slots = [s.slot for s in ready]
        if hasattr(self.decoder, "step_on_device"):  # sample where the logits are: one transfer per step
            logits = self.decoder.step_on_device(tokens, positions, slots)
            picks = choose_on_device(ready, logits)
        else:
            logits, picks = self.decoder.step(tokens, positions, slots), [None] * len(ready)
        for seq, token, row, pick in zip(ready, tokens, logits, picks):
            self.cache.append(seq.slot, [token])
            self._emit(seq, row, out, pick)

    def _emit(self, seq: _Running, logits: torch.Tensor, out: list[Step], pick=None) -> None:
        """``pick``: (token, logprob, top) already chosen on the device; None: choose here from ``logits``."""
        token, logprob, top = pick or seq.choose(logits.float().cpu())
        at_end = self.cache.length(seq.slot) + 1 >= self.context
        text, reason = seq.feed(token, at_end)
        out.append(Step(token, text, logprob, top, reason, seq.req.index, seq.req.id))
        if reason is not None:
            self._running.remove(seq)
            self._close(seq)

    def _set_aside(self, seq: _Running) -> None:
        """Out of cache memory: free this sequence and queue it first, to be recomputed."""
        self._running.remove(seq)
        self._close(seq)
        seq.prefilled = 0
        self._waiting.appendleft(seq)
        self.set_aside += 1

    def _close(self, seq: _Running) -> None:
        if seq.slot >= 0:
            self.cache.close(seq.slot)
            seq.slot = -1
