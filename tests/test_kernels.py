"""The block kernels (llama3.kernels) against gguf-py, on random blocks of every supported kind, in C
(every ISA this CPU runs) and in the PyTorch fallback.

Tolerances, and why:
- Dequantization is exact (torch.equal) against ``gguf.quants.dequantize``: the C code and the fallback
  do gguf-py's float32 operations one by one (``-ffp-contract=off`` keeps C from fusing them).
- Activation quantization is exact between C and the fallback (the same float32 operations, rounding
  half to even).
- A product is compared with the exact product of the operands the kernel reads: the dequantized
  weights times the dequantized quantized activations, in float64 (``reference``). The fallback is that
  value rounded once. The C kernels sum each block's integer products exactly, then round the scale
  product d_w d_x once and accumulate in float32 lanes: at most ~nb/2 + 10 roundings (nb blocks) on any
  path, each at most u = 2^-24 of the running sum of |terms|. With at most 40 blocks here, 1e-5 of
  sum |w_i x_i| (~170 u) bounds every path with room to spare; ``bound`` computes that sum.
- Against the unquantized activations the product may differ by the activation rounding: each x_i moves
  by at most half its block's step, max|x_block| / 254.
- Batches and thread counts must not change a single bit (torch.equal).
"""

import ctypes
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from llama3 import kernels
from llama3.quantize import QuantEmbedding, QuantLinear, QuantTensor

KINDS = kernels.SUPPORTED_KINDS
ISAS = kernels.available_isas()
IMPLS = ["fallback", *ISAS]


def shapes(kind):
    """(rows, k): rows not a multiple of the 16-row work chunk, several blocks per row, a ragged tail of
    8-block groups; float kinds with rows of odd length."""
    elems = kernels.BLOCK[kind][0]
    if elems == 1:
        return [(1, 7), (37, 67), (130, 1000)]
    if elems == 32:
        return [(1, 32), (37, 7 * 32), (130, 37 * 32)]
    return [(1, 256), (37, 3 * 256), (130, 5 * 256)]


def random_qt(kind, rows, k, seed=0):
    return QuantTensor.random(kind, rows, k, torch.Generator().manual_seed(seed))


def gguf_dequantize(qt):
    return torch.from_numpy(gguf.quants.dequantize(qt.data.numpy(), gguf.GGMLQuantizationType[qt.kind]).copy()
                            .reshape(qt.rows, qt.k).astype(np.float32))


def activations(n, k, seed=1):
    """Random rows with very different scales per block, a block of zeros and a huge value."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    x[:, : min(k, 32)] *= 50.0
    if k >= 96:
        x[:, 64:96] = 0.0
    return x


def quantized_x(kind, x):
    """The activations the kernels multiply, dequantized exactly (float64)."""
    needs = kernels.ACT_NEEDS[kind]
    if not needs:
        return x.double()
    block = 32 if needs == kernels.ACT_Q8 else 256
    q, d = kernels.quantize_activations(x, needs, use_c=False)["q8" if needs == kernels.ACT_Q8 else "q8k"][:2]
    return (q.view(x.shape[0], -1, block).double() * d.double()[..., None]).view(x.shape)


def run(impl, fn, *args, **kw):
    return fn(*args, use_c=False, **kw) if impl == "fallback" else fn(*args, isa=impl, **kw)


def test_every_isa_this_cpu_runs_is_built():
    assert kernels.runnable_isas(), "this CPU runs no ISA of the kernels (need AVX2, FMA, F16C)"
    assert ISAS == kernels.runnable_isas(), {i: kernels.why_not(i) for i in kernels.runnable_isas()}
    assert kernels.isa() == ISAS[-1]  # the best one is used by default


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_equals_gguf_py(kind, impl):
    for i, (rows, k) in enumerate(shapes(kind)):
        qt = random_qt(kind, rows, k, seed=i)
        expected = gguf_dequantize(qt)
        assert torch.equal(run(impl, kernels.dequantize, qt), expected), (rows, k)
        pick = torch.tensor([rows - 1, 0, rows // 2, rows - 1])  # an embedding lookup: any rows, repeats
        assert torch.equal(run(impl, kernels.dequantize, qt, rows=pick), expected[pick])
        # to bfloat16 in the C code: rounded to nearest even, as torch rounds
        assert torch.equal(run(impl, kernels.dequantize, qt, dtype=torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantization_c_equals_fallback(isa):
    x = activations(5, 1024)
    x[2, 300] = 1e30  # one huge value: its block's others round to 0
    both = kernels.ACT_Q8 | kernels.ACT_Q8K
    c, fallback = kernels.quantize_activations(x, both, isa=isa), kernels.quantize_activations(x, both, use_c=False)
    assert c.keys() == fallback.keys() == {"q8", "q8k"}
    for form in c:
        for a, b in zip(c[form], fallback[form]):
            assert a.dtype == b.dtype and torch.equal(a, b), form


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_matmul_equals_dequantized_product(kind, impl):
    for i, (rows, k) in enumerate(shapes(kind)):
        qt = random_qt(kind, rows, k, seed=i)
        w = gguf_dequantize(qt).double()
        for n in (1, 3, 9):
            x = activations(n, k, seed=n)
            y = run(impl, kernels.matmul, qt, x)
            assert y.shape == (n, rows) and y.dtype == torch.float32
            xq = quantized_x(kind, x)
            reference, bound = xq @ w.T, xq.abs() @ w.abs().T
            assert ((y.double() - reference).abs() <= 1e-5 * bound + 1e-30).all(), (rows, k, n)
            # the activation rounding: |x_i - xq_i| <= max|x_block| / 254
            block = {0: 1, kernels.ACT_Q8: 32, kernels.ACT_Q8K: 256}[kernels.ACT_NEEDS[kind]]
            step = x.abs().view(n, -1, block).amax(-1, keepdim=True).expand(n, k // block, block).reshape(n, k)
            exact = x.double() @ w.T
            assert ((y.double() - exact).abs() <= (step.double() / 254 * 1.0001) @ w.abs().T + 2e-5 * bound).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", KINDS)
def test_batches_and_threads_change_no_bit(kind, isa):
    rows, k = shapes(kind)[-1]
    qt = random_qt(kind, rows, k)
    x = activations(7, k)
    batch = kernels.matmul(qt, x, isa=isa, threads=1)
    singles = torch.cat([kernels.matmul(qt, x[i:i + 1], isa=isa, threads=1) for i in range(7)])
    assert torch.equal(batch, singles)
    for threads in (2, 3):
        assert torch.equal(kernels.matmul(qt, x, isa=isa, threads=threads), batch)
        assert torch.equal(kernels.matmul(qt, x[:1], isa=isa, threads=threads), batch[:1])


@pytest.mark.parametrize("impl", IMPLS)
def test_matmul_list_puts_mixed_kinds_side_by_side(impl):
    """Q4_K_M's mix on one input: the C side reads both activation forms in one worksharing loop."""
    qts = [random_qt(kind, rows, 512, seed=i) for i, (kind, rows) in
           enumerate([("Q4_K", 40), ("Q6_K", 17), ("Q8_0", 33), ("F16", 5)])]
    x = activations(3, 512)
    together = run(impl, kernels.matmul_list, qts, x, threads=2)
    assert torch.equal(together, torch.cat([run(impl, kernels.matmul, qt, x) for qt in qts], dim=1))


