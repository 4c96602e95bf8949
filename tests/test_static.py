"""The sync-free static-shape decode step (llama3.engine.static) against ``Transformer.forward``.

Tolerances. Eagerly the step does forward's float32 arithmetic over more keys (the table is padded to a
bucket and the extra keys are masked out: exp(-inf) = 0 adds nothing, but SDPA sums over a longer row in
another blocking), so logits agree to ~1e-7; checked at 1e-4 against a forward over the whole sequence
without a cache, as in test_model.py. Under ``torch.compile`` inductor fuses and reorders the sums
(~1e-6 relative): checked at 1e-4 too, and greedy tokens exactly.
"""

import os

import pytest
import torch

from helpers import TINY_VARIANTS, hf_model, ours_from_hf
from llama3.engine import Engine, PagedKVCache, Request, StaticDecoder, TorchDecoder, choose_decoder, make_decoder
from llama3.engine.static import MIN_KV_BLOCKS, bucket, kv_bucket
from llama3.sampling import SamplingParams
from test_engine import ByteTokenizer

ATOL = 1e-4


def run_steps(decoder, model, prompts, steps, seed=0):
    """Prefill each prompt (through TorchDecoder.prefill), then ``steps`` batched steps of random tokens;
    returns the step logits (steps, batch, vocab) and every sequence's tokens."""
    cache = decoder.cache
    g = torch.Generator().manual_seed(seed)
    sids, seqs = [], []
    for p in prompts:
        sid, _ = cache.open([], reuse=False)
        cache.reserve(sid, len(p) + steps + 1)
        decoder.prefill(p, sid, 0)
        cache.append(sid, p)
        sids.append(sid), seqs.append(list(p))
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, model.args.vocab_size, (len(prompts),), generator=g).tolist()
        out.append(decoder.step(tokens, [cache.length(s) for s in sids], sids))
        for sid, seq, t in zip(sids, seqs, tokens):
            cache.append(sid, [t])
            seq.append(t)
    return torch.stack(out), seqs, sids


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_step_equals_forward_on_every_variant(variant):
    """Three sequences (a batch padded to 4) of lengths that cross a table bucket (block size 4: 16 blocks
    hold 64 positions), 8 steps: each step's logits equal forward over the whole sequence, and what the step
    wrote to each sequence's blocks equals what TorchDecoder writes."""
    model = ours_from_hf(hf_model(variant))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist() for n in (3, 30, 60)]
    pools = [PagedKVCache(model.args, 512, block_size=4, dtype=torch.float32, prefix_caching=False) for _ in range(2)]
    static, ref = StaticDecoder(model, pools[0]), TorchDecoder(model, pools[1], batch_invariant=False)
    got, seqs, sids = run_steps(static, model, prompts, 8)
    _, _, ref_sids = run_steps(ref, model, prompts, 8)
    assert {w for shape in static.compile_seconds for w in shape[1:]} == {16, 32}  # both table buckets ran
    with torch.inference_mode():
        for b, seq in enumerate(seqs):
            full = model(torch.tensor([seq]))[0]  # (len, vocab), no cache
            n = len(prompts[b])
            torch.testing.assert_close(got[:, b], full[n:n + 8], atol=ATOL, rtol=0)
            mine = pools[0].pool[pools[0].blocks_of(sids[b])].flatten(-2)
            theirs = pools[1].pool[pools[1].blocks_of(ref_sids[b])].flatten(-2)
            torch.testing.assert_close(mine[..., :(n + 8) * model.args.head_dim],
                                       theirs[..., :(n + 8) * model.args.head_dim], atol=1e-5, rtol=0)


def test_compiled_step_equals_eager():
    """torch.compile (inductor, default mode) of the same step: one shape, compiled once, timed."""
    model = ours_from_hf(hf_model("gqa2"))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    runs = {}
    for mode in ("eager", "default"):
        cache = PagedKVCache(model.args, 256, block_size=8, dtype=torch.float32, prefix_caching=False)
        decoder = StaticDecoder(model, cache, compile=mode)
        runs[mode] = run_steps(decoder, model, prompts, 4)[0]
    torch.testing.assert_close(runs["default"], runs["eager"], atol=ATOL, rtol=0)
    assert list(decoder.compile_seconds) == [(2, 16)] and decoder.compile_seconds[(2, 16)] > 0
    assert os.path.isdir(decoder.cache_dir)  # inductor's on-disk cache: the next run loads, not compiles


