"""The paged KV cache and the continuous-batching loop.

Every check compares what a sequence gets inside a busy engine (interleaved with others, admitted and
cancelled in random orders, set aside when memory runs out, reusing cached prefixes) with the same
request run alone in a fresh engine. With the C step (float weights here, so the comparison is with
the engine's own arithmetic) decode is batch-invariant bit for bit; prefill of a reused prefix was
computed by an earlier forward over a different number of rows, whose GEMM may round the last bit
differently, so logits are compared at 1e-5 and greedy tokens exactly.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import hf_model, ours_from_hf
from llama3.engine import CacheFull, Engine, PagedKVCache, Request
from llama3.sampling import SamplingParams
from llama3.tokenizer import Tokenizer


class ByteTokenizer(Tokenizer):
    """Ids are byte values (enough for the loop's detokenizer and stop rules)."""

    def __init__(self, vocab: int):
        self.path, self.bos_id, self.eos_id, self.add_bos = "bytes", None, None, False
        self.special_tokens, self.stop_ids = {}, set()
        self._token_bytes = [bytes([i % 256]) for i in range(vocab)]


@pytest.fixture(scope="module")
def tiny():
    model = ours_from_hf(hf_model("gqa2", max_position_embeddings=256))
    return model, ByteTokenizer(model.args.vocab_size)


class Recorder:
    """A logits processor that records what the loop saw at each step (and changes nothing)."""

    def __init__(self):
        self.logits = []

    def __call__(self, generated, logits):
        self.logits.append(logits.clone())
        return logits


def run_alone(model, tokenizer, prompt, params, decoder):
    engine = Engine(model, tokenizer, decoder=decoder, prefix_caching=False)
    rec = Recorder()
    engine.add(Request(prompt, params, processors=[rec]))
    tokens = [s.token_id for s in engine.run()]
    return tokens, rec.logits


# ------------------------------------------------------------------------------ the cache
def test_blocks_follow_the_sequences(tiny):
    model, _ = tiny
    cache = PagedKVCache(model.args, 256, block_size=16, dtype=torch.float16)
    a, cached = cache.open(list(range(40)))
    assert cached == 0 and cache.blocks_in_use == 0
    cache.reserve(a, 40)
    assert len(cache.blocks_of(a)) == 3 and cache.blocks_in_use == 3
    cache.append(a, list(range(40)))
    assert cache.blocks_filed == 2  # two full blocks filed for reuse; the partial third is not
    b, cached = cache.open(list(range(40)) + [7, 7])
    assert cached == 32 and cache.blocks_of(b)[:2] == cache.blocks_of(a)[:2]  # shared, not copied
    cache.reserve(b, 42)
    assert cache.blocks_of(b)[2] != cache.blocks_of(a)[2]  # the partial block is its own
    cache.close(a)
    cache.close(b)
    assert cache.blocks_in_use == 0 and cache.blocks_filed == 2 and cache.blocks_free == cache.n_blocks
    c, cached = cache.open(list(range(33)))  # a finished sequence's filed blocks still serve new ones
    assert cached == 32
    cache.close(c)


def test_a_prompt_always_leaves_one_token_to_compute(tiny):
    model, _ = tiny
    cache = PagedKVCache(model.args, 256, block_size=16)
    a, _ = cache.open(list(range(32)))
    cache.reserve(a, 32)
    cache.append(a, list(range(32)))
    b, cached = cache.open(list(range(32)))  # the same 32 tokens: only the first block may be reused
    assert cached == 16


def test_eviction_takes_the_least_recently_used_filed_block_and_full_is_an_error(tiny):
    model, _ = tiny
    cache = PagedKVCache(model.args, 64, block_size=16)  # 4 blocks
    for first in (0, 100, 200):
        s, _ = cache.open([first] * 16)
        cache.reserve(s, 16)
        cache.append(s, [first] * 16)
        cache.close(s)
    assert cache.blocks_filed == 3
    s, _ = cache.open([9] * 40)
    cache.reserve(s, 48)  # 3 blocks: the free one, then the two oldest filed ones
    assert cache.blocks_filed == 1
    assert cache.open([200] * 17)[1] == 16  # the newest survived
    with pytest.raises(CacheFull, match="all 4 KV-cache blocks"):
        cache.reserve(s, 80)


def test_freed_blocks_give_their_memory_back(tiny):
    """The pool is address space: pages become resident when written and go back when a block is freed
    (MADV_DONTNEED on private anonymous memory: the next read finds fresh zero pages)."""
    model, _ = tiny
    cache = PagedKVCache(model.args, 4096, block_size=32, dtype=torch.float32, prefix_caching=False)
    s, _ = cache.open([1])
    cache.reserve(s, 1024)
    blocks = cache.blocks_of(s)
    cache.pool[blocks] = 1.0
    assert cache.resident_bytes() == len(blocks) * cache.block_bytes
    cache.close(s)
    assert cache.resident_bytes() == 0 and float(cache.pool[blocks].abs().sum()) == 0.0


# ------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("decoder", ["torch", "c"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_traffic_equals_each_request_alone(tiny, decoder, data):
    """Requests with shared prefixes and different lengths arrive between steps, some are cancelled at
    random moments, the cache is small enough that sequences get set aside and recomputed; each request's
    tokens and logits equal its single run, and every block comes back at the end."""
    from llama3.engine.cdecoder import CDecoder

    model, tok = tiny
    vocab = model.args.vocab_size
    prefixes = [[3, 1, 4, 1, 5] * 8, [2, 7, 1, 8] * 10]
    n = data.draw(st.integers(2, 6), label="requests")
    requests = []
    for i in range(n):
        base = prefixes[data.draw(st.integers(0, 1), label="prefix")]
        cut = data.draw(st.integers(1, len(base)), label="cut")
        tail = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40), label="tail")
        params = SamplingParams(max_new_tokens=data.draw(st.integers(1, 30), label="new"), temperature=0)
        requests.append(Request(base[:cut] + tail, params, processors=[Recorder()]))
    arrive = [data.draw(st.integers(0, 8), label="arrives at step") for _ in requests]
    cancel = {i: data.draw(st.integers(0, 20), label="cancel at step") for i in range(n)
              if data.draw(st.booleans(), label="cancelled")}
    if decoder == "c":
        decoder = lambda m, c: CDecoder(m, c, float_weights=True)  # noqa: E731
    engine = Engine(model, tok, max_batch=3, cache_tokens=160, decoder=decoder, prefill_chunk=24)
    got = {i: [] for i in range(n)}
    finished, step = set(), 0
    while step <= max(arrive) or engine.has_work():
        for i, r in enumerate(requests):
            if arrive[i] == step:
                engine.add(r)
            if cancel.get(i) == step and arrive[i] <= step:
                engine.cancel(r.id)
        by_id = {r.id: i for i, r in enumerate(requests) if r.id >= 0}
        for s in engine.step():
            got[by_id[s.request_id]].append(s.token_id)
            if s.finish_reason:
                finished.add(by_id[s.request_id])
        step += 1
        assert step < 400, "the engine did not finish"
    assert engine.cache.blocks_in_use == 0
    for i, r in enumerate(requests):
        alone_tokens, alone_logits = run_alone(model, tok, r.prompt, r.params, decoder)
        if i not in cancel or i in finished:
            assert got[i] == alone_tokens
        assert got[i] == alone_tokens[:len(got[i])]
        for a, b in zip(r.processors[0].logits, alone_logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoder", ["torch", "c"])
def test_sequences_set_aside_for_memory_come_back_unchanged(tiny, decoder):
    """Three sequences that together outgrow a 5-block cache: the newest is set aside and recomputed later;
    every one still equals its single run."""
    from llama3.engine.cdecoder import CDecoder

    model, tok = tiny
    if decoder == "c":
        decoder = lambda m, c: CDecoder(m, c, float_weights=True)  # noqa: E731
    engine = Engine(model, tok, max_batch=3, cache_tokens=160, decoder=decoder)
    g = torch.Generator().manual_seed(1)
    requests = [Request(torch.randint(0, 128, (40,), generator=g).tolist(), SamplingParams(max_new_tokens=30,
                                                                                            temperature=0))
                for _ in range(3)]
    for r in requests:
        engine.add(r)
    got = {r.id: [] for r in requests}
    for s in engine.run():
        got[s.request_id].append(s.token_id)
    assert engine.set_aside > 0 and engine.cache.blocks_in_use == 0
    for r in requests:
        assert got[r.id] == run_alone(model, tok, r.prompt, r.params, decoder)[0]


def test_prefix_reuse_on_and_off_give_the_same_outputs(tiny):
    model, tok = tiny
    system = list(range(1, 70))
    prompts = [system + [5, 6, 7], system + [9, 9], system + [5, 6, 7, 8]]
    outs = {}
    for reuse in (True, False):
        engine = Engine(model, tok, decoder="torch", prefix_caching=reuse)
        outs[reuse] = []
        for p in prompts:  # one after another: later ones find the system prompt cached
            rec = Recorder()
            req = Request(p, SamplingParams(max_new_tokens=8, temperature=0), processors=[rec])
            engine.add(req)
            outs[reuse].append(([s.token_id for s in engine.run()], rec.logits, req.cached_tokens))
    for (t1, l1, c1), (t2, l2, c2) in zip(outs[True], outs[False]):
        assert t1 == t2 and c2 == 0
        for a, b in zip(l1, l2):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert [c for *_, c in outs[True]] == [0, 64, 64]  # two whole blocks of the system prompt


def test_a_stream_closed_early_cancels_and_frees(smollm2_fast):
    gen = smollm2_fast.generator
    ids = smollm2_fast.encode_prompt("Once upon a time")
    stream = gen.run([ids], SamplingParams(max_new_tokens=50, temperature=0))
    next(stream), next(stream)
    stream.close()
    assert not gen.engine.has_work() and gen.engine.cache.blocks_in_use == 0


def test_second_chat_turn_reuses_the_first(smollm2_fast):
    llm = smollm2_fast
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20},
                {"role": "user", "content": "Name a colour."}]
    first = llm.chat(messages, max_new_tokens=8, temperature=0)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Another one."}]
    second = llm.chat(messages, max_new_tokens=8, temperature=0)
    _, ids = llm.chat_prompt(messages)
    assert second.cached_tokens >= first.prompt_tokens - 32  # all but the last partial block of turn one
    assert second.cached_tokens < len(ids)


