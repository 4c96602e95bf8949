"""The decode step in one C call (llama3.fastpath) against Transformer.forward.

Tolerances. With float weights (``float_weights=True``) the C step does the same float32 arithmetic
as forward in another order (norm sums, attention in key chunks, a polynomial exp): logits agree to
~1e-6 relative, checked at atol 1e-4 as in test_model.py. With quantized weights the activations are
rounded to int8 before every matmul, so a last-bit difference upstream can move one activation by a
whole int8 step (~0.4% of its block's largest value) and the two paths drift apart by up to ~0.5 in
a logit over 30 layers; there the check is distributional (KL and top-1 agreement), like the quality
tests in test_quantize.py. Batches are held to exact equality with single rows: every row is
computed by the same operations whatever the batch.
"""

import pytest
import torch

from helpers import TINY_VARIANTS, hf_model, ours_from_hf
from llama3 import KVCache, kernels
from llama3.fastpath import FastDecoder
from llama3.quantize import fuse, quantize_model

ATOL = 1e-4


@pytest.fixture(autouse=True)
def need_kernels():
    if kernels.library() is None:
        pytest.fail(f"the C kernels did not build here: {kernels.why_not()}")


def forward_steps(model, tokens, cache, start=0):
    """Logits (seq, vocab) feeding tokens (list) one at a time through forward."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([[t]]), start_pos=start + i, cache=cache)[0, -1]
                            for i, t in enumerate(tokens)])


def fast_steps(decoder, tokens, cache, start=0, row=None):
    return torch.stack([decoder([t], [start + i], cache, rows=None if row is None else [row])[0]
                        for i, t in enumerate(tokens)])


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_float_weights_equal_forward_on_every_variant(variant):
    """Every architecture variant (MHA, GQA, MQA, 9 heads / 3 KV, tied, 3.1 RoPE scaling past the original
    context), 70 steps, including the cache contents the step writes."""
    model = ours_from_hf(hf_model(variant))
    fast = FastDecoder(model, float_weights=True)
    tokens = torch.randint(0, model.args.vocab_size, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    c1 = KVCache(model.args, max_batch_size=1, max_seq_len=80)
    c2 = KVCache(model.args, max_batch_size=1, max_seq_len=80)
    expected = forward_steps(model, tokens, c1)
    got = fast_steps(fast, tokens, c2)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(c2.k, c1.k, atol=1e-5, rtol=0)
    torch.testing.assert_close(c2.v, c1.v, atol=1e-5, rtol=0)


def test_float_weights_fused_and_after_a_forward_prefill():
    """Prefill by forward (chunked GEMM path), then decode by the fast step from the same cache; long enough
    that attention spans several key chunks."""
    model = ours_from_hf(hf_model("gqa2", max_position_embeddings=400))
    fuse(model)
    fast = FastDecoder(model, float_weights=True)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.args.vocab_size, (1, 300), generator=g)
    more = torch.randint(0, model.args.vocab_size, (20,), generator=g).tolist()
    c1 = KVCache(model.args, max_batch_size=1, max_seq_len=400)
    c2 = KVCache(model.args, max_batch_size=1, max_seq_len=400)
    with torch.no_grad():
        model(prompt, start_pos=0, cache=c1)
        model(prompt, start_pos=0, cache=c2)
    torch.testing.assert_close(fast_steps(fast, more, c2, start=300), forward_steps(model, more, c1, start=300),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_quantized_tiny_model_close_to_forward(scheme, fused):
    model = ours_from_hf(hf_model("gqa2", hidden_size=128, intermediate_size=256, num_attention_heads=4))
    quantize_model(model, scheme)
    if fused:
        fuse(model)
    fast = FastDecoder(model)
    tokens = torch.randint(0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    c1, c2 = (KVCache(model.args, max_batch_size=1, max_seq_len=48) for _ in range(2))
    expected, got = forward_steps(model, tokens, c1), fast_steps(fast, tokens, c2)
    p, q = torch.log_softmax(expected, -1), torch.log_softmax(got, -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl < 1e-3, kl
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


def test_batch_rows_equal_single_rows_exactly(smollm2_fast):
    """Three sequences at different positions in rows 2, 0, 3 of a 4-row cache, decoded together, give
    bit-for-bit what each gives alone, and leave every other row untouched."""
    llm = smollm2_fast
    fast = FastDecoder(llm.model)
    prompts = [llm.encode_prompt(p) for p in ("The capital of France is", "1, 2, 3, 4,", "Once upon a time there")]
    rows = [2, 0, 3]
    batch_cache = KVCache(llm.args, max_batch_size=4, max_seq_len=64)
    singles = [KVCache(llm.args, max_batch_size=1, max_seq_len=64) for _ in prompts]
    with torch.no_grad():
        for p, r, single in zip(prompts, rows, singles):
            llm.model(torch.tensor([p]), start_pos=0, cache=batch_cache.rows(r, r + 1))
            llm.model(torch.tensor([p]), start_pos=0, cache=single)
    untouched = batch_cache.k[:, 1].clone()
    positions = [len(p) for p in prompts]
    tokens = [p[-1] for p in prompts]
    for _ in range(6):
        together = fast(tokens, positions, batch_cache, rows=rows)
        alone = torch.stack([fast([t], [pos], c)[0] for t, pos, c in zip(tokens, positions, singles)])
        assert torch.equal(together, alone)
        tokens = together.argmax(-1).tolist()
        positions = [pos + 1 for pos in positions]
    assert torch.equal(batch_cache.k[:, 1], untouched)


def test_quantized_smollm2_close_to_forward_and_to_float(smollm2, smollm2_fast):
    """The default GGUF path: the fast step against forward on the same quantized model, and against the
    float32 model (the number the README quotes)."""
    llm = smollm2_fast
    fast = FastDecoder(llm.model)
    kl_fwd, kl_float, agree_fwd, agree_float, total = [], [], 0, 0, 0
    for prompt in ("The capital of France is", "def fibonacci(n):\n    if n < 2:",
                   "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n"):
        ids = llm.tokenizer.encode(prompt, allow_special=True)
        c1, c2 = (KVCache(llm.args, max_batch_size=1, max_seq_len=64) for _ in range(2))
        got = torch.log_softmax(fast_steps(fast, ids, c2), -1)
        ref = torch.log_softmax(forward_steps(llm.model, ids, c1), -1)
        with torch.no_grad():
            flt = torch.log_softmax(smollm2.model(torch.tensor([ids]))[0], -1)
        kl_fwd.append(float((ref.exp() * (ref - got)).sum(-1).mean()))
        kl_float.append(float((flt.exp() * (flt - got)).sum(-1).mean()))
        agree_fwd += int((ref.argmax(-1) == got.argmax(-1)).sum())
        agree_float += int((flt.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
    kl_fwd, kl_float = sum(kl_fwd) / len(kl_fwd), sum(kl_float) / len(kl_float)
    print(f"fast step vs forward (same quantized model): KL {kl_fwd:.5f}, top-1 {agree_fwd / total:.3f}; "
          f"vs float32: KL {kl_float:.5f}, top-1 {agree_float / total:.3f}")
    assert kl_fwd < 0.01 and agree_fwd / total > 0.9
    assert kl_float < 0.02 and agree_float / total > 0.9


def test_generator_uses_the_fast_step_where_it_can(smollm2, smollm2_fast):
    assert isinstance(smollm2_fast.generator.decoder(), FastDecoder)
    assert not isinstance(smollm2.generator.decoder(), FastDecoder)  # quantize=None: the exact path
    assert "float weights" in FastDecoder.why_not(smollm2.model)
    gen = smollm2_fast.generator
    gen.fast_decode = False
    try:
        assert not isinstance(gen.decoder(), FastDecoder)
        slow = smollm2_fast.generate("The capital of France is", max_new_tokens=4, temperature=0)
    finally:
        gen.fast_decode = True
    fast = smollm2_fast.generate("The capital of France is", max_new_tokens=4, temperature=0)
    assert fast.token_ids[:2] == slow.token_ids[:2]  # (later tokens may part ways on near-ties)


def test_forward_decoder_takes_any_cache_rows(smollm2_fast):
    """Without the fast step (as the server runs a float model), ``Generator.decoder`` decodes listed rows of a
    shared cache through forward; each equals the same sequence decoded alone."""
    llm = smollm2_fast
    gen = llm.generator
    gen.fast_decode = False
    try:
        decode = gen.decoder()
    finally:
        gen.fast_decode = True
    assert not isinstance(decode, FastDecoder)
    prompts = [llm.encode_prompt(p) for p in ("The capital of France is", "1, 2, 3, 4,")]
    rows = [2, 0]
    shared = KVCache(llm.args, max_batch_size=3, max_seq_len=32)
    singles = [KVCache(llm.args, max_batch_size=1, max_seq_len=32) for _ in prompts]
    with torch.no_grad():
        for p, r, single in zip(prompts, rows, singles):
            llm.model(torch.tensor([p]), start_pos=0, cache=shared.rows(r, r + 1))
            llm.model(torch.tensor([p]), start_pos=0, cache=single)
    tokens, positions = [p[-1] for p in prompts], [len(p) for p in prompts]
    together = decode(tokens, positions, shared, rows=rows)
    alone = torch.cat([decode([t], [pos], c) for t, pos, c in zip(tokens, positions, singles)])
    assert together.shape == (2, llm.args.vocab_size)
    assert torch.equal(together, alone)  # forward's batched decode is batch-invariant too


def test_traced_models_take_forward():
    from llama3.explain import Trace

    model = ours_from_hf(hf_model("gqa2"))
    quantize_model(model, "int8")
    with Trace(model):
        assert "trace" in FastDecoder.why_not(model)
    assert FastDecoder.why_not(model) is None


def test_bad_calls_are_refused(smollm2_fast):
    llm = smollm2_fast
    fast = FastDecoder(llm.model)
    cache = KVCache(llm.args, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match="vocabulary"):
        fast([llm.args.vocab_size], [0], cache)
    with pytest.raises(ValueError, match="position 16"):
        fast([1], [16], cache)
    with pytest.raises(ValueError, match="row 2"):
        fast([1], [0], cache, rows=[2])
    with pytest.raises(ValueError, match="share a cache row"):
        fast([1, 2], [0, 0], cache, rows=[1, 1])
    with pytest.raises(ValueError, match="one token, position and row"):
        fast([1, 2], [0], cache)
    with pytest.raises(ValueError, match="does not match the model"):
        fast([1], [0], KVCache(llm.args, max_batch_size=1, max_seq_len=16, dtype=torch.float16))


def test_thread_count_is_measured_and_never_changes_the_logits(smollm2_fast):
    from llama3.fastpath import ThreadTuner, tuned_threads

    llm = smollm2_fast
    fast = FastDecoder(llm.model)
    cache = KVCache(llm.args, max_batch_size=1, max_seq_len=32)
    one = fast([5], [0], cache, threads=1)
    two = fast([5], [0], cache, threads=2)
    assert torch.equal(one, two)
    tuner = ThreadTuner(4)
    assert tuner.candidates == [4, 3, 2] and tuner.best is None
    for _ in range(ThreadTuner.TRIALS):
        for c in tuner.candidates:
            assert tuner.pick() == c  # rotates through the candidates
            tuner.record(c, {4: 0.02, 3: 0.01, 2: 0.03}[c])
    assert tuner.best == 3 and tuner.pick() == 3
    assert ThreadTuner(1).best == 1
    for i in range(3 * ThreadTuner.TRIALS):
        fast([5], [i], cache)
    assert tuned_threads(llm.model) in range(1, torch.get_num_threads() + 1)
