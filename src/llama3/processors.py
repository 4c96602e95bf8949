"""Logits processors: what may change the model's logits at each step before sampling.

A processor is called once per step for each sequence with the tokens that sequence has generated
so far and its raw logits, a (vocab,) float32 CPU tensor, and returns new logits (it never writes
into its input: the loop takes logprobs from the raw logits). Stateful processors (a grammar) are
told each chosen token through ``accept``, and ``is_finished`` says the sequence cannot go on (a
grammar that has completed its output), so the loop ends it with finish_reason "stop".

How the generation loop uses one, per sequence and step::

    logits = processor(generated, logits)      # before penalties, temperature and filters
    token = sample(logits)
    processor.accept(token)
    generated.append(token)
    if processor.is_finished(): finish the sequence ("stop")

Several processors compose with ``ProcessorList`` (each sees the previous one's output): put
``LogitBias`` before a grammar constraint, so that no bias can bring back a token the grammar
forbids.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

NEG_INF = float("-inf")


@runtime_checkable
class LogitsProcessor(Protocol):
    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """New logits (vocab,) for the next token, given the tokens generated so far."""

    def accept(self, token_id: int) -> None:
        """The loop chose ``token_id``; stateful processors advance."""

    def is_finished(self) -> bool:
        """True when this sequence must end now (with finish_reason "stop")."""


class LogitBias:
    """OpenAI's ``logit_bias``: a map from token id to a bias in [-100, 100] added to its logit.

    A bias of exactly -100 bans the token (its logit becomes -inf, so no other bias or
    temperature can bring it back); other values are added to the logit, so +100 all but
    forces a token (its probability is within e^-70 or so of 1 against ordinary logits).
    Keys may be ints or decimal strings (JSON object keys are strings).
    """

    def __init__(self, bias: Mapping[int | str, float], vocab_size: int | None = None):
        if not isinstance(bias, Mapping):
            raise ValueError(f"logit_bias must be a map from token id to bias, got {type(bias).__name__}")
        ids, values = [], []
        for key, value in bias.items():
            token = _token_id(key)
            if token is None or token < 0 or (vocab_size is not None and token >= vocab_size):
                limit = f" [0, {vocab_size})" if vocab_size is not None else ""
                raise ValueError(f"logit_bias key {key!r} is not a token id{' in' + limit if limit else ''}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not -100 <= value <= 100:
                raise ValueError(f"logit_bias[{key!r}] = {value!r} must be a number in [-100, 100]")
            ids.append(token)
            values.append(float(value))
        self.bias = dict(zip(ids, values))
        self.vocab_size = vocab_size
        self._banned = np.array([t for t, v in self.bias.items() if v == -100], dtype=np.int64)
        self._ids = np.array([t for t, v in self.bias.items() if v != -100], dtype=np.int64)
        self._values = np.array([v for v in self.bias.values() if v != -100], dtype=np.float32)

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self.bias and max(self.bias) >= logits.shape[-1]:
            raise ValueError(f"logit_bias names token {max(self.bias)}, but the logits have {logits.shape[-1]} entries")
        # numpy, as GrammarConstraint: one thread, no OpenMP region between two decode steps
        out = logits.detach().to("cpu", torch.float32).numpy().copy()
        out[self._ids] += self._values
        out[self._banned] = NEG_INF
        return torch.from_numpy(out)

    def accept(self, token_id: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"LogitBias({self.bias})"


def _token_id(key) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return None


class ProcessorList:
    """Several processors applied in order, as one."""

    def __init__(self, processors: Iterable[LogitsProcessor]):
        self.processors = list(processors)

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        for p in self.processors:
            logits = p(token_ids, logits)
        return logits

    def accept(self, token_id: int) -> None:
        for p in self.processors:
            p.accept(token_id)

    def is_finished(self) -> bool:
        return any(p.is_finished() for p in self.processors)
