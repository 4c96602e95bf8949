"""Fast paths against the plain float path: quantized kernels (C and PyTorch fallback), fused
projections, and the quality of quantized models."""

import os
import subprocess
import sys

import pytest
import torch

import llama3
from llama3 import kernels
from llama3.quantize import QuantLinear, QuantTensor, describe

KINDS = ["q8", "q4_0", "q4_1"]


def random_qtensor(kind, rows, k, seed=0):  # (QuantTensor rounds the scales to float16)
    g = torch.Generator().manual_seed(seed)
    nb = k // 32
    qs = torch.randint(-127, 128, (rows, k), generator=g, dtype=torch.int8) if kind == "q8" else \
        torch.randint(0, 256, (rows, k // 2), generator=g, dtype=torch.uint8)
    d = torch.rand(rows, nb, generator=g) * 0.02
    m = -torch.rand(rows, nb, generator=g) * 0.1 if kind == "q4_1" else None
    return QuantTensor(kind, qs, d, m, rows, k)


@pytest.fixture(params=[True, False], ids=["c", "fallback"])
def use_c(request):
    if request.param and kernels.library() is None:
        pytest.fail(f"the C kernels did not build here: {kernels.why_not()}")
    return request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows, k, n", [(37, 96, 1), (64, 32, 3), (129, 576, 2), (5, 1536, 8)])
def test_kernel_equals_dequantize_then_matmul(kind, rows, k, n, use_c):
    qt = random_qtensor(kind, rows, k)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    y = kernels.qmatmul(kind, qt.qs, qt.d, qt.m, rows, k, x, use_c=use_c)
    # The reference: the same int8 activation blocks, dequantized, times the dequantized weights.
    xq, xd, _ = kernels.quantize_activations(x, use_c=False)
    x_deq = (xq.view(n, -1, 32).float() * xd[..., None]).view(n, k)
    w = kernels.dequantize(kind, qt.qs, qt.d, qt.m, rows, k, use_c=False)
    reference = x_deq @ w.T
    torch.testing.assert_close(y, reference, atol=1e-4 * reference.abs().max().item(), rtol=1e-4)
    # and the activation quantization itself costs under 1% against the exact float product
    exact = x @ w.T
    assert (y - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_c_dequantize_and_activations_match_fallback(kind):
    if kernels.library() is None:
        pytest.fail(f"the C kernels did not build here: {kernels.why_not()}")
    qt = random_qtensor(kind, 33, 160)
    # equal up to one rounding (the compiler may fuse q4_1's n*d + m into one FMA)
    torch.testing.assert_close(kernels.dequantize(kind, qt.qs, qt.d, qt.m, 33, 160, use_c=True),
                               kernels.dequantize(kind, qt.qs, qt.d, qt.m, 33, 160, use_c=False),
                               atol=1e-7, rtol=1e-6)
    x = torch.randn(4, 160) * 3
    for a, b in zip(kernels.quantize_activations(x, True), kernels.quantize_activations(x, False)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_float_round_trip(scheme):
    w = torch.randn(48, 128)
    qt = QuantTensor.from_float(w, scheme)
    err = (qt.dequantize() - w).abs().max() / w.abs().max()
    assert err < (0.01 if scheme == "int8" else 0.1)
    lin = QuantLinear(qt)
    x = torch.randn(20, 128)  # > GEMV_MAX_ROWS: the dequantize + GEMM path
    torch.testing.assert_close(lin(x), x @ qt.dequantize().T, atol=1e-4, rtol=1e-4)


def decode_logits(llm, ids):
    """Logits at every position, one token at a time through the cache: the decode path (kernels)."""
    cache = llama3.KVCache(llm.args, max_batch_size=1, max_seq_len=len(ids) + 1)
    with torch.no_grad():
        return torch.stack([llm.model(torch.tensor([[t]]), start_pos=i, cache=cache)[0, -1]
                            for i, t in enumerate(ids)])


def kl_and_top1(fast, reference, prompts):
    """Next-token KL(float || fast) and top-1 agreement over every position of the prompts, the fast
    model decoding token by token (so every matmul runs the decode kernels, int8 activations included)."""
    kls, agree, total = [], 0, 0
    for prompt in prompts:
        ids = torch.tensor([reference.tokenizer.encode(prompt, allow_special=True)])
        with torch.no_grad():
            p = torch.log_softmax(reference.model(ids)[0], -1)
        q = torch.log_softmax(decode_logits(fast, ids[0].tolist()), -1)
        kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        total += ids.shape[1]
    return sum(kls) / len(kls), agree / total


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:", "Once upon a time, in a land far away,",
           "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n"]


def test_default_gguf_path_is_quantized_and_close_to_float(smollm2, smollm2_fast):
    assert "quantized" in describe(smollm2_fast.model) and "float" in describe(smollm2.model)
    kl, top1 = kl_and_top1(smollm2_fast, smollm2, PROMPTS)
    print(f"GGUF blocks + int8 activations vs float32 dequantized: KL {kl:.5f} nats, top-1 agreement {top1:.3f}")
    assert kl < 0.02 and top1 > 0.9


@pytest.mark.parametrize("scheme, max_kl, min_top1", [("int8", 0.02, 0.9), ("int4", 0.3, 0.6)])
def test_quantize_on_load_quality(smollm2, scheme, max_kl, min_top1):
    fast = llama3.load(quantize=scheme, quiet=True)
    kl, top1 = kl_and_top1(fast, smollm2, PROMPTS)
    print(f"--quantize {scheme} vs float32: KL {kl:.5f} nats, top-1 agreement {top1:.3f}")
    assert kl < max_kl and top1 > min_top1


def test_prefill_path_equals_decode_path(smollm2_fast):
    """Prefill (dequantize + float GEMM) and token-by-token decode (integer kernels) agree."""
    ids = torch.tensor([smollm2_fast.encode_prompt("The quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        whole = smollm2_fast.model(ids)[0, -1]
        cache = llama3.KVCache(smollm2_fast.args, max_batch_size=1, max_seq_len=32)
        for i in range(ids.shape[1]):
            step = smollm2_fast.model(ids[:, i:i + 1], start_pos=i, cache=cache)[0, -1]
    p, q = torch.log_softmax(whole, -1), torch.log_softmax(step, -1)
    assert float((p.exp() * (p - q)).sum()) < 0.01 and whole.argmax() == step.argmax()


def test_without_the_c_kernels_everything_falls_back():
    """With the C library disabled, auto loads the float path and int8 runs on the PyTorch fallback.
    Each kernel equals the fallback to ~1e-6 (tests above); through 30 layers, a last-bit difference
    can flip an activation's int8 rounding, so the model-level check is distributional."""
    code = ("import llama3, torch, sys; from llama3 import kernels; from llama3.quantize import describe\n"
            "assert kernels.library() is None and 'LLAMA3_NO_KERNELS' in kernels.why_not()\n"
            "auto = llama3.load(quiet=True); print(describe(auto.model))\n"
            "q = llama3.load(quiet=True, quantize='int8'); print(describe(q.model))\n"
            "ids = torch.tensor([q.encode_prompt(sys.argv[2])])\n"
            "torch.save(q.model(ids)[0], sys.argv[1])\n")
    import tempfile

    prompt = PROMPTS[3]
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "logits.pt")
        out = subprocess.run([sys.executable, "-c", code, out_path, prompt], capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, LLAMA3_NO_KERNELS="1"))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        assert lines[0].startswith("float")  # auto falls back to the float path without kernels
        assert "PyTorch fallback" in lines[1]
        fallback = torch.load(out_path)
    q = llama3.load(quiet=True, quantize="int8")
    assert "C kernels" in describe(q.model)
    with torch.no_grad():
        c = q.model(torch.tensor([q.encode_prompt(prompt)]))[0]
    p, r = torch.log_softmax(c, -1), torch.log_softmax(fallback, -1)
    kl = float((p.exp() * (p - r)).sum(-1).mean())
    print(f"C kernels vs PyTorch fallback: KL {kl:.6f} nats over {c.shape[0]} positions")
    assert kl < 0.01 and (c.argmax(-1) == fallback.argmax(-1)).float().mean() > 0.95
