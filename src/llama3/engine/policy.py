"""Which decoder runs a model: one policy, reported the same way by ``load``, ``explain``, ``bench`` and
the server."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Transformer, no_tap
from .cache import PagedKVCache
from .decoders import Decoder, TorchDecoder


@dataclass
class Choice:
    name: str  # "c" | "static" | "torch"
    reason: str  # why this one (and, for "torch" on a CPU, why not the C step)


def choose_decoder(model: Transformer, kv_dtype: torch.dtype | None = None) -> Choice:
    """On CUDA the static-shape step (compiled, replayed as CUDA graphs). On a CPU the C step wherever it can
    run (a model whose matrices are blocks or 16-bit, the kernels built, no trace attached);
    ``Transformer.forward`` otherwise, and always on the exact float path."""
    from .cdecoder import CDecoder

    if getattr(model, "tp_session", None) is not None:
        return Choice("torch", f"Transformer.forward over {model.tp_session.world} ranks (tensor parallel)")
    device = model.norm.weight.device.type
    if device == "cuda":
        if _traced(model):
            return Choice("torch", "Transformer.forward on cuda (a trace is attached: its taps run eagerly)")
        return Choice("static", "a static-shape step without host syncs, compiled and replayed as CUDA graphs")
    if device != "cpu":
        return Choice("torch", f"Transformer.forward on {device} (the C step is for CPUs, CUDA graphs for CUDA)")
    why = CDecoder.why_not(model, kv_dtype)
    if why is None:
        return Choice("c", "each decode step is one C call")
    return Choice("torch", f"Transformer.forward ({why})")


def choose_prefill_dtype(device: torch.device) -> Choice:
    """The dtype of prefill's matrix products for weights in blocks (each layer is dequantized to it for
    inputs longer than a few rows): bfloat16 on CPUs with bfloat16 hardware (3x the prefill tokens/s of
    float32 on the 1B Q4_K_M here), float32 elsewhere. Decode steps are unaffected (they multiply the
    blocks themselves)."""
    from .. import kernels

    hardware = kernels.bf16_hardware() if device.type == "cpu" else None
    if hardware:
        return Choice("bfloat16", f"prefill in bfloat16 ({hardware})")
    return Choice("float32", "prefill in float32" + (" (no bfloat16 hardware)" if device.type == "cpu" else ""))


# With bfloat16 GEMMs, dequantizing a layer costs ~11 ms per 8192x2048 matrix here and each row ~0.04 ms
# more, where the block kernels cost ~0.1 ms a row: they win up to ~150 rows (Q4_K: 13.1 against 16.5 ms
# at 128 rows, 26.8 against 20.3 at 256). Against float32 GEMMs they win at every chunk size measured
# (Q4_K, 512 rows: 52 ms with AVX-512, 82 with AVX2, against 113), so there they run all of prefill.
KERNEL_ROWS_WITH_BF16 = 128


def prefill_kernel_rows(prefill_dtype: torch.dtype) -> int:
    """The most rows a quantized layer multiplies with the block kernels before it dequantizes itself
    for a GEMM in ``prefill_dtype`` (the PyTorch fallback of the kernels is slow: then only decode's few)."""
    from .. import kernels
    from ..quantize import GEMV_MAX_ROWS, PREFILL_ANY_ROWS

    if kernels.library() is None:
        return GEMV_MAX_ROWS
    return KERNEL_ROWS_WITH_BF16 if prefill_dtype == torch.bfloat16 else PREFILL_ANY_ROWS


def _traced(model: Transformer) -> bool:
    return any(getattr(m, "tap", no_tap) is not no_tap for m in model.modules())


def make_decoder(decoder, model: Transformer, cache: PagedKVCache, threads: int | None = None) -> Decoder:
    """``decoder``: "auto" (``choose_decoder``), "c", "static", "torch", or a function (model, cache) -> Decoder."""
    from .cdecoder import CDecoder
    from .static import StaticDecoder

    if callable(decoder):
        return decoder(model, cache)
    if decoder not in ("auto", "c", "static", "torch"):
        raise ValueError(f"unknown decoder {decoder!r}; expected auto, c, static or torch")
    name = choose_decoder(model, cache.dtype).name if decoder == "auto" else decoder
    if getattr(model, "tp_session", None) is not None:  # rank 0 of a tensor-parallel run drives every rank
        if name != "torch":
            raise ValueError(f"decoder {name!r} is single-process; a tensor-parallel model runs the torch decoder")
        from ..parallel import ParallelDecoder

        return ParallelDecoder(model, cache, model.tp_session)
    if name == "c":
        return CDecoder(model, cache, threads=threads)
    if name == "static":
        return StaticDecoder(model, cache)
    return TorchDecoder(model, cache)
