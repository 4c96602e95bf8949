"""Samplers on hand-made distributions."""

import math

import pytest
import torch

from llama3.sampling import (SamplingParams, apply_min_p, apply_penalties, apply_temperature, apply_top_k,
                             apply_top_p, make_sampler)


def logits_of(*probs):
    return torch.tensor([probs]).log()


def kept(logits):
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_p():
    assert kept(apply_top_p(logits_of(0.6, 0.3, 0.1), 0.5)) == [0]
    assert kept(apply_top_p(logits_of(0.6, 0.3, 0.1), 0.7)) == [0, 1]
    assert kept(apply_top_p(logits_of(0.1, 0.3, 0.6), 0.9)) == [1, 2]
    assert kept(apply_top_p(logits_of(0.6, 0.3, 0.1), 1.0)) == [0, 1, 2]


def test_top_k():
    assert kept(apply_top_k(logits_of(0.2, 0.5, 0.3), 2)) == [1, 2]
    assert kept(apply_top_k(logits_of(0.2, 0.5, 0.3), 0)) == [0, 1, 2]


def test_min_p():
    # max prob 0.5; min_p 0.5 keeps tokens with p >= 0.25
    assert kept(apply_min_p(logits_of(0.5, 0.3, 0.2), 0.5)) == [0, 1]
    assert kept(apply_min_p(logits_of(0.5, 0.3, 0.2), 0.0)) == [0, 1, 2]


def test_temperature():
    out = apply_temperature(torch.tensor([[2.0, 4.0]]), 2.0)
    assert out.tolist() == [[1.0, 2.0]]


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[1, 1, 0, 3]])
    assert apply_penalties(logits, counts, repetition=2.0).tolist() == [[1.0, -4.0, 1.0, 0.25]]
    assert apply_penalties(logits, counts, presence=0.5).tolist() == [[1.5, -2.5, 1.0, 0.0]]
    assert apply_penalties(logits, counts, frequency=0.5).tolist() == [[1.5, -2.5, 1.0, -1.0]]


def test_greedy_and_seeded_sampling():
    logits = logits_of(0.1, 0.7, 0.2)
    assert make_sampler(SamplingParams(temperature=0))(logits).item() == 1
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    sample = make_sampler(params)
    draws = [sample(logits, torch.Generator().manual_seed(s)).item() for s in range(2000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert all(abs(f - p) < 0.04 for f, p in zip(freq, [0.1, 0.7, 0.2]))
    a = [sample(logits, torch.Generator().manual_seed(7)).item() for _ in range(5)]
    assert len(set(a)) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be >= 0, got -0.1"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_k=-1), "top_k must be >= 0 (0 disables it), got -1"),
    (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0 (1 disables it), got 0.0"),
    (dict(presence_penalty=3.0), "presence_penalty must be in [-2, 2], got 3.0"),
    (dict(frequency_penalty=-2.5), "frequency_penalty must be in [-2, 2], got -2.5"),
    (dict(temperature=math.nan), "temperature must be a finite number, got nan"),
    (dict(seed="x"), "seed must be an integer or None, got 'x'"),
    (dict(stop=[""]), "stop must be a non-empty string, got ''"),
    (dict(logprobs=50), "logprobs must be in [0, 20], got 50"),
])
def test_invalid_values(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)