def test_prompt_scores_equal_log_softmax_of_forward(tiny):
    """``prompt_logprobs``: each prompt token's logprob (and the top alternatives) equal a log_softmax of one
    forward pass over the prompt, across prefill chunks; ``generate=False`` scores without generating and
    ends with one token-less Step."""
    model, tok = tiny
    prompt = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]))[0], dim=-1)
    engine = Engine(model, tok, decoder="torch", prefill_chunk=32)  # three chunks
    warm = Request(prompt, SamplingParams(max_new_tokens=1, temperature=0))
    engine.add(warm)
    list(engine.run())  # the prompt's blocks are now cached; scoring must not reuse them
    req = Request(prompt, SamplingParams(max_new_tokens=1, temperature=0), prompt_logprobs=3, generate=False)
    engine.add(req)
    steps = list(engine.run())
    assert [(s.token_id, s.finish_reason) for s in steps] == [(-1, "length")] and req.cached_tokens == 0
    assert len(req.prompt_scores) == len(prompt) - 1
    for i, (lp, top) in enumerate(req.prompt_scores):
        assert lp == pytest.approx(float(ref[i, prompt[i + 1]]), abs=1e-4)
        values, ids = torch.topk(ref[i], 3)
        assert list(top) == ids.tolist() and list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
    assert engine.cache.blocks_in_use == 0


def test_a_finished_grammar_ends_the_sequence(tiny):
    model, tok = tiny

    class StopAfterTwo:
        def __init__(self):
            self.n = 0

        def __call__(self, generated, logits):
            return logits

        def accept(self, token):
            self.n += 1

        def is_finished(self):
            return self.n >= 2

    engine = Engine(model, tok, decoder="torch")
    engine.add(Request([1, 2, 3], SamplingParams(max_new_tokens=20, temperature=0), processors=[StopAfterTwo()]))
    steps = list(engine.run())
    assert len(steps) == 2 and steps[-1].finish_reason == "stop"
