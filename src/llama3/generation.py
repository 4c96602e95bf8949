"""Generation and the ``Llama`` facade: ``llama3.load(...)`` then ``generate``, ``stream``, ``chat``.

In layers: ``Generator.run`` prefills each prompt into its row of a KV cache, then decodes all
rows together one token per step and yields ``Step`` records (token, text piece, logprob,
finish_reason); ``generate`` collects them into a ``GenerationResult``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .config import ModelArgs
from .fastpath import FastDecoder
from .model import KVCache, Transformer
from .sampling import SamplingParams, apply_penalties, make_sampler
from .tokenizer import Tokenizer

PREFILL_CHUNK = 512  # prompts longer than this are prefilled in chunks of this many tokens


@dataclass
class Step:
    """One generated token. ``text`` is the new complete text (may be "" while a UTF-8 character
    or a possible stop string is pending); ``finish_reason`` is set on the last step."""

    token_id: int
    text: str
    logprob: float
    top_logprobs: dict[int, float] = field(default_factory=dict)
    finish_reason: str | None = None  # "stop" | "length"
    index: int = 0  # which prompt of a batch


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.completion_tokens - 1
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else float("nan")

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    def __str__(self) -> str:
        return self.text


class _Sequence:
    """The state of one prompt being generated."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 stop_ids: set[int], vocab_size: int):
        self.index, self.prompt, self.params = index, prompt, params
        self.sampler = make_sampler(params)
        self.rng = None
        if params.seed is not None:
            self.rng = torch.Generator().manual_seed(params.seed)
        elif not params.greedy:
            self.rng = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        self.stop_ids = stop_ids
        self.detok = tokenizer.detokenizer()
        self.penalize = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        self.counts = torch.zeros(vocab_size, dtype=torch.int32) if self.penalize else None
        if self.penalize and params.repetition_penalty != 1.0:  # repetition counts the prompt too (as HF)
            self.counts.index_add_(0, torch.tensor(prompt), torch.ones(len(prompt), dtype=torch.int32))
        self.generated = 0
        self.last_token: int | None = None  # fed to the next decode step (server scheduler)
        self.emitted = ""  # text already yielded
        self.pending = ""  # text held back: it may begin a stop string
        self.finished = False

    def choose(self, logits: torch.Tensor) -> tuple[int, float, dict[int, float]]:
        """Pick the next token from this row's raw logits (vocab,)."""
        logprobs = torch.log_softmax(logits, dim=-1)  # before any sampling filter
        work = logits[None]
        if self.penalize:
            work = apply_penalties(work, self.counts[None], self.params.repetition_penalty,
                                   self.params.presence_penalty, self.params.frequency_penalty)
        token = int(self.sampler(work, self.rng)[0])
        if self.counts is not None:
            self.counts[token] += 1
        top = {}
        if self.params.logprobs:
            values, ids = torch.topk(logprobs, self.params.logprobs)
            top = {int(i): float(v) for i, v in zip(ids, values)}
        return token, float(logprobs[token]), top

    def feed(self, token: int, at_context_end: bool) -> tuple[str, str | None]:
        """Account for a chosen token; return (text to emit, finish_reason or None)."""
        self.generated += 1
        if token in self.stop_ids:
            return self._flush(), "stop"
        self.pending += self.detok.add(token)
        stops = self.params.stop
        if stops:
            full = self.emitted + self.pending
            search_from = max(0, len(self.emitted) - max(len(s) for s in stops) + 1)
            hits = [i for i in (full.find(s, search_from) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)
                out = full[len(self.emitted):cut] if cut >= len(self.emitted) else ""
                self.emitted, self.pending = full[:cut], ""
                return out, "stop"
        if self.generated >= self.params.max_new_tokens or at_context_end:
            return self._flush(), "length"
        hold = _longest_stop_prefix(self.pending, stops)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        self.emitted += out
        return out, None

    def _flush(self) -> str:
        out = self.pending + self.detok.finish()
        stops = self.params.stop
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


class Generator:
    """Drives the model: prefill, decode loop, stop rules. Owns the KV cache it reuses across calls."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_context: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.args: ModelArgs = model.args
        self.context = min(max_context or self.args.max_seq_len, self.args.max_seq_len)
        self._cache: KVCache | None = None
        self.fast_decode = True  # decode steps through llama3.fastpath where the model qualifies

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def _cache_for(self, batch: int, length: int) -> KVCache:
        c = self._cache
        if c is None or c.max_batch_size < batch or c.max_seq_len < length:
            dtype = self.model.norm.weight.dtype
            size = min(self.context, max(length, 256 if c is None else c.max_seq_len * 2))
            self._cache = None  # free the old one first
            self._cache = KVCache(self.args, max_batch_size=batch, max_seq_len=max(size, length),
                                  dtype=dtype, device=self.device)
        return self._cache

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) >= self.context:
            raise ValueError(f"the prompt has {len(prompt)} tokens, but the context holds {self.context} "
                             f"(including at least one new token): shorten the prompt")
        bad = [t for t in prompt if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.args.vocab_size})")

    @torch.inference_mode()
    def prefill(self, prompt: list[int], cache: KVCache) -> torch.Tensor:
        """Run the prompt through the model into ``cache``; return the last position's logits (vocab,)."""
        tokens = torch.tensor([prompt], dtype=torch.long, device=self.device)
        logits = None
        for start in range(0, len(prompt), PREFILL_CHUNK):
            logits = self.model(tokens[:, start:start + PREFILL_CHUNK], start_pos=start, cache=cache, last_only=True)
        return logits[0, -1]

    def decoder(self):
        """The decode step: ``decode(tokens, positions, cache, rows=None)`` -> logits (batch, vocab) on the CPU,
        for one new token per sequence at its position in its cache row (default row b). It is
        ``llama3.fastpath.FastDecoder`` (the whole step in one C call) where the model qualifies and
        ``fast_decode`` is on, else ``Transformer.forward``, which decodes cache rows 0..max(rows): a row in
        that range that is not listed is fed token 0 at position 0 (its first cache entry is overwritten), so
        list every row in use. Built afresh by each ``run``, so changes to the model between runs are seen."""
        fast = FastDecoder.for_model(self.model) if self.fast_decode else None
        if fast is not None:
            return fast
        model, device = self.model, self.device

        @torch.inference_mode()
        def forward(tokens, positions, cache, rows=None):
            if rows is not None:
                n = max(rows) + 1
                all_tokens, all_positions = [0] * n, [0] * n
                for r, t, p in zip(rows, tokens, positions):
                    all_tokens[r], all_positions[r] = t, p
                return forward(all_tokens, all_positions, cache)[list(rows)]
            t = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
            start = positions[0] if len(tokens) == 1 else torch.tensor(positions, device=device)
            return model(t, start_pos=start, cache=cache)[:, -1].float().cpu()
        return forward

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
            stop_ids: set[int] | None = None) -> Iterator[Step]:
        """Generate for every prompt together; yields each row's Steps as they are made."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for p in prompts:
            self.check_prompt(p)
        stop_ids = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        seqs = [_Sequence(i, p, sp, self.tokenizer, stop_ids, self.args.vocab_size)
                for i, (p, sp) in enumerate(zip(prompts, params_list))]
        batch = len(seqs)
        longest = max(min(len(s.prompt) + s.params.max_new_tokens, self.context) for s in seqs)
        cache = self._cache_for(batch, longest)
        logits = torch.stack([self.prefill(s.prompt, cache.rows(i, i + 1)) for i, s in enumerate(seqs)]).float().cpu()
        positions = [len(s.prompt) for s in seqs]
        next_tokens = [0] * batch
        decode = self.decoder()
        while True:
            for s in seqs:
                if s.finished:
                    continue
                token, logprob, top = s.choose(logits[s.index])
                at_end = positions[s.index] + 1 >= self.context
                text, reason = s.feed(token, at_end)
                s.finished = reason is not None
                next_tokens[s.index] = token
                yield Step(token, text, logprob, top, reason, s.index)
            active = [s for s in seqs if not s.finished]
            if not active:
                return
            step_pos = [positions[i] if not seqs[i].finished else min(positions[i], self.context - 1)
                        for i in range(batch)]
            logits = decode(next_tokens, step_pos, cache)
            for s in active:
                positions[s.index] += 1


class Llama:
    """A loaded model: ``args``, ``model``, ``tokenizer``, ``chat_format``, and generation on top."""

    def __init__(self, args: ModelArgs, model: Transformer, tokenizer: Tokenizer, chat_format=None,
                 path: str | None = None, format: str = "", max_context: int | None = None):
        self.args, self.model, self.tokenizer, self.chat_format = args, model, tokenizer, chat_format
        self.path, self.format = path, format
        self.generator = Generator(model, tokenizer, max_context)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    # -------------------------------------------------------------------------- prompts
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids for a text prompt (with BOS where the tokenizer adds one) or a list of ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos and self.tokenizer.bos_id is not None)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ValueError("a prompt must be a string or a list of token ids")

    def chat_prompt(self, messages: Sequence[dict]) -> tuple[str, list[int]]:
        """Exactly what the model reads for these messages: (text, token ids)."""
        if self.chat_format is None:
            raise ValueError(f"{self.path}: this model has no chat template; use generate() with a plain prompt")
        return self.chat_format.render(messages, add_generation_prompt=True)

    # ------------------------------------------------------------------------ generation
    def stream(self, prompt: str | Sequence[int], **sampling) -> Iterator[Step]:
        """Yield Steps for one prompt as they are made."""
        ids = self.encode_prompt(prompt)
        yield from self.generator.run([ids], SamplingParams(**sampling))

    def generate(self, prompt, **sampling) -> GenerationResult | list[GenerationResult]:
        """Generate for a prompt (str or ids) or a list of prompts (batched; results in order)."""
        if isinstance(prompt, (list, tuple)) and prompt and not all(isinstance(t, int) for t in prompt):
            return self._generate_ids([self.encode_prompt(p) for p in prompt], SamplingParams(**sampling))
        return self._generate_ids([self.encode_prompt(prompt)], SamplingParams(**sampling))[0]

    def chat(self, messages: Sequence[dict], **sampling) -> GenerationResult:
        """The assistant's reply to a conversation, in the model's chat format."""
        _, ids = self.chat_prompt(messages)
        return self._generate_ids([ids], SamplingParams(**sampling))[0]

    def stream_chat(self, messages: Sequence[dict], **sampling) -> Iterator[Step]:
        _, ids = self.chat_prompt(messages)
        yield from self.generator.run([ids], SamplingParams(**sampling))

    def _generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationResult]:
        n = len(prompts)
        texts = [[] for _ in range(n)]
        tokens = [[] for _ in range(n)]
        lps = [[] for _ in range(n)]
        tops = [[] for _ in range(n)]
        reasons = [""] * n
        counts = [0] * n
        t0 = time.perf_counter()
        first = None
        for step in self.generator.run(prompts, params):
            if first is None:
                first = time.perf_counter()
            i = step.index
            counts[i] += 1
            texts[i].append(step.text)
            if step.finish_reason is None or step.token_id not in self.tokenizer.stop_ids:
                tokens[i].append(step.token_id)
                lps[i].append(step.logprob)
                tops[i].append(step.top_logprobs)
            if step.finish_reason:
                reasons[i] = step.finish_reason
        end = time.perf_counter()
        first = first or end
        return [GenerationResult("".join(texts[i]), tokens[i], lps[i], tops[i], reasons[i], len(prompts[i]),
                                 counts[i], prefill_seconds=first - t0, decode_seconds=end - first)
                for i in range(n)]

    def __repr__(self) -> str:
        return f"Llama({self.path!r}, format={self.format!r}, params={self.args.num_params():,}, " \
               f"device={self.device}, dtype={self.dtype})"
