"""Weights for a GPU: a model moved to the device with its matrices in torchao's weight-only layouts.

    model = to_device(model, "cuda", scheme="int4")    # float or GGUF-block (QuantLinear) model in, any scheme

Schemes: "bf16" (plain bfloat16), "int8" (torchao ``Int8WeightOnlyConfig``: int8 values, one scale per row)
and "int4" (``Int4WeightOnlyConfig`` in the tinygemm layout that core PyTorch's CUDA kernel
``_weight_int4pack_mm`` reads: asymmetric 4-bit values, a scale and zero per group of ``group_size``).
A decode step reads every weight once, so bytes are time: int4 reads ~3.6x fewer bytes than bf16.

A model loaded from a GGUF file holds its matrices as blocks (``QuantLinear``: Q4_K, Q8_0, Q4_0, ...). They
are converted one matrix at a time on the way to the device. Q8_0 under "int8" keeps the file's numbers:
its int8 values and per-32 scales become a torchao ``Int8Tensor`` as they are (``q8_0_int8_weight``).
Other kinds go blocks -> float32 on the host -> ``dtype`` on the device -> torchao's layout (at most one
matrix in 16 bits on the device at a time), which re-quantizes: a Q4_0 block (symmetric, 32 values) lands
on int4 group 32 nearly unchanged; Q4_K (sub-blocks of 32 with 6-bit scales and mins) is rounded once more.
torchao is optional: without it only "bf16" is available, and the error says how to get the others.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..model import RMSNorm, Transformer
from ..quantize import QuantEmbedding, QuantLinear, QuantTensor

SCHEMES = ("bf16", "int8", "int4")
INT4_GROUP = 32  # GGUF's block (and Q4_K's sub-block) size; torchao accepts 32, 64, 128, 256


def torchao_config(scheme: str, group_size: int = INT4_GROUP):
    """torchao's config for ``scheme`` ("int8" | "int4"); ImportError naming the package when it is missing."""
    if importlib.util.find_spec("torchao") is None:
        raise ImportError(f"the {scheme} GPU scheme needs torchao: pip install 'llama3[gpu]' (or torchao)")
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: torchao would otherwise change global inductor settings.
    if scheme == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                set_inductor_config=False)


def q8_0_int8_weight(qt: QuantTensor, device, dtype: torch.dtype):
    """A Q8_0 matrix as torchao's ``Int8Tensor`` with the file's own numbers: each block of 32 (an fp16
    scale d, then 32 int8 values q, weight = d·q) becomes 32 int8 values with one float32 scale, exactly
    (fp16 -> float32 is exact). Used as the weight of a Linear computing in ``dtype``."""
    from torchao.quantization import Int8Tensor

    rows, k = qt.shape
    blocks = qt.data.view(rows, k // 32, 34)  # ggml's block_q8_0: {fp16 d; int8 qs[32]}
    scale = blocks[..., :2].contiguous().view(torch.float16).float().view(rows, k // 32)
    q = blocks[..., 2:].contiguous().view(torch.int8).view(rows, k)
    scale, q = scale.to(device), q.to(device)
    return Int8Tensor(q, scale, [1, 32], dtype, zero_point=torch.zeros_like(scale, dtype=torch.int8))


def _float_linear(module: nn.Module, device, dtype) -> nn.Linear:
    """A Linear on ``device`` in ``dtype`` with the module's weights (blocks dequantized on the host first)."""
    weight = module.qtensor.dequantize(torch.float32) if isinstance(module, QuantLinear) else module.weight
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().to(device=device, dtype=dtype), requires_grad=False)
    return linear


@torch.no_grad()
def to_device(model: Transformer, device, scheme: str = "bf16", dtype: torch.dtype = torch.bfloat16,
              group_size: int = INT4_GROUP) -> Transformer:
    """``model`` (on the CPU, float or GGUF blocks) moved to ``device`` in place and returned: norms and the
    embedding in ``dtype``, every Linear in ``scheme``'s layout (see the module docstring). The embedding
    and the output projection stay apart even when tied (a lookup reads one row; the projection is a
    matrix like the others)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown GPU weight scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    device = torch.device(device)
    if scheme == "int4" and device.type != "cuda":
        raise ValueError(f"the int4 scheme runs on CUDA only (its kernel is tinygemm's), not on {device.type}")
    config = None if scheme == "bf16" else torchao_config(scheme, group_size)
    if config is not None:
        from torchao.quantization import quantize_
    if isinstance(model.tok_embeddings, QuantEmbedding):
        table = model.tok_embeddings.qtensor.dequantize(torch.float32)
        model.tok_embeddings = nn.Embedding(table.shape[0], table.shape[1], _weight=table.to(device, dtype))
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        if scheme == "int8" and isinstance(module, QuantLinear) and module.kind == "Q8_0":
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            linear.weight = nn.Parameter(q8_0_int8_weight(module.qtensor, device, dtype), requires_grad=False)
        else:
            linear = _float_linear(module, device, dtype)
            if config is not None:
                quantize_(linear, config)  # bf16 -> torchao's layout, on the device
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, linear)
    model.to(device=device)  # norms, embedding (if float), RoPE frequencies
    for module in model.modules():
        if isinstance(module, (nn.Embedding, RMSNorm)):
            module.to(dtype)
    model.reset_rope(device)
    return model.eval()


def weight_bytes(model: Transformer) -> int:
    """Bytes a decode step reads from the matrices and norms: every module's own tensors but the embedding
    table's (a lookup reads one row; a tied output projection is counted as the output's), in whatever
    layout they are (a torchao tensor counts its packed values, scales and zeros)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Embedding, QuantEmbedding)):
            continue
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name != "rope_freqs":
                inner, _ = t.__tensor_flatten__() if hasattr(t, "__tensor_flatten__") else ([], None)
                parts = [getattr(t, a) for a in inner] or [t]
                total += sum(x.numel() * x.element_size() for x in parts)
    return total
