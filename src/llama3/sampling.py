"""Sampling: small pure functions from logits to logits, composed by ``make_sampler``.

Every function takes float32 logits of shape (batch, vocab) and returns new logits; a
filtered-out token gets -inf. ``SamplingParams`` validates every knob once, at the edge.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """How to pick the next token. ``temperature=0`` is greedy (argmax); the filters then do nothing.

    Defaults follow llama.cpp's: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05. ``Llama`` fills
    what a call leaves out from ``llm.sampling_defaults`` instead: the checkpoint's own where it
    says (``model_sampling_defaults``), else these.
    """

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int = 0  # how many top alternatives to report per step (0 = only the chosen token's)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.validate()

    def validate(self) -> None:
        def bad(name, value, rule):
            raise ValueError(f"{name} must be {rule}, got {value!r}")

        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, value, "a finite number")
            return value

        def integer(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(name, value, "an integer")
            return value

        if integer("max_new_tokens") < 1:
            bad("max_new_tokens", self.max_new_tokens, ">= 1")
        if number("temperature") < 0:
            bad("temperature", self.temperature, ">= 0")
        if integer("top_k") < 0:
            bad("top_k", self.top_k, ">= 0 (0 disables it)")
        if not 0 < number("top_p") <= 1:
            bad("top_p", self.top_p, "in (0, 1]")
        if not 0 <= number("min_p") <= 1:
            bad("min_p", self.min_p, "in [0, 1]")
        if not number("repetition_penalty") > 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                bad(name, getattr(self, name), "in [-2, 2]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", self.seed, "an integer or None")
        if not 0 <= integer("logprobs") <= 20:
            bad("logprobs", self.logprobs, "in [0, 20]")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", s, "a non-empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ------------------------------------------------------------------------- model defaults
# What a model samples with when neither its checkpoint nor the caller says: SamplingParams' defaults,
# which are llama.cpp's (common/common.h: temp 0.80, top_k 40, top_p 0.95, min_p 0.05, penalty_repeat
# 1.00); the same for the CLI, the Python API and the server.
FALLBACK_SAMPLING = {name: SamplingParams.__dataclass_fields__[name].default
                     for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}

# Where checkpoints say their own: Hugging Face generation_config.json keys, and the GGUF keys that
# llama.cpp's convert_hf_to_gguf.py writes from them (gguf-py Keys.General.SAMPLING_*).
_HF_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty"}
_GGUF_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
              "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p",
              "repetition_penalty": "general.sampling.penalty_repeat"}


def model_sampling_defaults(path: str | Path, gguf_metadata: Mapping | None = None) -> tuple[dict, str]:
    """The sampling defaults a checkpoint asks for: (SamplingParams keyword arguments, where they came from).

    A GGUF file's ``general.sampling.*`` keys (``gguf_metadata``), else a Hugging Face folder's
    ``generation_config.json`` (``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``;
    ``"do_sample": false`` means greedy, as transformers reads it); whatever the checkpoint leaves
    unsaid is ``FALLBACK_SAMPLING`` (llama.cpp's defaults). A value that SamplingParams refuses
    raises ValueError naming the file and key.
    """
    found, source = {}, "llama.cpp's defaults"
    if gguf_metadata is not None:
        found = {name: gguf_metadata[key] for name, key in _GGUF_KEYS.items() if key in gguf_metadata}
        where = {name: f"{path}: {key}" for name, key in _GGUF_KEYS.items()}
        if found:
            source = f"{path} (general.sampling.*)"
    else:
        config = Path(path) / "generation_config.json" if Path(path).is_dir() else None
        where = {name: f"{config}: {key}" for name, key in _HF_KEYS.items()}
        if config is not None and config.is_file():
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{config}: not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise ValueError(f"{config}: expected a JSON object")
            found = {name: data[key] for name, key in _HF_KEYS.items() if data.get(key) is not None}
            if data.get("do_sample") is False:
                found["temperature"] = 0.0  # transformers decodes greedily and ignores the sampling knobs
            if found:
                source = str(config)
    out = dict(FALLBACK_SAMPLING)
    for name, value in found.items():
        if name == "top_k" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if name != "top_k" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            SamplingParams(**{name: value})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where[name]}: {e}") from None
        out[name] = value
    return out, source


# ------------------------------------------------------------------------------------ filters
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (k=0: keep all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= p  # the first token always stays (before = 0 < p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, repetition: float = 1.0,
                    presence: float = 0.0, frequency: float = 0.0) -> torch.Tensor:
    """Penalize tokens already seen. ``counts`` (batch, vocab) holds how often each appeared.

    repetition (CTRL / HF): a seen token's logit is divided by the penalty if positive and
    multiplied by it if negative; presence and frequency (OpenAI): subtract presence once
    per seen token and frequency times its count.
    """
    seen = counts > 0
    if repetition != 1.0:
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
    if presence or frequency:
        logits = logits - presence * seen.to(logits.dtype) - frequency * counts.to(logits.dtype)
    return logits


def make_sampler(params: SamplingParams) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """A function (logits (batch, vocab), generator) -> token ids (batch,)."""
    if params.greedy:
        return lambda logits, generator=None: torch.argmax(logits, dim=-1)

    def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        logits = apply_temperature(logits, params.temperature)
        logits = apply_top_k(logits, params.top_k)
        logits = apply_top_p(logits, params.top_p)
        logits = apply_min_p(logits, params.min_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return sample
