"""Parity of our Transformer with transformers' LlamaForCausalLM on tiny random configs.

Tolerance: both run in float32 with the same weights; the remaining differences are
summation order (SDPA vs eager matmul-softmax, RoPE pairs vs halves), ~1e-6 relative. We
allow atol=1e-4 on logits of magnitude ~1, far below any real bug (a wrong RoPE layout,
mask or norm moves logits by 1e-1 or more).
"""

import pytest
import torch

from helpers import TINY_VARIANTS, hf_model, ours_from_hf
from llama3 import KVCache, ModelArgs, Transformer
from llama3.model import rope_frequencies
from llama3.weights.hf import hf_to_meta_qk, meta_to_hf_qk

ATOL = 1e-4


def tokens_for(model, batch=2, seq=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_whole_sequence_logits(variant):
    hf = hf_model(variant)
    ours = ours_from_hf(hf)
    tokens = tokens_for(hf)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_token_by_token_decoding_through_cache(variant):
    hf = hf_model(variant)
    ours = ours_from_hf(hf)
    tokens = tokens_for(hf, seq=36)
    cache = KVCache(ours.args, max_batch_size=2, max_seq_len=64)
    with torch.no_grad():
        expected = hf(tokens).logits
        steps = [ours(tokens[:, i:i + 1], start_pos=i, cache=cache) for i in range(tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["gqa2", "rope_scaled", "tied"])
def test_chunked_prefill(variant):
    hf = hf_model(variant)
    ours = ours_from_hf(hf)
    tokens = tokens_for(hf, seq=45)
    cache = KVCache(ours.args, max_batch_size=2, max_seq_len=64)
    with torch.no_grad():
        expected = hf(tokens).logits
        chunks = [ours(tokens[:, s:s + 16], start_pos=s, cache=cache) for s in range(0, 45, 16)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=ATOL, rtol=0)


def test_rope_scaling_reaches_beyond_original_context():
    hf = hf_model("rope_scaled")
    ours = ours_from_hf(hf)
    args = ours.args
    assert args.use_scaled_rope and args.rope_original_max_seq_len == 32
    freqs = rope_frequencies(args)
    plain = rope_frequencies(args.replace(use_scaled_rope=False))
    ratio = plain / freqs
    # Some bands untouched, some divided by the full factor, some in between.
    assert torch.isclose(ratio, torch.tensor(1.0)).any()
    assert torch.isclose(ratio, torch.tensor(8.0)).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()
    tokens = tokens_for(hf, seq=100)  # 3x the original context
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=ATOL, rtol=0)


def test_per_row_start_positions_match_single_rows():
    hf = hf_model("gqa2")
    ours = ours_from_hf(hf)
    a, b = tokens_for(hf, batch=1, seq=20, seed=2), tokens_for(hf, batch=1, seq=20, seed=3)
    cache = KVCache(ours.args, max_batch_size=2, max_seq_len=64)
    with torch.no_grad():
        # Row 0 prefills 12 tokens, row 1 prefills 7; then both step together at different positions.
        ours(a[:, :12], start_pos=0, cache=cache)
        cache_b = KVCache(ours.args, max_batch_size=1, max_seq_len=64)
        ours(b[:, :7], start_pos=0, cache=cache_b)
        cache.k[:, 1:2] = cache_b.k
        cache.v[:, 1:2] = cache_b.v
        step = torch.cat([a[:, 12:13], b[:, 7:8]])
        got = ours(step, start_pos=torch.tensor([12, 7]), cache=cache)
        expected_a = ours(a[:, :13])[:, -1]
        expected_b = ours(b[:, :8])[:, -1]
    torch.testing.assert_close(got[:, 0], torch.cat([expected_a, expected_b]), atol=ATOL, rtol=0)


def test_qk_permutation_round_trip():
    w = torch.randn(4 * 16, 64)
    assert torch.equal(meta_to_hf_qk(hf_to_meta_qk(w, 4), 4), w)
    assert not torch.equal(hf_to_meta_qk(w, 4), w)


def test_tied_output_shares_storage():
    ours = ours_from_hf(hf_model("tied"))
    assert ours.output.weight is ours.tok_embeddings.weight
    assert "output.weight" not in dict(ours.named_parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_and_stays_close(dtype):
    hf = hf_model("gqa2")
    ours = ours_from_hf(hf)
    tokens = tokens_for(hf, seq=16)
    with torch.no_grad():
        reference = ours(tokens)
        low = ours.to(dtype)
        cache = KVCache(low.args, max_batch_size=2, max_seq_len=32, dtype=dtype)
        got = low(tokens, cache=cache)
        nxt = low(tokens[:, :1], start_pos=16, cache=cache)
    assert got.dtype == torch.float32 and nxt.shape == (2, 1, 128)
    assert (got - reference).abs().max() < 0.1  # bf16 has ~3 significant digits


def test_meta_state_dict_loads_with_load_state_dict():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=16)
    a, b = Transformer(args), Transformer(args)
    b.load_state_dict(a.state_dict())
    names = set(a.state_dict())
    assert {"tok_embeddings.weight", "layers.1.attention.wq.weight", "layers.0.feed_forward.w3.weight",
            "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight", "output.weight"} <= names


@pytest.fixture(scope="module")
def engine():
    from llama3.engine import Engine
    from llama3.tokenizer import Tokenizer

    class Bytes(Tokenizer):  # a minimal tokenizer: ids are byte values
        path, bos_id, eos_id, add_bos, special_tokens, stop_ids = "bytes", None, None, False, {}, set()
        _token_bytes = [bytes([i]) for i in range(50)]

    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=16)
    return Engine(Transformer(args), Bytes(), decoder="torch")


class TestBadInput:
    """The model runs unchecked (no validation on the hot path); every prompt is checked once, where it
    enters the engine, with an error that names the numbers."""

    def check(self, engine, message, prompt):
        with pytest.raises(ValueError) as e:
            engine.check_prompt(prompt)
        assert message in str(e.value)

    def test_prompt_longer_than_the_context(self, engine):
        self.check(engine, "the prompt has 16 tokens, but the context holds 16", [1] * 16)

    def test_ids_outside_vocab(self, engine):
        self.check(engine, "token id 50 is outside the vocabulary [0, 50)", [1, 50])
        self.check(engine, "token id -1 is outside the vocabulary [0, 50)", [-1, 2])
        self.check(engine, "token id 1.0 is outside the vocabulary", [1.0])

    def test_empty(self, engine):
        self.check(engine, "the prompt is empty", [])


def test_last_only_equals_the_last_row():
    hf = hf_model("tied")
    ours = ours_from_hf(hf)
    tokens = tokens_for(hf, seq=20)
    with torch.no_grad():
        full = ours(tokens)
        last = ours(tokens, last_only=True)
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=0)
