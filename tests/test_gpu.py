"""The GPU path on a CUDA device: these run only where one is present (``pytest tests/test_gpu.py`` on the
lent H100/H200); on a CPU-only machine the whole module is skipped, and the CPU halves of the same checks
are in test_static.py, test_device_sampling.py and test_gpu_weights.py.

Tolerances. bfloat16 keeps 8 bits of mantissa: a tiny model's logits (|l| ~ 1) computed in bf16 differ from
float32 by ~1e-2, so bf16 results are compared at atol 5e-2 with the float32 forward, and their top-1 token
must agree where float32's margin exceeds 0.1. Compiled (inductor + CUDA graphs) vs eager bf16 on the same
device: atol 2e-2 (fusions change the rounding points). float32 on CUDA (TF32 off, PyTorch's default for
matmuls) agrees with the CPU to ~1e-5, so greedy outputs of the default model must be equal.
"""

import copy

import pytest
import torch

from helpers import hf_model, ours_from_hf
from llama3.device_sampling import SamplingBatch, pick
from llama3.engine import PagedKVCache, StaticDecoder
from llama3.engine.gpu_weights import to_device
from llama3.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def steps_of(model, mode, prompts, steps=6):
    cache = PagedKVCache(model.args, 512, block_size=8, dtype=model.norm.weight.dtype, device=CUDA,
                         prefix_caching=False)
    decoder = StaticDecoder(model, cache, compile=mode)
    sids, seqs, out = [], [list(p) for p in prompts], []
    for p in prompts:
        sid, _ = cache.open([], reuse=False)
        cache.reserve(sid, len(p) + steps + 1)
        decoder.prefill(p, sid, 0)
        cache.append(sid, p)
        sids.append(sid)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, model.args.vocab_size, (len(prompts),), generator=g).tolist()
        out.append(decoder.step(tokens, [cache.length(s) for s in sids], sids))
        for sid, seq, t in zip(sids, seqs, tokens):
            cache.append(sid, [t])
            seq.append(t)
    return torch.stack(out), seqs


def test_bf16_step_eager_and_graphs_equal_float32_forward():
    ref_model = ours_from_hf(hf_model("gqa2"))
    model = copy.deepcopy(ref_model).to(CUDA, torch.bfloat16)
    model.reset_rope(CUDA)
    prompts = [[1, 2, 3], list(range(5, 40)), [7] * 12]
    eager, seqs = steps_of(model, "eager", prompts)
    graphs, _ = steps_of(model, "reduce-overhead", prompts)
    torch.testing.assert_close(graphs, eager, atol=2e-2, rtol=0)
    with torch.inference_mode():
        for b, seq in enumerate(seqs):
            full = ref_model(torch.tensor([seq]))[0][len(prompts[b]):]
            torch.testing.assert_close(eager[:, b], full, atol=5e-2, rtol=0)
            top2 = full.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 0.1
            assert torch.equal(eager[:, b].argmax(-1)[clear], full.argmax(-1)[clear])


def test_device_sampling_on_cuda_equals_multinomial_with_the_same_generators():
    """On CUDA, torch.multinomial draws argmax(p / Exp(1)) with the generator too: same CUDA generator,
    same token."""
    vocab, g = 1000, torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)] * 4 + [SamplingParams(temperature=0)]
    batch = SamplingBatch.of(params, vocab, CUDA)
    for trial in range(20):
        logits = (torch.randn(len(params), vocab, generator=g) * 3).to(CUDA)
        seeds = [trial * 10 + i for i in range(len(params))]
        got = pick(logits, batch, [torch.Generator(CUDA).manual_seed(s) for s in seeds]).tolist()
        want = [int(torch.multinomial(torch.softmax(logits[i:i + 1], -1), 1,
                                      generator=torch.Generator(CUDA).manual_seed(seeds[i]))) for i in range(4)]
        assert got[:4] == want and got[4] == int(logits[4].argmax())


def test_int4_and_int8_weights_stay_close_to_bf16():
    pytest.importorskip("torchao")
    base = ours_from_hf(hf_model("gqa2", hidden_size=256, intermediate_size=512, num_attention_heads=8))
    tokens = torch.tensor([[5, 17, 99, 3, 64, 12, 80, 7]], device=CUDA)
    with torch.inference_mode():
        ref = to_device(copy.deepcopy(base), CUDA, "bf16")(tokens)[0].float()
        for scheme, kl_max in (("int8", 1e-3), ("int4", 2e-2)):
            got = to_device(copy.deepcopy(base), CUDA, scheme)(tokens)[0].float()
            p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
            assert (p.exp() * (p - q)).sum(-1).max() < kl_max, scheme


def test_greedy_outputs_equal_the_cpu_float_path_on_the_default_model():
    import llama3

    prompt = "Write a haiku about the sea."
    outs = []
    for device in ("cpu", "cuda"):
        llm = llama3.load(quiet=True, device=device, dtype="float32", quantize=None)
        outs.append(llm.generate(prompt, max_new_tokens=32, temperature=0).token_ids)
    assert outs[0] == outs[1]
