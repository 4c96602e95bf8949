"""Generation and the ``Llama`` facade: ``llama3.load(...)`` then ``generate``, ``stream``, ``chat``.

In layers: ``Generator.run`` queues prompts in the engine's continuous-batching loop
(``llama3.engine.Engine``) and yields its ``Step`` records (token, text piece, logprob,
finish_reason) as they come; ``generate`` collects them into a ``GenerationResult``. The engine keeps
its paged KV cache between calls, so a prompt that starts like an earlier one (the next turn of a
chat) reuses those keys and values and only the new tokens are computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .config import ModelArgs
from .engine import Engine, Request, Step
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer


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
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused from the cache

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.completion_tokens - 1
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else float("nan")

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    def __str__(self) -> str:
        return self.text


def describe_execution(model: Transformer, engine: Engine) -> str:
    """One line for load, explain, bench and the server: the weights, the decoder chosen and why, the cache."""
    from .engine import choose_decoder
    from .quantize import describe

    choice = choose_decoder(model, engine.cache.dtype)
    kv = str(engine.cache.dtype).replace("torch.", "")
    return f"{describe(model)}; decode: {engine.decoder.describe()}" + \
        (f" ({choice.reason})" if choice.name != engine.decoder.name else "") + f"; KV cache {kv}, paged"


class Generator:
    """Runs prompts through the engine. Owns the engine (and so the KV cache it reuses across calls)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_context: int | None = None,
                 max_batch: int = 16, **engine_options):
        self.model, self.tokenizer = model, tokenizer
        self.args: ModelArgs = model.args
        self.engine = Engine(model, tokenizer, max_batch=max_batch, context=max_context, **engine_options)
        self.context = self.engine.context

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def check_prompt(self, prompt: list[int]) -> None:
        self.engine.check_prompt(prompt)

    def submit(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
               stop_ids: set[int] | None = None, processors: Sequence = ()) -> list[Request]:
        """Queue prompts in the engine; ``Request.index`` is each prompt's position in ``prompts``."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for p in prompts:
            self.check_prompt(p)
        requests = [Request(list(p), sp, stop_ids, processors, index=i) for i, (p, sp) in enumerate(zip(prompts, params_list))]
        for r in requests:
            self.engine.add(r)
        return requests

    def stream(self, requests: list[Request]) -> Iterator[Step]:
        """Step the engine until these requests finish, yielding their Steps. Stopping early (closing the
        iterator) cancels what is left."""
        engine, ids = self.engine, {r.id for r in requests}
        try:
            while ids:
                for step in engine.step():
                    if step.request_id in ids:
                        if step.finish_reason is not None:
                            ids.discard(step.request_id)
                        yield step
        finally:
            for rid in ids:
                engine.cancel(rid)
            if ids:
                engine.step()  # free their cache blocks now

    def run(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
            stop_ids: set[int] | None = None, processors: Sequence = ()) -> Iterator[Step]:
        """Generate for every prompt together; yields each prompt's Steps as they are made (``Step.index``
        is the prompt's position in ``prompts``)."""
        return self.stream(self.submit(prompts, params, stop_ids, processors))


class Llama:
    """A loaded model: ``args``, ``model``, ``tokenizer``, ``chat_format``, and generation on top."""

    def __init__(self, args: ModelArgs, model: Transformer, tokenizer: Tokenizer, chat_format=None,
                 path: str | None = None, format: str = "", max_context: int | None = None):
        self.args, self.model, self.tokenizer, self.chat_format = args, model, tokenizer, chat_format
        self.path, self.format = path, format
        self.generator = Generator(model, tokenizer, max_context)
        self.dequantized: list[tuple[str, str]] = []  # set by load: tensors widened for want of a kernel

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def describe(self) -> str:
        """How this model runs: its weights and kernels, and the decoder the engine's policy chose."""
        text = describe_execution(self.model, self.generator.engine)
        if self.dequantized:
            kinds = sorted({k for _, k in self.dequantized})
            text += f"; {len(self.dequantized)} tensors of {', '.join(kinds)} dequantized on load (no kernel runs them)"
        return text

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
        requests = self.generator.submit(prompts, params)
        for step in self.generator.stream(requests):
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
                                 counts[i], prefill_seconds=first - t0, decode_seconds=end - first,
                                 cached_tokens=requests[i].cached_tokens)
                for i in range(n)]

    def __repr__(self) -> str:
        return f"Llama({self.path!r}, format={self.format!r}, params={self.args.num_params():,}, " \
               f"device={self.device}, dtype={self.dtype})"