def test_bad_weights_are_refused():
    qt = random_qt("Q4_K", 4, 256)
    with pytest.raises(ValueError, match=r"\(n, 256\)"):
        kernels.matmul(qt, torch.randn(2, 512))
    with pytest.raises(ValueError, match="different row lengths"):
        kernels.matmul_list([qt, random_qt("Q8_0", 4, 512)], torch.randn(1, 256))
    with pytest.raises(IndexError, match="4 rows"):
        kernels.dequantize(qt, rows=torch.tensor([4]))
    with pytest.raises(IndexError):
        kernels.dequantize(qt, rows=torch.tensor([-1]))
    if ISAS:  # the C side checks the matrices too (a caller bypassing QuantTensor)
        bad = kernels.QMat(kernels.KIND_ID["Q4_K"], qt.data.data_ptr(), 4, 100, 144)
        y = torch.empty(1, 4)
        assert kernels.library().qmatmul(ctypes.byref(bad), 1, torch.randn(1, 100).data_ptr(), 1, y.data_ptr(), 1) == -2
        bad.kind = 99
        assert kernels.library().dequant_rows(ctypes.byref(bad), None, 4, y.data_ptr(), 0, 1) == -2


@pytest.mark.parametrize("isa", ISAS)
def test_a_layout_mismatch_disables_the_library(isa, monkeypatch):
    lib = kernels.library(isa)
    assert kernels._check_abi(lib, isa) is None

    class Shifted(kernels.ctypes.Structure):  # a mirror of qmat that lost a field
        _fields_ = [("kind", ctypes.c_int64), ("data", ctypes.c_void_p), ("rows", ctypes.c_int64),
                    ("k", ctypes.c_int64)]

    monkeypatch.setitem(kernels._MIRRORS, "qmat", Shifted)
    assert "qmat" in kernels._check_abi(lib, isa)
    monkeypatch.setitem(kernels.BLOCK, "Q4_K", (256, 145))
    monkeypatch.setitem(kernels._MIRRORS, "qmat", kernels.QMat)
    assert "Q4_K" in kernels._check_abi(lib, isa)