def test_engine_outputs_equal_torch_decoders():
    """Through the engine, with device sampling: greedy requests give TorchDecoder's tokens, and seeded
    sampled ones (penalties, logprobs) the same tokens and logprobs: the same generator draws the same
    noise on a CPU. A request with a logits processor is chosen on the host from the same step."""
    model = ours_from_hf(hf_model("gqa2", max_position_embeddings=256))
    tok = ByteTokenizer(model.args.vocab_size)
    specs = [SamplingParams(max_new_tokens=20, temperature=0),
             SamplingParams(max_new_tokens=20, temperature=0.9, seed=7, logprobs=3),
             SamplingParams(max_new_tokens=12, temperature=1.2, top_k=0, top_p=0.9, min_p=0.0, seed=3,
                            repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.2),
             SamplingParams(max_new_tokens=15, temperature=0, frequency_penalty=1.0)]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 17, 40, 9)]
    outs = {}
    for name in ("torch", "static"):
        engine = Engine(model, tok, max_batch=4, decoder=name)
        assert engine.decoder.name == name
        reqs = [Request(p, s) for p, s in zip(prompts, specs)]
        reqs.append(Request(prompts[0], specs[0], processors=[lambda generated, logits: logits]))
        for r in reqs:
            engine.add(r)
        got = {r.id: [] for r in reqs}
        for s in engine.run():
            got[s.request_id].append((s.token_id, s.logprob, s.top_logprobs))
        outs[name] = [got[r.id] for r in reqs]
    for a, b in zip(outs["torch"], outs["static"]):
        assert [t for t, _, _ in a] == [t for t, _, _ in b]
        for (_, la, ta), (_, lb, tb) in zip(a, b):
            assert la == pytest.approx(lb, abs=1e-5)
            assert list(ta) == list(tb) and list(ta.values()) == pytest.approx(list(tb.values()), abs=1e-5)
    assert [t for t, _, _ in outs["static"][4]] == [t for t, _, _ in outs["static"][0]]


def test_engine_with_shared_prefixes_and_set_aside_equals_torch_decoder():
    """A cache too small for all (sequences are set aside and recomputed), prompts sharing a cached prefix,
    more requests than the batch: every greedy output equals TorchDecoder's engine's, and when all have
    finished every block is free (the padding rows' scratch block is none of them)."""
    model = ours_from_hf(hf_model("gqa2", max_position_embeddings=256))
    tok = ByteTokenizer(model.args.vocab_size)
    system = list(range(1, 70))
    prompts = [system + [5, 6], system + [9], list(range(40, 80)), system + [5, 6, 7], [3] * 50]
    outs = {}
    for name in ("torch", "static"):
        engine = Engine(model, tok, max_batch=3, cache_tokens=320, decoder=name, prefill_chunk=32)
        reqs = [Request(p, SamplingParams(max_new_tokens=40, temperature=0)) for p in prompts]
        for r in reqs:
            engine.add(r)
        got = {r.id: [] for r in reqs}
        for s in engine.run():
            got[s.request_id].append(s.token_id)
        outs[name] = [got[r.id] for r in reqs]
        assert engine.cache.blocks_in_use == 0
        if name == "static":
            assert engine.set_aside > 0 and engine.cache.hits > 0
    assert outs["static"] == outs["torch"]


def test_prefill_with_expanded_kv_heads_equals_grouped():
    """ExpandedPagedView (CUDA's masked prefill chunks) repeats K/V heads; the logits of a prompt prefilled
    in three chunks (the later two masked) equal the grouped-head prefill's, and so does the cache."""
    model = ours_from_hf(hf_model("gqa4"))
    prompt = torch.randint(0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    out = {}
    for expand in (False, True):
        cache = PagedKVCache(model.args, 128, block_size=8, dtype=torch.float32, prefix_caching=False)
        decoder = StaticDecoder(model, cache, expand_kv=expand)
        sid, _ = cache.open([], reuse=False)
        cache.reserve(sid, len(prompt))
        logits = torch.cat([decoder.prefill(prompt[s:s + 16], sid, s, all_logits=True) for s in range(0, 40, 16)])
        out[expand] = logits, cache.pool[cache.blocks_of(sid)]
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-6, rtol=0)


def test_buckets_and_bad_input():
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="largest bucket 8"):
        bucket(9, (1, 2, 4, 8))
    assert [kv_bucket(b, 4096) for b in (1, MIN_KV_BLOCKS, MIN_KV_BLOCKS + 1, 100)] == \
        [MIN_KV_BLOCKS, MIN_KV_BLOCKS, 2 * MIN_KV_BLOCKS, 128]
    assert kv_bucket(100, 40) == 100  # past the model's context the table is as wide as needed
    model = ours_from_hf(hf_model("mha"))
    cache = PagedKVCache(model.args, 64, block_size=8, dtype=torch.float32)
    decoder = StaticDecoder(model, cache)
    sid, _ = cache.open([1, 2])
    cache.reserve(sid, 8)
    with pytest.raises(ValueError, match="as many tokens, positions and slots"):
        decoder.step([1, 2], [0], [sid])
    with pytest.raises(ValueError, match="no block reserved for position 8"):
        decoder.step([1], [8], [sid])
    other, _ = cache.open([3, 4])
    cache.reserve(other, 8)
    small = StaticDecoder(model, cache, batch_buckets=(1,))  # a batch of 2 runs as two steps of 1
    pool = cache.pool.clone()
    both = small.step([5, 6], [2, 2], [sid, other])
    cache.pool.copy_(pool)
    alone = torch.cat([decoder.step([5], [2], [sid]), decoder.step([6], [2], [other])])
    torch.testing.assert_close(both, alone, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        StaticDecoder(model, cache, compile="fast")


def test_policy_names_the_static_step():
    """On a CPU the policy keeps the C step / forward (CUDA picks "static": unmeasured here); "static" is
    selectable by name everywhere."""
    model = ours_from_hf(hf_model("mha"))
    cache = PagedKVCache(model.args, 64, block_size=8, dtype=torch.float32)
    assert choose_decoder(model, torch.float32).name != "static"
    assert isinstance(make_decoder("static", model, cache), StaticDecoder)
    with pytest.raises(ValueError, match="expected auto, c, static or torch"):
        make_decoder("graphs", model, cache)
