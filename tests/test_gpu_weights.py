"""Moving a model to a device in torchao's weight-only layouts (llama3.engine.gpu_weights), checked on the
CPU where torchao's kernels run there (bf16 and int8; int4's tinygemm kernel is CUDA-only: unmeasured here).

Tolerances: bf16 weights and activations carry ~3 significant digits, so logits of the tiny models (|l| ~ 1)
move by ~1e-2; int8 per-row weights add ~0.4% of each row's largest value per weight. Both are checked
distributionally against the float32 model: KL(float || converted) of the next-token distribution < 1e-3
and the same top-1 token at every position. A GGUF-block model (Q8_0 and Q4_0 blocks) converts to the
same layouts and stays as close to its own block logits.
"""

import copy

import pytest
import torch

from helpers import hf_model, ours_from_hf
from llama3.engine.gpu_weights import to_device, weight_bytes
from llama3.quantize import QuantLinear, quantize_model


def close(ref_logits, logits, kl_max=1e-3):
    p = torch.log_softmax(ref_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).max()
    assert kl < kl_max, kl
    assert torch.equal(ref_logits.argmax(-1), logits.argmax(-1))


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(hf_model("gqa2", hidden_size=256, intermediate_size=512, num_attention_heads=8))


TOKENS = torch.tensor([[5, 17, 99, 3, 64, 12, 80, 7]])


def logits_of(m):
    with torch.inference_mode():
        return m(TOKENS)[0]


@pytest.mark.parametrize("scheme", ["bf16", "int8"])
def test_float_model_converts(model, scheme):
    if scheme == "int8":
        pytest.importorskip("torchao")
    ref = logits_of(model)
    moved = to_device(copy.deepcopy(model), "cpu", scheme)
    assert moved.norm.weight.dtype == torch.bfloat16 and moved.tok_embeddings.weight.dtype == torch.bfloat16
    close(ref, logits_of(moved))
    full = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tok_embeddings"))
    if scheme == "bf16":
        assert weight_bytes(moved) == 2 * full  # every matrix and norm in 2 bytes; the table is not read whole
    else:  # 1 byte per weight, plus a bf16 scale per row and the norms
        assert full < weight_bytes(moved) < 1.1 * full


@pytest.mark.parametrize("scheme", ["bf16", "int8"])
def test_gguf_block_model_converts(model, scheme):
    if scheme == "int8":
        pytest.importorskip("torchao")
    blocks = copy.deepcopy(model)
    quantize_model(blocks, "q8_0")
    assert any(isinstance(m, QuantLinear) for m in blocks.modules())
    ref = logits_of(blocks)
    moved = to_device(blocks, "cpu", scheme)
    assert not any(isinstance(m, QuantLinear) for m in moved.modules())
    close(ref, logits_of(moved))


def test_q8_0_converts_to_int8_exactly(model):
    """A Q8_0 matrix becomes torchao int8 with the file's own values and scales: dequantized, the two are
    equal bit for bit, and a Linear with it computes what the block kernel computes (to float32 rounding)."""
    pytest.importorskip("torchao")
    from llama3.engine.gpu_weights import q8_0_int8_weight
    from llama3.quantize import QuantTensor

    qt = QuantTensor.quantize(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)), "Q8_0")
    weight = q8_0_int8_weight(qt, "cpu", torch.float32)
    assert torch.equal(weight.dequantize(), qt.dequantize(torch.float32))
    x = torch.randn(3, 256)
    torch.testing.assert_close(torch.nn.functional.linear(x, weight), x @ qt.dequantize(torch.float32).T,
                               atol=1e-5, rtol=0)
    blocks = copy.deepcopy(model)
    quantize_model(blocks, "q8_0")
    wq = blocks.layers[0].attention.wq.qtensor.dequantize(torch.float32)
    moved = to_device(blocks, "cpu", "int8", dtype=torch.float32)
    assert torch.equal(moved.layers[0].attention.wq.weight.dequantize(), wq)


def test_bad_schemes_are_refused(model):
    with pytest.raises(ValueError, match="unknown GPU weight scheme 'int3'"):
        to_device(copy.deepcopy(model), "cpu", "int3")
    with pytest.raises(ValueError, match="int4 scheme runs on CUDA only"):
        to_device(copy.deepcopy(model), "cpu", "int4")
