"""Loading: one ``load(path)`` for every checkpoint format, the device and dtype choice, and building
the model from what ``weights/`` returns (``ModelArgs`` and Meta-named tensors).

``weights/`` only reads files; this module turns their tensors into a ``Transformer`` (built on the
meta device, tensors assigned, nothing copied twice), applies the load-time transforms (quantization),
and attaches the tokenizer and chat format.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .chat import chat_format_for
from .config import ModelArgs
from .generation import Llama
from .sampling import model_sampling_defaults
from .weights.common import CheckpointError, check_state_dict


def resolve_device(device=None) -> torch.device:
    """The device to load on: "auto"/None = CUDA if available, else the CPU. ValueError for a device
    this torch cannot use (CUDA on a CPU-only build, or no such GPU)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device} asked for, but {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """The fastest dtype for the device: float32 on CPUs without bf16 hardware (measured here:
    bf16 matmul is ~40x slower than fp32 on these AVX2 EPYCs), bfloat16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of float32, bfloat16, float16, auto")
    return _DTYPES[dtype]


KV_DTYPES = ("float32", "float16", "bfloat16")


def parse_kv_dtype(kv_dtype) -> torch.dtype | None:
    """``kv_dtype=`` as a torch dtype (None for "auto"/None: ``engine.default_kv_dtype`` decides)."""
    if isinstance(kv_dtype, torch.dtype):
        return kv_dtype
    if kv_dtype in (None, "auto"):
        return None
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; expected one of auto, {', '.join(KV_DTYPES)}")
    return _DTYPES[kv_dtype]


def set_threads(threads: int | None) -> int | None:
    """Cap the threads this process computes with: PyTorch's intra-op pool (prefill, the per-op kernels)
    and the most the C decode step may use (it still measures which count up to that is fastest)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    return threads


def check_quantize(quantize) -> str | None:
    """``quantize=`` as the scheme to quantize to on load (None for "auto"/None/"none"), or ValueError."""
    from .quantize import SCHEMES

    if quantize in (None, "auto", "none"):
        return None
    if quantize not in SCHEMES:
        raise ValueError(f"unknown quantize {quantize!r}; expected one of auto, {', '.join(SCHEMES)}, none")
    return quantize


def load(path=None, *, device=None, dtype=None, quantize: str | None = "auto", fuse: bool = True,
         quiet: bool = False, max_context: int | None = None, check: bool = True, threads: int | None = None,
         kv_dtype=None, prefill_dtype="auto") -> Llama:
    """Load a checkpoint (GGUF file, HF folder or Meta folder; None = the embedded SmolLM2-135M-Instruct).

    ``quantize``: "auto" runs a GGUF's blocks (and 16-bit matrices) as they are in the file, read in
    place from its memory map, with the CPU kernels for each kind they support (on CUDA, or without
    the kernels, everything is converted to ``dtype``); "int8"/"int4" (or a kind such as "q8_0")
    quantize every matrix while reading, one tensor at a time; None converts everything to ``dtype``:
    the exact float path that every fast path is tested against. ``fuse`` is accepted for
    compatibility and changes nothing: the weights keep Meta's layout, read in place (joining wq/wk/wv
    would copy them out of the file's map), and the C decode step runs them in one pass itself.
    ``check`` refuses weights holding NaN or inf (one vectorized pass; False skips it).
    ``threads`` caps the threads used (``set_threads``; default: all cores, the decode step measuring
    which count is fastest as it runs). ``kv_dtype`` ("float32", "float16", "bfloat16"; default "auto":
    float16 for models run from quantized blocks on the CPU, the model's dtype otherwise).
    ``prefill_dtype``: the dtype prefill multiplies block weights in ("auto": ``choose_prefill_dtype``,
    bfloat16 on CPUs with bfloat16 hardware, else float32).
    """
    from . import kernels
    from .engine.policy import choose_prefill_dtype, prefill_kernel_rows
    from .quantize import set_prefill_dtype
    from .weights import checkpoint_bytes, default_model_path, detect_format, load_checkpoint, progress_bar

    device = resolve_device(device)
    dtype = parse_dtype(dtype) or default_dtype(device)
    engine_options = {"threads": set_threads(threads), "kv_dtype": parse_kv_dtype(kv_dtype)}
    prefill = parse_dtype(prefill_dtype)
    quantize = None if quantize == "none" else quantize
    kind = check_quantize(quantize)
    if kind and device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU kernels; use device='cpu' or quantize=None")
    keep = kernels.SUPPORTED_KINDS if quantize == "auto" and device.type == "cpu" and kernels.library() else ()
    path = default_model_path() if path is None else Path(os.path.expanduser(str(path)))
    _, target = detect_format(path)
    with progress_bar(checkpoint_bytes(target), f"reading {target.name}", quiet) as bar:
        ckpt = load_checkpoint(target, dtype, quiet, keep=keep, quantize=kind, check=check, progress=bar)
        bar.set_description_str("building the model")
        model = build_model(ckpt.args, ckpt.state, device=device, path=ckpt.path)
        gemm = prefill or getattr(torch, choose_prefill_dtype(device).name)
        set_prefill_dtype(model, gemm, prefill_kernel_rows(gemm))
        del ckpt.state
        bar.set_description_str("building the tokenizer")
        tokenizer, chat = tokenizer_and_chat(ckpt)
    llm = Llama(ckpt.args, model, tokenizer, chat, str(ckpt.path), ckpt.format, max_context, engine_options)
    llm.sampling_defaults, llm.sampling_defaults_source = model_sampling_defaults(
        ckpt.path, ckpt.gguf_metadata if ckpt.format == "gguf" else None)
    llm.dequantized = list(ckpt.dequantized)  # (tensor, kind) converted to float because no kernel runs its kind
    return llm


def tokenizer_and_chat(ckpt):
    """The tokenizer and chat format of a checkpoint read by ``weights/`` (from its metadata or folder)."""
    from .tokenizer import load_tokenizer, tokenizer_from_gguf

    if ckpt.format == "gguf":
        tokenizer = tokenizer_from_gguf(ckpt.gguf_metadata, str(ckpt.path))
        template, source = ckpt.gguf_metadata.get("tokenizer.chat_template"), str(ckpt.path)
    else:
        tokenizer = load_tokenizer(ckpt.path)
        template = getattr(tokenizer, "chat_template", None)
        source = str(Path(ckpt.path) / "tokenizer_config.json")
    return tokenizer, chat_format_for(tokenizer, template if isinstance(template, str) else None, source)


def build_model(args: ModelArgs, state: dict[str, torch.Tensor], device=None, path="<state dict>", model=None):
    """A Transformer holding ``state``'s tensors, built on the meta device (no double allocation).
    ``model``: a meta-device model to fill instead (a tensor-parallel rank's, with its shapes)."""
    from .model import Transformer
    from .quantize import QuantTensor, swap_in

    if model is None:
        check_state_dict(path, args, state)
        model = Transformer(args, device="meta")
    quantized = {k: v for k, v in state.items() if isinstance(v, QuantTensor)}
    for name, qt in quantized.items():
        swap_in(model, name, qt, dtype=state["norm.weight"].dtype)
    state = {k: v for k, v in state.items() if k not in quantized}
    if quantized and args.tie_word_embeddings:
        state.pop("output.weight", None)
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if m.rsplit(".", 1)[-1] != "data"]  # buffers set by swap_in
    allowed_missing = {"output.weight"} if args.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise CheckpointError(path, f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.reset_rope(model.norm.weight.device)
    return model.eval().requires_grad_(False)
