"""The decoders: the one-call C step (CDecoder) against Transformer.forward (TorchDecoder), and the C
paged attention against a plain softmax(q·Kᵀ/√d)·V written here.

Tolerances. With float weights (``float_weights=True``) the C step does the same float32 arithmetic as
forward in another order (norm sums, attention in key chunks, a polynomial exp): logits agree to ~1e-6
relative, checked at atol 1e-4 as in test_model.py, cache contents at 1e-5. With quantized weights the
activations are rounded to int8 before every matmul, so a last-bit difference upstream can move one
activation by a whole int8 step (~0.4% of its block's largest value) and the two paths drift apart by up
to ~0.5 in a logit over 30 layers; there the check is distributional (KL and top-1 agreement), like the
quality tests in test_quantize.py. Batches are held to exact equality with single rows: every row is
computed by the same operations whatever the batch and the thread count.
"""

import math

import pytest
import torch

from helpers import TINY_VARIANTS, hf_model, ours_from_hf
from llama3 import kernels
from llama3.engine import PagedKVCache, TorchDecoder
from llama3.engine.cdecoder import CDecoder, ThreadTuner
from llama3.quantize import quantize_model

ATOL = 1e-4


@pytest.fixture(autouse=True)
def need_kernels():
    if kernels.library() is None:
        pytest.fail(f"the C kernels did not build here: {kernels.why_not()}")


def decode(decoder, prompt, tokens, sid=None):
    """Prefill ``prompt`` into a new sequence, then feed ``tokens`` one step at a time: logits (len(tokens)+1, vocab)."""
    cache = decoder.cache
    if sid is None:
        sid, _ = cache.open(prompt)
    cache.reserve(sid, len(prompt) + len(tokens) + 1)
    out = [decoder.prefill(prompt, sid, 0)]
    cache.append(sid, prompt)
    for i, t in enumerate(tokens):
        out.append(decoder.step([t], [len(prompt) + i], [sid])[0])
        cache.append(sid, [t])
    return torch.stack(out), sid


