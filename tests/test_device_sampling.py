"""Device sampling (llama3.device_sampling) against the CPU samplers (llama3.sampling) on hand-made
distributions with fixed seeds.

Each row of a batch gets its own parameters; ``pick`` must return, row for row, the token that
``make_sampler(params)`` (after ``apply_penalties``) returns for that row alone with a generator seeded the
same way. The comparison is exact: both draw ``argmax(probs / Exp(1) noise)`` from the same generator
(that is how ``torch.multinomial`` samples one token), and every batched filter computes what the
per-row one does. On a CPU the device is the CPU; the CUDA run of these tests is listed as unmeasured.
"""

import pytest
import torch

from llama3.device_sampling import SamplingBatch, filter_logits, pick
from llama3.sampling import (SamplingParams, apply_min_p, apply_penalties, apply_temperature, apply_top_k,
                             apply_top_p, make_sampler)

CPU = torch.device("cpu")
# Every filter on and off in some row, greedy next to sampled, penalties of each kind.
PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(),  # llama.cpp's defaults: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05
    SamplingParams(temperature=1.3, top_k=0, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.3),
    SamplingParams(temperature=0.9, top_k=3, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.5, top_k=0, top_p=0.8, min_p=0.2),
    SamplingParams(temperature=0, repetition_penalty=1.5),
    SamplingParams(temperature=1.0, top_k=1000, top_p=0.9, min_p=0.0, frequency_penalty=-1.0),  # k > vocab
]


def cpu_pick(logits, counts, params, seeds):
    out = []
    for i, p in enumerate(params):
        row = logits[i:i + 1]
        if p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty:
            row = apply_penalties(row, counts[i:i + 1], p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        out.append(int(make_sampler(p)(row, torch.Generator().manual_seed(seeds[i]))[0]))
    return out


@pytest.mark.parametrize("vocab", [7, 50, 1000])
def test_pick_equals_the_cpu_samplers_draw_for_draw(vocab):
    g = torch.Generator().manual_seed(vocab)
    batch = SamplingBatch.of(PARAMS, vocab, CPU)
    for trial in range(60):
        logits = torch.randn(len(PARAMS), vocab, generator=g) * 3
        counts = torch.randint(0, 3, (len(PARAMS), vocab), generator=g, dtype=torch.int32)
        counts *= torch.rand(len(PARAMS), vocab, generator=g) < 0.2
        seeds = [trial * 100 + i for i in range(len(PARAMS))]
        got = pick(logits, batch, [torch.Generator().manual_seed(s) for s in seeds], counts)
        assert got.tolist() == cpu_pick(logits, counts, PARAMS, seeds)


def test_filters_equal_the_cpu_filters_on_a_hand_made_distribution():
    """probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 in scrambled order: top-k 2 keeps two, top-p 0.8 keeps
    three (0.5 + 0.25 < 0.8), min-p 0.2 keeps those >= 0.1 (three), and each row does only its own."""
    probs = torch.tensor([0.0625, 0.25, 0.5, 0.0625, 0.125])
    logits = probs.log().expand(4, -1).contiguous()
    params = [SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0),
              SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0),
              SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2),
              SamplingParams(temperature=0.5, top_k=4, top_p=0.9, min_p=0.3)]
    got = filter_logits(logits, SamplingBatch.of(params, 5, CPU))
    for row, p in zip(got, params):
        want = apply_min_p(apply_top_p(apply_top_k(apply_temperature(logits[:1], p.temperature), p.top_k), p.top_p),
                           p.min_p)[0]
        assert torch.equal(row, want)
    kept = (got > float("-inf")).tolist()
    assert kept[0] == [False, True, True, False, False]
    assert kept[1] == [False, True, True, False, True]
    assert kept[2] == [False, True, True, False, True]


def test_rows_never_pick_undecodable_ids():
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0]] * 2)  # the padded ids 2 and 3 are the most likely
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)]
    batch = SamplingBatch.of(params, 4, CPU, decodable=[2, 2])
    for seed in range(20):
        assert max(pick(logits, batch, [None, torch.Generator().manual_seed(seed)]).tolist()) < 2


def test_penalties_without_counts_are_refused():
    batch = SamplingBatch.of([SamplingParams(temperature=0, presence_penalty=1.0)], 4, CPU)
    with pytest.raises(ValueError, match="counts"):
        pick(torch.zeros(1, 4), batch, [None])