def _in_subprocess(env, code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_isa_choice_from_the_environment():
    code = "from llama3 import kernels; print(kernels.isa(), '|', kernels.why_not())"
    assert _in_subprocess({"LLAMA3_ISA": "avx2"}, code).startswith("avx2 |")
    assert _in_subprocess({"LLAMA3_ISA": "sse9"}, code) == "None | LLAMA3_ISA=sse9: sse9: unknown ISA 'sse9' " \
                                                         "(expected one of avx2, avx512)"
    assert _in_subprocess({"LLAMA3_NO_KERNELS": "1"}, code) == "None | disabled by LLAMA3_NO_KERNELS"


# ---------------------------------------------------------------------------------------- QuantTensor
def test_from_gguf_and_from_tensor_do_not_copy():
    qt = random_qt("Q6_K", 3, 512)
    raw = np.frombuffer(bytearray(qt.data.numpy().tobytes()), dtype=np.uint8)
    view = QuantTensor.from_gguf(raw, "Q6_K", (3, 512))
    assert view.data.data_ptr() == raw.ctypes.data and view.nbytes == raw.nbytes and view.shape == (3, 512)
    readonly = np.frombuffer(qt.data.numpy().tobytes(), dtype=np.uint8)  # as a read-only memory map
    assert QuantTensor.from_gguf(readonly, "Q6_K", (3, 512)).data.data_ptr() == readonly.ctypes.data
    for dtype, kind in ((torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16")):
        t = torch.randn(4, 6).to(dtype)
        qt = QuantTensor.from_tensor(t)
        assert qt.kind == kind and qt.data.data_ptr() == t.data_ptr()
        assert qt.dequantize(dtype).data_ptr() == t.data_ptr()  # its own dtype: a view, for the prefill GEMM
        assert torch.equal(qt.dequantize(), t.float())


def test_bad_gguf_tensors_are_refused():
    with pytest.raises(ValueError, match="takes 420 bytes, got 419"):
        QuantTensor.from_gguf(np.zeros(419, dtype=np.uint8), "Q6_K", (2, 256))
    with pytest.raises(ValueError, match="not whole blocks of 256"):
        QuantTensor.from_gguf(np.zeros(420, dtype=np.uint8), "Q6_K", (2, 128))
    with pytest.raises(ValueError, match="no kernels for GGML type IQ2_XXS"):
        QuantTensor.from_gguf(np.zeros(66, dtype=np.uint8), "IQ2_XXS", (1, 256))
    with pytest.raises(ValueError, match="2-D float32, float16 or bfloat16"):
        QuantTensor.from_tensor(torch.zeros(3, 4, dtype=torch.float64))


# Relative RMS error of the round trip on Gaussian weights: a b-bit affine grid over a group's range
# (~4.1 sigma for 32 values, ~3.5 for 16) leaves step / sqrt(12); symmetric grids span 2 max|x|. The bounds
# are those estimates with ~20% room (the scale search only improves on them); legacy kinds must also
# match gguf-py's own quantizer (llama.cpp's reference algorithm) within 1%.
ROUND_TRIP = {"F32": 0.0, "F16": 4e-4, "BF16": 3e-3, "Q8_0": 0.006, "Q6_K": 0.021, "Q5_K": 0.043, "Q5_0": 0.05,
              "Q5_1": 0.045, "Q4_K": 0.085, "Q4_0": 0.1, "Q4_1": 0.093, "IQ4_NL": 0.09, "IQ4_XS": 0.09, "Q3_K": 0.18,
              "Q2_K": 0.33}


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_round_trip(kind):
    w = torch.randn(48, 1024, generator=torch.Generator().manual_seed(0))
    qt = QuantTensor.quantize(w, kind)
    back = gguf_dequantize(qt)  # gguf-py reads our blocks as we do
    assert torch.equal(back, qt.dequantize())
    err = float((back - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    print(f"{kind}: relative RMS error {err:.5f}")
    assert err <= ROUND_TRIP[kind]
    try:
        theirs = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[kind]),
                                                         gguf.GGMLQuantizationType[kind]).reshape(w.shape).copy())
    except NotImplementedError:
        return  # gguf-py has no quantizer for the K-quants and IQ4 kinds
    assert err <= 1.01 * float((theirs - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())


def test_quantize_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="not a multiple of 256"):
        QuantTensor.quantize(torch.randn(2, 576), "Q4_K")
    with pytest.raises(ValueError, match="no quantizer for GGML type Q8_1"):
        QuantTensor.quantize(torch.randn(2, 64), "Q8_1")


# ---------------------------------------------------------------------------------------- the modules
@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "BF16"])
def test_quant_linear_decode_and_prefill_paths(kind):
    qt = QuantTensor.quantize(torch.randn(40, 512), kind)
    lin = QuantLinear(qt)
    w = qt.dequantize()
    short = torch.randn(2, 3, 512)  # 6 rows: the kernels
    torch.testing.assert_close(lin(short), kernels.matmul(qt, short.view(6, 512)).view(2, 3, 40), rtol=0, atol=0)
    long = torch.randn(20, 512)  # 20 rows: dequantize + float GEMM
    torch.testing.assert_close(lin(long), long @ w.T, atol=1e-4, rtol=1e-4)
    lin.prefill_dtype = torch.bfloat16  # bf16 GEMM: operands rounded to bf16 (8 bits of mantissa)
    y = lin(long)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, long @ w.T, atol=0.05 * float((long @ w.T).abs().max()), rtol=0.02)


def test_quant_embedding_looks_up_rows():
    qt = random_qt("Q6_K", 50, 256)
    emb = QuantEmbedding(qt)
    tokens = torch.tensor([[3, 49, 0], [3, 3, 7]])
    assert torch.equal(emb(tokens), gguf_dequantize(qt)[tokens])
    with pytest.raises(IndexError):
        emb(torch.tensor([50]))