def pool_of(model, dtype=torch.float32, tokens=512, block_size=32):
    return PagedKVCache(model.args, tokens, dtype=dtype, block_size=block_size, prefix_caching=False)


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_float_weights_equal_forward_on_every_variant(variant):
    """Every architecture variant (MHA, GQA, MQA, 9 heads / 3 KV with head size 10, tied, 3.1 RoPE scaling past
    the original context), 70 steps after a 5-token prefill, including the cache contents the step writes."""
    model = ours_from_hf(hf_model(variant))
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.args.vocab_size, (5,), generator=g).tolist()
    tokens = torch.randint(0, model.args.vocab_size, (70,), generator=g).tolist()
    ref, fast = TorchDecoder(model, pool_of(model)), CDecoder(model, pool_of(model), float_weights=True)
    expected, s1 = decode(ref, prompt, tokens)
    got, s2 = decode(fast, prompt, tokens)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    b1, b2 = ref.cache.blocks_of(s1), fast.cache.blocks_of(s2)
    torch.testing.assert_close(fast.cache.pool[b2], ref.cache.pool[b1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cache_equals_forward_over_the_same_cache(kv_dtype):
    """float16/bfloat16 caches: both decoders round keys and values to nearest even; the float32 values they
    round differ in the last bits, which can tip a rounding to the neighbouring value (one unit in the last
    place of the cache's dtype at most)."""
    model = ours_from_hf(hf_model("gqa2", max_position_embeddings=400))
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.args.vocab_size, (300,), generator=g).tolist()  # spans 3 attention chunks
    tokens = torch.randint(0, model.args.vocab_size, (20,), generator=g).tolist()
    ref, fast = TorchDecoder(model, pool_of(model, kv_dtype)), CDecoder(model, pool_of(model, kv_dtype),
                                                                      float_weights=True)
    expected, s1 = decode(ref, prompt, tokens)
    got, s2 = decode(fast, prompt, tokens)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    a, b = fast.cache.pool[fast.cache.blocks_of(s2)].float(), ref.cache.pool[ref.cache.blocks_of(s1)].float()
    ulp = torch.finfo(kv_dtype).eps * b.abs().clamp(min=torch.finfo(kv_dtype).tiny)
    assert ((a - b).abs() <= ulp).all()
    assert (a != b).float().mean() < 0.01  # and only rarely


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2, 64), (6, 6, 32), (4, 1, 128), (9, 3, 10)], ids=str)
def test_paged_attention_equals_plain_softmax(dtype, heads):
    """Random keys and values in a pool, scattered block tables, lengths across chunk edges: the C kernel
    against softmax(q·Kᵀ/√d)·V computed here in float64 from the same (rounded) cache contents."""
    H, KVH, D = heads
    g = torch.Generator().manual_seed(0)
    n_blocks, n_layers, bs = 40, 2, 16
    pool = torch.randn(n_blocks, n_layers, 2, KVH, bs, D, generator=g).to(dtype)
    lens = [1, 17, 128, 129, 300]
    tables = torch.stack([torch.randperm(n_blocks, generator=g)[:20] for _ in lens])  # (B, 20): non-contiguous
    q = torch.randn(len(lens), H, D, generator=g)
    layer, scale = 1, 1 / math.sqrt(D)
    got = kernels.paged_attention(pool, layer, q, tables, lens, scale)
    for b, n in enumerate(lens):
        blocks = pool[tables[b], layer].double()  # (20, 2, KVH, bs, D)
        k = blocks[:, 0].transpose(0, 1).reshape(KVH, -1, D)[:, :n].repeat_interleave(H // KVH, 0)
        v = blocks[:, 1].transpose(0, 1).reshape(KVH, -1, D)[:, :n].repeat_interleave(H // KVH, 0)
        probs = torch.softmax((q[b].double()[:, None] @ k.transpose(1, 2))[:, 0] * scale, dim=-1)
        expected = (probs[:, None] @ v)[:, 0]
        torch.testing.assert_close(got[b].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_tiny_model_close_to_forward(scheme):
    model = ours_from_hf(hf_model("gqa2", hidden_size=128, intermediate_size=256, num_attention_heads=4))
    quantize_model(model, scheme)
    tokens = torch.randint(0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    expected, _ = decode(TorchDecoder(model, pool_of(model, torch.float16)), tokens[:1], tokens[1:])
    got, _ = decode(CDecoder(model, pool_of(model, torch.float16)), tokens[:1], tokens[1:])
    p, q = torch.log_softmax(expected, -1), torch.log_softmax(got, -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl < 1e-3, kl
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


def test_batch_rows_equal_single_rows_exactly(smollm2_fast):
    """Three sequences at different positions, decoded together in one step, give bit-for-bit what each
    gives alone, at 1 and 2 threads."""
    llm = smollm2_fast
    prompts = [llm.encode_prompt(p) for p in ("The capital of France is", "1, 2, 3, 4,", "Once upon a time there")]
    shared = CDecoder(llm.model, pool_of(llm.model, torch.float16))
    sids = []
    for p in prompts:
        sid, _ = shared.cache.open(p)
        shared.cache.reserve(sid, 64)
        shared.prefill(p, sid, 0)
        shared.cache.append(sid, p)
        sids.append(sid)
    alone = [CDecoder(llm.model, pool_of(llm.model, torch.float16)) for _ in prompts]
    single_sids = [decode(d, p, [])[1] for d, p in zip(alone, prompts)]
    for d, sid in zip(alone, single_sids):
        d.cache.reserve(sid, 64)
    tokens, positions = [p[-1] for p in prompts], [len(p) for p in prompts]
    for i in range(6):
        shared.tuners[True].best = shared.tuners[False].best = 1 + i % 2  # both thread counts
        together = shared.step(tokens, positions, sids)
        singles = torch.stack([d.step([t], [pos], [s])[0] for d, t, pos, s in zip(alone, tokens, positions,
                                                                                 single_sids)])
        assert torch.equal(together, singles)
        tokens = together.argmax(-1).tolist()
        positions = [pos + 1 for pos in positions]


def test_quantized_smollm2_close_to_forward_and_to_float(smollm2, smollm2_fast):
    """The default GGUF path: the C step against forward on the same quantized model, and against the
    float32 model (the number the README quotes)."""
    llm = smollm2_fast
    kl_fwd, kl_float, agree_fwd, agree_float, total = [], [], 0, 0, 0
    for prompt in ("The capital of France is", "def fibonacci(n):\n    if n < 2:",
                   "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n"):
        ids = llm.tokenizer.encode(prompt, allow_special=True)
        got = torch.log_softmax(decode(CDecoder(llm.model, pool_of(llm.model, torch.float16)), ids[:1], ids[1:])[0], -1)
        ref = torch.log_softmax(decode(TorchDecoder(llm.model, pool_of(llm.model, torch.float16)), ids[:1],
                                       ids[1:])[0], -1)
        with torch.no_grad():
            flt = torch.log_softmax(smollm2.model(torch.tensor([ids]))[0], -1)
        kl_fwd.append(float((ref.exp() * (ref - got)).sum(-1).mean()))
        kl_float.append(float((flt.exp() * (flt - got)).sum(-1).mean()))
        agree_fwd += int((ref.argmax(-1) == got.argmax(-1)).sum())
        agree_float += int((flt.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
    kl_fwd, kl_float = sum(kl_fwd) / len(kl_fwd), sum(kl_float) / len(kl_float)
    print(f"C step vs forward (same quantized model): KL {kl_fwd:.5f}, top-1 {agree_fwd / total:.3f}; "
          f"vs float32: KL {kl_float:.5f}, top-1 {agree_float / total:.3f}")
    assert kl_fwd < 0.01 and agree_fwd / total > 0.9
    assert kl_float < 0.02 and agree_float / total > 0.9


def test_policy_chooses_the_c_step_where_it_can(smollm2, smollm2_fast):
    from llama3.engine import choose_decoder

    assert isinstance(smollm2_fast.generator.engine.decoder, CDecoder)
    assert choose_decoder(smollm2_fast.model).name == "c"
    exact = choose_decoder(smollm2.model)  # quantize=None: the exact float path
    assert exact.name == "torch" and "float weights" in exact.reason
    assert not isinstance(smollm2.generator.engine.decoder, CDecoder)


def test_traced_models_take_forward():
    from llama3.explain import Trace

    model = ours_from_hf(hf_model("gqa2"))
    quantize_model(model, "int8")
    with Trace(model):
        assert "trace" in CDecoder.why_not(model)
    assert CDecoder.why_not(model) is None


def test_bad_calls_are_refused(smollm2_fast):
    model = smollm2_fast.model
    d = CDecoder(model, pool_of(model, torch.float16, tokens=64))
    sid, _ = d.cache.open([1])
    d.cache.reserve(sid, 32)
    with pytest.raises(ValueError, match="vocabulary"):
        d.step([model.args.vocab_size], [0], [sid])
    with pytest.raises(ValueError, match="position 32 .* no cache block"):
        d.step([1], [32], [sid])
    with pytest.raises(ValueError, match="distinct sequence"):
        d.step([1, 2], [0, 0], [sid, sid])
    with pytest.raises(ValueError, match="distinct sequence"):
        d.step([1, 2], [0], [sid])
    with pytest.raises(ValueError, match="cannot run this model"):
        CDecoder(ours_from_hf(hf_model("gqa2")), pool_of(model))  # float weights without float_weights=True


def test_thread_count_is_measured_rechecked_and_never_changes_the_logits(smollm2_fast):
    model = smollm2_fast.model
    d = CDecoder(model, pool_of(model, torch.float16, tokens=64))
    sid, _ = d.cache.open([5])
    d.cache.reserve(sid, 32)
    d.tuners[False].best = 1
    one = d.step([5], [0], [sid])
    d.tuners[False].best = 2
    assert torch.equal(one, d.step([5], [0], [sid]))
    tuner = ThreadTuner(4)
    assert tuner.candidates == [4, 3, 2] and tuner.best is None
    for _ in range(ThreadTuner.TRIALS):
        for c in tuner.candidates:
            assert tuner.pick() == c  # rotates through the candidates
            tuner.record(c, {4: 0.02, 3: 0.01, 2: 0.03}[c])
    assert tuner.best == 3 and tuner.pick() == 3
    for _ in range(ThreadTuner.RECHECK):  # then it keeps the choice for a while...
        assert tuner.pick() == 3
        tuner.record(3, 0.01)
    for _ in range(ThreadTuner.TRIALS):  # ...and measures again: the machine got busy, 2 threads win now
        for c in tuner.candidates:
            assert tuner.pick() == c
            tuner.record(c, {4: 0.05, 3: 0.04, 2: 0.01}[c])
    assert tuner.best == 2
    assert ThreadTuner(1).best == 1
